"""DreamBooth prior preservation: the flow loss on instance rows plus `prior_loss_weight` × the loss on class rows.

The batch holds instance rows and, from dataset.class_cache_dir, as many class rows (`ctx.extra["is_prior"]`), as
in diffusers' DreamBooth scripts: loss = mean(instance) + w · mean(class). Both parts are logged.
"""

from __future__ import annotations

from typing import Any

import torch

from flowtrain.losses.base import LOSSES, LossContext
from flowtrain.losses.flow_matching import FlowMatchingLoss


@LOSSES.register("prior_preservation")
class PriorPreservationLoss(FlowMatchingLoss):
    """Logs `loss/instance`, `loss/prior` (the unweighted means of each part) and `loss/per_sample` (all rows)."""

    def __init__(self, prior_loss_weight: float = 1.0, **flow_kwargs: Any):
        super().__init__(**flow_kwargs)
        self.prior_loss_weight = float(prior_loss_weight)

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {**super().config_kwargs(cfg), "prior_loss_weight": cfg.loss.prior_loss_weight}

    def __call__(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        is_prior = ctx.extra.get("is_prior")
        if is_prior is None:
            raise ValueError("loss prior_preservation got a batch without class rows: set dataset.class_cache_dir")
        per_sample = self.per_sample(ctx)
        prior = is_prior.to(per_sample.device, torch.float32)
        inst = 1.0 - prior
        # Weighted sums rather than boolean indexing: no host sync, and an empty part gives 0, not NaN.
        inst_loss = (per_sample * inst).sum() / inst.sum().clamp_min(1.0)
        prior_loss = (per_sample * prior).sum() / prior.sum().clamp_min(1.0)
        loss = inst_loss + self.prior_loss_weight * prior_loss
        return loss, {
            "loss/per_sample": per_sample.detach(),
            "loss/instance": inst_loss.detach(),
            "loss/prior": prior_loss.detach(),
        }
