"""The loss plug-in point."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from flowtrain.registry import Registry


@dataclass
class LossContext:
    """Everything a loss may need for one micro-batch. Shapes: tokens (B, N, C), sigma (B,)."""

    pred: torch.Tensor  # model output v̂
    x0: torch.Tensor  # clean latents
    noise: torch.Tensor  # ε
    sigma: torch.Tensor  # noise level per sample
    x_t: torch.Tensor  # (1-σ)·x0 + σ·ε
    mask: torch.Tensor | None = None  # optional (B, N) or (B,) per-sample/token weights
    extra: dict[str, Any] = field(default_factory=dict)


class Loss(Protocol):
    def __call__(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


LOSSES: Registry[type] = Registry("loss")


def build_loss(name: str, **kwargs: Any) -> Loss:
    """Instantiate a registered loss (or `pkg.module:Class`) with its keyword arguments."""
    return LOSSES.get(name)(**kwargs)
