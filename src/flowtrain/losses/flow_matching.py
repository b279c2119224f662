"""The rectified-flow objective: regress the velocity ε - x0 (see `flowtrain.flow.path`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from flowtrain.flow import velocity_target
from flowtrain.losses.base import LOSSES, LossContext

BASES = ("mse", "l1", "huber", "logcosh")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


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
    """(B,) loss weights from the SD3 paper's schemes (diffusers' implementation): none → 1, sigma_sqrt → σ⁻²,
    cosmap → 2 / (π(1 - 2σ + 2σ²))."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected none, sigma_sqrt or cosmap")
    return compute_loss_weighting_for_sd3(weighting, sigmas=sigma.float())


def reduce_per_sample(err: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, C) element errors → (B,) per-sample losses.

    mask: None (plain mean); (B,) per-sample weights (multiplied in); or (B, N) per-token weights (a weighted mean
    over tokens, so a sample's loss keeps its scale whatever fraction of it is masked).
    """
    per_sample = err.flatten(1).mean(dim=1)
    if mask is None:
        return per_sample
    m = mask.to(err.device, torch.float32)
    if m.ndim == 1:
        return per_sample * m
    per_token = err.flatten(2).mean(-1) if err.ndim > 2 else err
    return (per_token * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)


@LOSSES.register("flow_matching")
class FlowMatchingLoss:
    """mean over samples of w(σ) · mean over tokens of err(v̂, ε - x0); errors computed in float32.

    Logs `loss/per_sample` (B,), which the loop bins by σ (`loss_by_sigma/...`).
    """

    def __init__(self, base: str = "mse", weighting: str = "none", huber_delta: float = 1.0):
        if base not in BASES:
            raise ValueError(f"unknown base loss {base!r}; expected one of {', '.join(BASES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        self.base, self.weighting, self.huber_delta = base, weighting, huber_delta

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        """Constructor arguments from a FlowtrainConfig's `loss` section (subclasses add theirs)."""
        return {"base": cfg.loss.base, "weighting": cfg.loss.weighting, "huber_delta": cfg.loss.huber_delta}

    @classmethod
    def from_config(cls, cfg: Any, **_: Any) -> FlowMatchingLoss:
        return cls(**cls.config_kwargs(cfg), **cfg.loss.kwargs)

    def per_sample(self, ctx: LossContext, target: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) weighted per-sample error of ctx.pred against `target` (default: the flow target ε - x0)."""
        if target is None:
            target = velocity_target(ctx.x0.float(), ctx.noise.float())
        err = elementwise(ctx.pred.float(), target.float(), self.base, self.huber_delta)
        per_sample = reduce_per_sample(err, ctx.mask)
        if self.weighting != "none":
            per_sample = per_sample * sigma_weights(ctx.sigma, self.weighting).to(per_sample)
        return per_sample

    def __call__(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_sample = self.per_sample(ctx)
        return per_sample.mean(), {"loss/per_sample": per_sample.detach()}
