"""Optimizer from config (the lr schedule is in `flowtrain.train.schedules`).

| name           | implementation                                   | notes                                        |
|----------------|--------------------------------------------------|----------------------------------------------|
| adamw, adam    | torch, optimizer.implementation (foreach)        | betas, eps, weight_decay                     |
| sgd            | torch, optimizer.implementation (foreach)        | momentum, weight_decay                       |
| rmsprop        | torch, foreach / for_loop                        | momentum, eps, weight_decay                  |
| prodigy        | prodigyopt.Prodigy                               | lr-free: use train.learning_rate 1.0         |
| adamw8bit      | bitsandbytes.optim.AdamW8bit                     | 8-bit states for tensors ≥ 4096 elements     |
| adafactor      | transformers Adafactor, external lr              | factored second moments; eps via kwargs      |
| ao_adamw8bit / ao_adamw4bit / ao_adamw_fp8 | torchao.optim     | optional extra: `pip install flowtrain[lowbit]` |

`optimizer.kwargs` go to the constructor as they are; `optimizer.lr_scale` makes parameter groups with their own
lr multiplier (each group keeps it as `lr_scale`, so a changed lr on resume keeps the ratios).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterable
from typing import Any

import torch

from flowtrain.config.schema import LrSchedulerConfig, OptimizerConfig
from flowtrain.train.perf import optimizer_kwargs
from flowtrain.train.schedules import build_lr_scheduler as _build_lr_scheduler

log = logging.getLogger(__name__)


def _require(module: str, name: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"optimizer.name={name!r} needs the `{module.split('.')[0]}` package, which is not installed "
            f"({e}); install it with `pip install 'flowtrain[{extra}]'` or choose another optimizer.name"
        ) from e


def param_groups(
    params: Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]], lr: float, lr_scale: dict
) -> list[dict[str, Any]]:
    """Trainable parameters as optimizer groups: one per distinct `lr_scale` factor (first matching regex wins)."""
    items = [x for x in params if (x[1] if isinstance(x, tuple) else x).requires_grad]
    if not items:
        raise ValueError("no trainable parameters: check train_mode and lora.targets")
    if not lr_scale:
        return [{"params": [x[1] if isinstance(x, tuple) else x for x in items], "lr": lr, "lr_scale": 1.0}]
    if not all(isinstance(x, tuple) for x in items):
        raise ValueError("optimizer.lr_scale needs named parameters (pass model.named_parameters())")
    patterns = [(re.compile(p), float(f)) for p, f in lr_scale.items()]
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in items:
        factor = next((f for rx, f in patterns if rx.search(name)), 1.0)
        groups.setdefault(factor, []).append(p)
    unused = [p for p, _ in lr_scale.items() if not any(re.search(p, n) for n, _ in items)]
    if unused:
        raise ValueError(f"optimizer.lr_scale: {unused} match no trainable parameter name (e.g. {items[0][0]!r})")
    for factor, ps in sorted(groups.items()):
        log.info("optimizer group: %d tensors at lr × %g", len(ps), factor)
    return [{"params": ps, "lr": lr * f, "lr_scale": f} for f, ps in sorted(groups.items())]


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimizerConfig, lr: float
) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable ones of `params` (parameters, or (name, parameter) pairs)."""
    groups = param_groups(params, lr, cfg.lr_scale)
    name, kw = cfg.name, dict(cfg.kwargs)
    flat = [p for g in groups for p in g["params"]]
    impl = optimizer_kwargs(flat, cfg.implementation)
    adam = {"betas": cfg.betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    try:
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=lr, **adam, **impl, **kw)
        if name == "adam":
            return torch.optim.Adam(groups, lr=lr, **adam, **impl, **kw)
        if name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **impl, **kw)
        if name == "rmsprop":
            impl = {"foreach": cfg.implementation != "for_loop"}  # no fused RMSprop in torch: auto → foreach
            return torch.optim.RMSprop(
                groups, lr=lr, momentum=cfg.momentum, eps=cfg.eps, weight_decay=cfg.weight_decay, **impl, **kw
            )
        if name == "prodigy":
            if lr < 0.1:
                log.warning("prodigy estimates the step size itself: train.learning_rate is a multiplier, use ~1.0")
            mod = _require("prodigyopt", name, "optim")
            return mod.Prodigy(groups, lr=lr, **adam, **kw)
        if name == "adamw8bit":
            mod = _require("bitsandbytes.optim", name, "optim")
            return mod.AdamW8bit(groups, lr=lr, **adam, **kw)
        if name == "adafactor":
            from transformers.optimization import Adafactor

            # External lr (our schedule), no relative-step / parameter-scale heuristics.
            kw = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kw}
            return Adafactor(groups, lr=lr, weight_decay=cfg.weight_decay, **kw)
        if name.startswith("ao_"):
            mod = _require("torchao.optim", name, "lowbit")
            cls = {"ao_adamw8bit": "AdamW8bit", "ao_adamw4bit": "AdamW4bit", "ao_adamw_fp8": "AdamWFp8"}[name]
            return getattr(mod, cls)(groups, lr=lr, **adam, **kw)
    except TypeError as e:
        raise ValueError(f"optimizer.name={name!r}: bad optimizer.kwargs {cfg.kwargs}: {e}") from e
    raise ValueError(f"unknown optimizer {name!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LrSchedulerConfig, max_steps: int):
    """See `flowtrain.train.schedules` (kept here so existing imports work)."""
    return _build_lr_scheduler(optimizer, cfg, max_steps)
