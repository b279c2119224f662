"""Run control: stop requests (SIGTERM / SIGINT), time-based saves, non-finite steps, deterministic mode.

Every decision that changes what the processes do next (skip this step, save now, stop) is agreed on by all of
them in one small all-reduce per step, so under DDP no rank waits at a barrier the others never reach.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch

from flowtrain.train.errors import NonFiniteLossError

log = logging.getLogger(__name__)


class StopSignals:
    """Context manager. The first SIGTERM / SIGINT sets `requested` (the loop finishes the current step, writes a
    checkpoint and exits with EXIT_INTERRUPTED); a second one aborts at once: the handler that was there before
    runs (Python's SIGINT handler raises KeyboardInterrupt), or, if that was the default action, the signal is
    re-delivered with it and ends the process. Handlers exist only in the main thread and are restored on exit;
    a signal the process was started ignoring (SIGINT of a background job) stays ignored.

    DataLoader workers forked while the handlers are installed inherit them, so a Ctrl-C sent to the whole
    process group does not kill the workers before the checkpoint is written.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.requested).name if self.requested else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # second signal: abort now
            previous = self._previous.get(signum, signal.SIG_DFL)
            if callable(previous):
                signal.signal(signum, previous)
                previous(signum, frame)
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum
        # No logging here: a handler runs between two bytecodes of whatever the main thread was doing.
        sys.stderr.write(
            f"\nflowtrain: received {signal.Signals(signum).name}: finishing the current step and writing a "
            "checkpoint (send it again to abort at once)\n"
        )
        sys.stderr.flush()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()


class SaveClock:
    """`checkpoint.every_minutes`: is a time-based save due? Only the main process's clock counts (see agree)."""

    def __init__(self, every_minutes: float | None):
        self.period = every_minutes * 60.0 if every_minutes else None
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.period is not None and time.monotonic() - self.last >= self.period

    def saved(self) -> None:
        self.last = time.monotonic()


def agree(accelerator: Any, flags: list[torch.Tensor | float | bool]) -> list[bool]:
    """Each flag true on any process → true on all of them. One host sync, plus one all-reduce when distributed.

    This per-step sync is what the non-finite check costs (the loss must be known before the optimizer step);
    host-side flags (signal, clock) travel in the same reduction, so they add nothing.
    """
    if accelerator.num_processes == 1:  # read the device flags (one sync); host flags need no transfer
        return [bool(f.item()) if isinstance(f, torch.Tensor) else bool(f) for f in flags]
    device = accelerator.device
    t = torch.stack([torch.as_tensor(f, dtype=torch.float32).to(device).reshape(()) for f in flags])
    return [v > 0 for v in accelerator.reduce(t, reduction="sum").tolist()]


def nonfinite_flag(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """A 0-dim bool tensor, True when the step's loss (or, when measured, the global grad norm) is NaN/inf. No sync.

    One check of their sum (this runs every step): NaN or ±inf in either makes it non-finite. Two finite values
    sum past float32's range only beyond ~1.7e38 each, a step that is lost either way.
    """
    x = loss.detach().float()
    if grad_norm is not None:
        x = x + torch.as_tensor(grad_norm, device=loss.device).float()
    return ~torch.isfinite(x)


class NonFiniteGuard:
    """`train.nonfinite`: `skip` drops the update of a non-finite step and counts it, stopping after
    `max_in_a_row` such steps in a row; `stop` stops at the first one. Stopping writes no checkpoint, so the last
    one stays a good one."""

    def __init__(self, policy: str, max_in_a_row: int, total: int = 0, in_a_row: int = 0):
        self.policy, self.max_in_a_row = policy, max_in_a_row
        self.total, self.in_a_row = total, in_a_row

    def state(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def update(
        self, bad: bool, step: int, rows: list[int], latest: Callable[[], str | None]
    ) -> NonFiniteLossError | None:
        """Record step `step`'s outcome; returns the error to stop with, else None (skip the update if `bad`).
        `latest()` names the newest checkpoint (only called when stopping)."""
        if not bad:
            self.in_a_row = 0
            return None
        self.total += 1
        self.in_a_row += 1
        where = f"step {step} (cache rows {rows} on this process)" if rows else f"step {step}"
        if self.policy == "stop" or self.in_a_row >= self.max_in_a_row:
            why = (
                "train.nonfinite=stop"
                if self.policy == "stop"
                else f"{self.in_a_row} in a row, train.max_nonfinite_in_a_row={self.max_in_a_row}"
            )
            last = latest()
            kept = f"the last checkpoint {last} is intact" if last else "no checkpoint was written yet"
            return NonFiniteLossError(
                f"non-finite loss or gradients at {where} ({why}); stopped without saving, {kept}. Lower "
                "train.learning_rate, enable train.max_grad_norm, check the data (NaN rows are reported with "
                "their key), or set train.nonfinite=skip; then resume with --resume_from_checkpoint latest."
            )
        log.warning(
            "non-finite loss or gradients at %s: update skipped (%d in a row, at most %d; %d skipped in total)",
            where,
            self.in_a_row,
            self.max_in_a_row,
            self.total,
        )
        return None


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """train.deterministic: deterministic torch kernels for the block (an op without one raises, naming itself),
    cuDNN autotuning off, and the cuBLAS workspace setting CUDA needs for deterministic matmuls. The previous
    global settings come back afterwards. Everything random in a step already comes from seeded generators."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
