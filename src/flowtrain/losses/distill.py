"""Distillation from a frozen teacher of the same family.

loss = mean over samples of flow_weight · err(v̂, ε - x0) + distill_weight · err(v̂, v̂_teacher), where the teacher
sees exactly the student's inputs (x_σ, σ, text, grid) and runs without gradients. `err` is loss.base with the
same σ-weighting and mask as the flow term. Logs `loss/flow` and `loss/distill` (unweighted means).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from flowtrain.losses.base import LOSSES, LossContext
from flowtrain.losses.flow_matching import FlowMatchingLoss

log = logging.getLogger(__name__)


def load_teacher(cfg: Any, adapter: Any, device: torch.device | str | None) -> torch.nn.Module:
    """The teacher transformer from `loss.teacher` (pipeline folder, transformer folder or .safetensors file; the
    architecture of a single file comes from model.pretrained), frozen, in eval mode, in model.dtype on `device`."""
    from flowtrain.train.setup import torch_dtype

    path = cfg.loss.teacher
    try:
        teacher = adapter.load_transformer(
            cfg.model.pretrained, dit=path, dtype=torch_dtype(cfg.model.dtype), revision=cfg.model.revision
        )
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"loss.teacher={path!r}: could not load the teacher transformer ({e}); give a pipeline folder, a "
            "transformer folder or a .safetensors file of the same model family"
        ) from e
    teacher.requires_grad_(False).eval()
    if device is not None:
        teacher.to(device)
    n = sum(p.numel() for p in teacher.parameters())
    log.info("distillation teacher %s: %.3fM parameters, frozen", path, n / 1e6)
    return teacher


@LOSSES.register("distillation")
class DistillationLoss(FlowMatchingLoss):
    def __init__(
        self,
        teacher: torch.nn.Module,
        adapter: Any,
        *,
        flow_weight: float = 1.0,
        distill_weight: float = 1.0,
        **flow_kwargs: Any,
    ):
        super().__init__(**flow_kwargs)
        self.teacher, self.adapter = teacher, adapter
        self.flow_weight, self.distill_weight = float(flow_weight), float(distill_weight)

    @classmethod
    def from_config(cls, cfg: Any, *, adapter: Any = None, device: Any = None, **_: Any) -> DistillationLoss:
        if adapter is None:
            raise ValueError("the distillation loss needs the model adapter to run its teacher")
        return cls(
            load_teacher(cfg, adapter, device),
            adapter,
            flow_weight=cfg.loss.flow_weight,
            distill_weight=cfg.loss.distill_weight,
            **cls.config_kwargs(cfg),
            **cfg.loss.kwargs,
        )

    def teacher_prediction(self, ctx: LossContext) -> torch.Tensor:
        """(B, N, C) teacher velocity at the student's x_σ, σ, text and grid; no autograd graph."""
        try:
            text, grid = ctx.extra["text_embeds"], ctx.extra["grid"]
        except KeyError as e:
            raise ValueError(f"distillation needs LossContext.extra[{e.args[0]!r}] (set by train.step)") from None
        with torch.no_grad():
            return self.adapter.predict(self.teacher, ctx.x_t.detach(), ctx.sigma, text, grid)

    def __call__(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        flow = self.per_sample(ctx)
        distill = self.per_sample(ctx, target=self.teacher_prediction(ctx))
        per_sample = self.flow_weight * flow + self.distill_weight * distill
        return per_sample.mean(), {
            "loss/per_sample": per_sample.detach(),
            "loss/flow": flow.detach().mean(),
            "loss/distill": distill.detach().mean(),
        }
