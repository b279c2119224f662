"""LR schedules: the lr curve of every schedule at chosen steps (hand-computed), equality with diffusers where
the names overlap, reduce-on-plateau on a synthetic loss, and the exact round trip of its state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from flowtrain.config.schema import LrSchedulerConfig
from flowtrain.train.schedules import build_lr_scheduler

LR, T = 0.1, 20


def _curve(cfg: LrSchedulerConfig, steps: int = T + 1, lr: float = LR) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_lr_scheduler(opt, cfg, T)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_equals_diffusers_get_scheduler(name):
    from diffusers.optimization import get_scheduler

    warm = 0 if name == "constant" else 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ref = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=T)
    expected = []
    for _ in range(T + 1):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _curve(LrSchedulerConfig(name=name, warmup_steps=warm)) == pytest.approx(expected, abs=1e-12)


CURVES = {
    # name, settings → {step: expected lr}
    "constant_with_warmup": (dict(warmup_steps=4), {0: 0.0, 1: 0.025, 3: 0.075, 4: 0.1, 20: 0.1}),
    "linear": (dict(warmup_steps=4, min_lr_ratio=0.2), {2: 0.05, 4: 0.1, 12: 0.1 * (0.2 + 0.8 * 0.5), 20: 0.02}),
    "cosine": (
        dict(warmup_steps=0, min_lr_ratio=0.1),
        {0: 0.1, 5: 0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))), 10: 0.1 * 0.55, 20: 0.01},
    ),
    "step": (dict(warmup_steps=2, step_size=5, gamma=0.5), {1: 0.05, 2: 0.1, 6: 0.1, 7: 0.05, 12: 0.025, 17: 0.0125}),
    "exponential": (
        dict(warmup_steps=0, step_size=4, gamma=0.5, min_lr_ratio=0.05),
        {0: 0.1, 2: 0.1 * 0.5**0.5, 4: 0.05, 8: 0.025, 20: 0.1 * 0.05},  # 0.5^5 = 0.031 < floor 0.05
    ),
}


@pytest.mark.parametrize("name", list(CURVES))
def test_lr_curve_values(name):
    settings, points = CURVES[name]
    curve = _curve(LrSchedulerConfig(name=name, **settings))
    for step, lr in points.items():
        assert curve[step] == pytest.approx(lr, rel=1e-9), (name, step, curve)


def test_constant_rejects_warmup():
    with pytest.raises(ValueError, match="constant_with_warmup"):
        LrSchedulerConfig(name="constant", warmup_steps=10)


def _plateau(**kw):
    cfg = LrSchedulerConfig(name="plateau", gamma=0.5, patience=3, threshold=0.01, smoothing=0.0, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    return opt, build_lr_scheduler(opt, cfg, 100)


def _feed(opt, sched, losses) -> list[float]:
    lrs = []
    for loss in losses:
        opt.step()
        sched.step()
        sched.observe(loss)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_plateau_reduces_after_patience_steps_without_improvement():
    opt, sched = _plateau()
    # improving for 4 steps, then flat: best at step 4, reductions at steps 7 and 10 (patience 3)
    lrs = _feed(opt, sched, [1.0, 0.9, 0.8, 0.7] + [0.7] * 7)
    assert lrs == pytest.approx([0.1] * 6 + [0.05] * 3 + [0.025] * 2)
    # a real improvement (> 1 % relative) resets the count
    opt, sched = _plateau()
    lrs = _feed(opt, sched, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # best moves to step 4: no cut at step 4
    assert lrs == pytest.approx([0.1] * 6 + [0.05])
    opt, sched = _plateau(min_lr_ratio=0.4)
    assert _feed(opt, sched, [1.0] * 12)[-1] == pytest.approx(0.04)  # floor


def test_plateau_smooths_the_loss_and_honours_cooldown():
    cfg = LrSchedulerConfig(name="plateau", gamma=0.5, patience=2, threshold=0.0, smoothing=0.9, cooldown=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = build_lr_scheduler(opt, cfg, 100)
    lrs = _feed(opt, sched, [1.0, 2.0])  # bias-corrected EMA: 1.0, then (0.09 + 0.2) / 0.19 ≈ 1.526
    assert sched.smoothed_loss == pytest.approx((0.9 * 0.1 * 1.0 + 0.1 * 2.0) / (1 - 0.81))
    lrs += _feed(opt, sched, [5.0] * 8)
    # best at step 1; reduce at step 3 (2 steps later), then cooldown until step 7; next reduction at step 7
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.025])


def test_plateau_state_round_trips_exactly():
    opt, sched = _plateau()
    _feed(opt, sched, [1.0, 0.9, 0.9, 0.9, 0.9])
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2, sched2 = _plateau()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    assert sched2.plateau == sched.plateau and sched2._cfg.patience == 3
    more = [0.9, 0.9, 0.9, 0.5, 0.5]
    assert _feed(opt2, sched2, more) == _feed(opt, sched, more)
