"""Learning-rate schedules: lr(step) = learning_rate × factor(step), as `torch.optim.lr_scheduler.LambdaLR`.

Every schedule but `constant` starts with a linear warm-up from 0 over `warmup_steps` (diffusers' shape: the
factor at step s < W is s / W). After it, with progress p = (s - W) / (max_steps - W) and floor m = min_lr_ratio:

  constant, constant_with_warmup   1
  linear                           m + (1 - m) · max(0, 1 - p)
  cosine                           m + (1 - m) · ½(1 + cos πp)            (p clamped to [0, 1])
  step                             max(m, gamma ^ floor((s - W) / step_size))
  exponential                      max(m, gamma ^ ((s - W) / step_size))
  plateau                          max(m, gamma ^ k), k = reductions so far (see `PlateauLR`)

With m = 0 the first four equal diffusers' `get_scheduler` of the same name. The factor functions are closures,
not objects, so a scheduler's state_dict holds only its step (and the plateau state): a resumed run follows the
schedule of its *current* config (see `train.resume.apply_changed_schedule`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from flowtrain.config.schema import LrSchedulerConfig

log = logging.getLogger(__name__)


def lr_factor_fn(cfg: LrSchedulerConfig, max_steps: int) -> Callable[[int], float]:
    """factor(step) of every schedule but plateau's reductions (for plateau: its warm-up part)."""
    name, w, m = cfg.name, cfg.warmup_steps, cfg.min_lr_ratio
    if name == "constant":
        return lambda step: 1.0

    def factor(step: int) -> float:
        if step < w:
            return step / max(1, w)
        if name in ("constant_with_warmup", "plateau"):
            return 1.0
        if name == "linear":
            return m + (1.0 - m) * max(0.0, (max_steps - step) / max(1, max_steps - w))
        if name == "cosine":
            p = min(1.0, (step - w) / max(1, max_steps - w))
            return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
        if name == "step":
            return max(m, cfg.gamma ** ((step - w) // cfg.step_size))
        if name == "exponential":
            return max(m, cfg.gamma ** ((step - w) / cfg.step_size))
        raise ValueError(f"unknown lr_scheduler.name {name!r}")

    return factor


class PlateauLR(LambdaLR):
    """Reduce-on-plateau on the smoothed train loss, stepped once per optimizer step like the others.

    `observe(loss)` is called with the logged (process-averaged) train loss at every logged step; it keeps a
    bias-corrected EMA (β = smoothing) and, when that has not improved by a relative `threshold` for `patience`
    steps (and no reduction happened within `cooldown` steps), multiplies the lr by `gamma` (floor: min_lr_ratio).
    The state (`plateau`: a dict of numbers) is in state_dict, so resume continues it exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: LrSchedulerConfig, max_steps: int):
        self._cfg = cfg
        self.plateau = {"avg": 0.0, "n": 0, "best": math.inf, "best_step": 0, "reductions": 0, "cooldown_until": 0}
        warm = lr_factor_fn(cfg, max_steps)
        super().__init__(
            optimizer, lambda step: warm(step) * max(cfg.min_lr_ratio, cfg.gamma ** self.plateau["reductions"])
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_cfg", None)  # the hyper-parameters come from the current config
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        cfg = self._cfg
        super().load_state_dict(state_dict)
        self._cfg = cfg

    @property
    def smoothed_loss(self) -> float:
        s, beta = self.plateau, self._cfg.smoothing
        return s["avg"] / (1.0 - beta ** s["n"]) if s["n"] else math.nan

    def observe(self, loss: float) -> None:
        """Feed the train loss logged after `last_epoch` optimizer steps; may lower the lr right away."""
        if not math.isfinite(loss):
            return
        cfg, s, step = self._cfg, self.plateau, self.last_epoch
        s["n"] += 1
        s["avg"] = cfg.smoothing * s["avg"] + (1.0 - cfg.smoothing) * loss
        smoothed = self.smoothed_loss
        if smoothed < s["best"] * (1.0 - cfg.threshold):
            s["best"], s["best_step"] = smoothed, step
        elif step - s["best_step"] >= cfg.patience and step >= s["cooldown_until"]:
            s["reductions"] += 1
            s["best"], s["best_step"], s["cooldown_until"] = smoothed, step, step + cfg.cooldown
            lrs = [base * fn(step) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            self._last_lr = lrs
            log.info("lr_scheduler plateau: smoothed loss %.5g did not improve; lr → %.3g", smoothed, lrs[0])


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LrSchedulerConfig, max_steps: int) -> LambdaLR:
    """The configured schedule; `observe(loss)` exists on every returned scheduler only for plateau."""
    if cfg.name == "plateau":
        return PlateauLR(optimizer, cfg, max_steps)
    return LambdaLR(optimizer, lr_factor_fn(cfg, max_steps))
