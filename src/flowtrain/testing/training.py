"""Helpers for tests that run `flowtrain.train.loop.train` on the tiny model (tests cannot import each other)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from flowtrain.losses.base import LossContext
from flowtrain.losses.flow_matching import FlowMatchingLoss
from flowtrain.testing.data import DEFAULT_FAMILY, tiny_config_dict


def train_config(pipeline: Path, cache: Path, out: Path, *, family: str = DEFAULT_FAMILY, **sections: Any):
    """A validated FlowtrainConfig for a family's tiny pipeline; each keyword updates (dict) or sets one section.
    Metrics go to metrics.jsonl only (no MLflow store per test)."""
    from flowtrain.config import FlowtrainConfig

    d = tiny_config_dict(pipeline, cache, out, family)
    d["tracking"] = {"report_to": ["jsonl"], "log_weights": False, "graphs": False}
    for section, values in sections.items():
        if isinstance(values, dict):
            d.setdefault(section, {}).update(values)
        else:
            d[section] = values
    return FlowtrainConfig.model_validate(d)


def assert_resume_exact(straight: Any, interrupted: Any, stop: int) -> None:
    """Train config `straight` to its max_steps in one go, and `interrupted` (the same run, another output_dir) to
    `stop`, then resumed from its checkpoint to the same max_steps: the losses and the last checkpoint's trainable
    weights must be equal, bitwise."""
    from safetensors.torch import load_file

    from flowtrain.train.checkpoint import list_checkpoints
    from flowtrain.train.loop import train

    steps = straight.train.max_steps
    whole = train(straight, progress=False)
    interrupted.train.max_steps = stop
    first = train(interrupted, progress=False)
    interrupted.train.max_steps = steps
    second = train(interrupted, resume="latest", progress=False)
    assert (first.step, second.step) == (stop, steps)
    assert {**first.losses, **second.losses} == whole.losses  # exact float equality
    last = [list_checkpoints(c.output_dir)[-1][1] / "trainable.safetensors" for c in (straight, interrupted)]
    a, b = (load_file(str(p)) for p in last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class RecordingLoss(FlowMatchingLoss):
    """The flow-matching loss, recording the state the loop calls it in (`loss.name:
    flowtrain.testing.training:RecordingLoss`): autocast on?, deterministic algorithms on?, the dtype of v̂."""

    calls: list[dict[str, Any]] = []

    def __call__(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        RecordingLoss.calls.append(
            {
                "autocast": torch.is_autocast_enabled(ctx.pred.device.type),
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "pred_dtype": ctx.pred.dtype,
                "batch": ctx.pred.shape[0],
            }
        )
        return super().__call__(ctx)


@contextlib.contextmanager
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate keeps one process-wide AcceleratorState, and a second `Accelerator(mixed_precision=...)` with
    another precision in the same process raises. Tests that train with a precision other than the suite's usual
    "no" run inside this block, which resets that state before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
