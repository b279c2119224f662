"""Distillation from a frozen teacher of the same family.

loss = mean over samples of flow_weight · err(v̂, ε - x0) + distill_weight · err(v̂, v̂_teacher), where the teacher
sees exactly the student's inputs (x_σ, σ, conditioning, token grid) and runs without gradients. The run loads the
teacher (`train.trainable.load_teacher`) and hands it in. `err` is loss.base with the
same σ-weighting and mask as the flow term. Logs `loss/flow` and `loss/distill` (unweighted means).
"""

from __future__ import annotations

from typing import Any

import torch

from flowtrain.losses.base import LOSSES, LossContext
from flowtrain.losses.flow_matching import FlowMatchingLoss


@LOSSES.register("distillation")
class DistillationLoss(FlowMatchingLoss):
    def __init__(
        self,
        teacher: torch.nn.Module,
        family: Any,
        *,
        flow_weight: float = 1.0,
        distill_weight: float = 1.0,
        **flow_kwargs: Any,
    ):
        super().__init__(**flow_kwargs)
        self.teacher, self.family = teacher, family
        self.flow_weight, self.distill_weight = float(flow_weight), float(distill_weight)

    @classmethod
    def from_config(cls, cfg: Any, *, family: Any = None, teacher: Any = None, **_: Any) -> DistillationLoss:
        if family is None or teacher is None:
            raise ValueError("the distillation loss needs the model family and the loaded teacher (loss.teacher)")
        return cls(
            teacher,
            family,
            flow_weight=cfg.loss.flow_weight,
            distill_weight=cfg.loss.distill_weight,
            **cls.config_kwargs(cfg),
            **cfg.loss.kwargs,
        )

    def teacher_prediction(self, ctx: LossContext) -> torch.Tensor:
        """(B, N, C) teacher velocity at the student's x_σ, σ, conditioning and token grid; no autograd graph."""
        try:
            cond, shape = ctx.extra["cond"], ctx.extra["shape"]
        except KeyError as e:
            raise ValueError(f"distillation needs LossContext.extra[{e.args[0]!r}] (set by train.step)") from None
        with torch.no_grad():
            return self.family.predict(self.teacher, ctx.x_t.detach(), ctx.sigma, cond, shape)

    def __call__(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        flow = self.per_sample(ctx)
        distill = self.per_sample(ctx, target=self.teacher_prediction(ctx))
        per_sample = self.flow_weight * flow + self.distill_weight * distill
        return per_sample.mean(), {
            "loss/per_sample": per_sample.detach(),
            "loss/flow": flow.detach().mean(),
            "loss/distill": distill.detach().mean(),
        }
