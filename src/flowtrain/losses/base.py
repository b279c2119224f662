"""The loss plug-in point.

A loss is any callable `(LossContext) -> (scalar, log_dict)`. The loop builds it with `loss_from_config`:
`loss.name` is a registered name or an import string `pkg.module:Name`; a class with a `from_config(cfg, *,
family, teacher)` classmethod is built by it, any other class as `Name(**loss.kwargs)`, and a plain function is
used as it is. See docs/training.md#custom-losses.

The log dict holds detached tensors: `loss/per_sample` (B,) (binned by σ into `loss_by_sigma/...` by the loop),
and 0-dim parts such as `loss/instance`, `loss/prior`, `loss/flow`, `loss/distill`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from flowtrain.registry import Registry


@dataclass
class LossContext:
    """Everything a loss may need for one micro-batch. Shapes: tokens (B, N, C), sigma (B,).

    `extra` (set by `train.step.step_loss`): `cond` (the family's conditioning tensors) and `shape` (the token
    grid), to run another model at the same inputs (distillation, with `ModelFamily.predict`); `is_prior` (B,) bool
    when dataset.class_cache_dir adds class rows (the batch is instance rows first, then class rows).
    """

    pred: torch.Tensor  # model output v̂
    x0: torch.Tensor  # clean latents
    noise: torch.Tensor  # ε
    sigma: torch.Tensor  # noise level per sample
    x_t: torch.Tensor  # (1-σ)·x0 + σ·ε
    mask: torch.Tensor | None = None  # optional (B, N) per-token or (B,) per-sample weights (cache column loss_mask)
    extra: dict[str, Any] = field(default_factory=dict)


class Loss(Protocol):
    def __call__(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


LOSSES: Registry[type] = Registry("loss")


def build_loss(name: str, **kwargs: Any) -> Loss:
    """Instantiate a registered loss (or `pkg.module:Class`) with its keyword arguments."""
    return LOSSES.get(name)(**kwargs)


def loss_from_config(cfg: Any, *, family: Any = None, teacher: torch.nn.Module | None = None) -> Loss:
    """The loss of a FlowtrainConfig (see the module docstring for how `loss.name` is turned into a callable)."""
    import inspect

    name, kwargs = cfg.loss.name, dict(cfg.loss.kwargs)
    obj = LOSSES.get(name)
    if hasattr(obj, "from_config"):
        try:
            return obj.from_config(cfg, family=family, teacher=teacher)
        except TypeError as e:
            raise ValueError(f"loss.name={name!r}: cannot build it with loss.kwargs={kwargs}: {e}") from e
    if inspect.isclass(obj):
        try:
            return obj(**kwargs)
        except TypeError as e:
            raise ValueError(f"loss.name={name!r}: cannot build {obj.__name__}(**loss.kwargs={kwargs}): {e}") from e
    if callable(obj):
        if kwargs:
            raise ValueError(f"loss.name={name!r} is a function; it takes no loss.kwargs (got {kwargs})")
        return obj
    raise ValueError(f"loss.name={name!r} is {obj!r}, not a loss class or callable")
