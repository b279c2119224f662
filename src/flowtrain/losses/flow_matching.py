"""The rectified-flow objective: regress the velocity ε - x0 (see `flowtrain.flow.path`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flowtrain.flow import velocity_target
from flowtrain.losses.base import LOSSES, LossContext


def elementwise(pred: torch.Tensor, target: torch.Tensor, base: str, huber_delta: float = 1.0) -> torch.Tensor:
    """Per-element error, same shape as pred."""
    if base == "mse":
        return (pred - target) ** 2
    if base == "l1":
        return (pred - target).abs()
    if base == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    if base == "logcosh":
        d = pred - target
        # log(cosh(d)) = |d| + log1p(exp(-2|d|)) - log 2, stable for large |d|
        return d.abs() + torch.log1p(torch.exp(-2 * d.abs())) - math.log(2.0)
    raise ValueError(f"unknown base loss {base!r}; expected mse, l1, huber or logcosh")


def sigma_weights(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """(B,) loss weights from the SD3 paper's schemes (diffusers' implementation)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if weighting not in ("none", "sigma_sqrt", "cosmap"):
        raise ValueError(f"unknown weighting {weighting!r}; expected none, sigma_sqrt or cosmap")
    return compute_loss_weighting_for_sd3(weighting, sigmas=sigma.float())


@LOSSES.register("flow_matching")
class FlowMatchingLoss:
    """mean over samples of w(σ) · mean over tokens of err(v̂, ε - x0); errors computed in float32."""

    def __init__(self, base: str = "mse", weighting: str = "none", huber_delta: float = 1.0):
        self.base, self.weighting, self.huber_delta = base, weighting, huber_delta

    def __call__(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = velocity_target(ctx.x0.float(), ctx.noise.float())
        err = elementwise(ctx.pred.float(), target, self.base, self.huber_delta)
        per_sample = err.flatten(1).mean(dim=1)
        if ctx.mask is not None:
            m = ctx.mask.float()
            per_sample = (
                (err.mean(-1) * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)
                if m.ndim > 1
                else per_sample * m
            )
        if self.weighting != "none":
            per_sample = per_sample * sigma_weights(ctx.sigma, self.weighting).to(per_sample)
        loss = per_sample.mean()
        return loss, {"loss/per_sample": per_sample.detach()}
