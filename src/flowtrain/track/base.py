"""The tracker interface: one small Protocol that every backend (MLflow, JSONL, TensorBoard, W&B) implements,
and `MultiTracker`, which fans every call out to several of them.

Values are plain Python: metrics are `{name: float | None}` (None means "not measured this step" and is skipped
by backends that can't store it), images and artifacts are files already written under the run dir, so each
backend only uploads / copies / references them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class Tracker(Protocol):
    """Where a run's params, per-step metrics, images and files go."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat `{dotted.key: scalar}` run parameters (the resolved config)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float | None]) -> None:
        """Scalar metrics of optimizer step `step`. A backend with a `flush()` method may hold rows until it is
        called (or until `close`)."""

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        """PNG files written at `step`, by display name (e.g. `samples/step000100_00_0.png`)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or folder to keep with the run, under `artifact_path` (None: the run's root)."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and finish the run; `status` is FINISHED, FAILED or KILLED."""


class MultiTracker:
    """Fans every call out to `trackers`, in order. An empty MultiTracker is the no-op tracker that non-main
    processes get, so the loop calls it unconditionally.

    A backend that fails while logging (a tracking server gone away, a full disk) is reported once and then
    dropped: losing a dashboard must not kill a training run. Failures while *opening* a backend are not caught
    here; they stop the run before the first step, which is when a user can still fix them.
    """

    def __init__(self, trackers: Sequence[Tracker] = (), *, flush_every_s: float = 0.0):
        self.trackers: list[Tracker] = list(trackers)
        self.flush_every_s = flush_every_s
        self._flushed = time.monotonic()

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # keep training; see the class docstring
                log.warning("tracker %s failed in %s (%s); it is disabled for the rest of the run", _name(t), method, e)
                self.trackers.remove(t)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each("log_params", params)

    def log_metrics(self, step: int, metrics: Mapping[str, float | None]) -> None:
        self._each("log_metrics", step, metrics)
        if time.monotonic() - self._flushed >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Hand every row logged so far to the backends that buffer them (those with a `flush()`): at most every
        `flush_every_s` from `log_metrics`, and whenever the loop needs the record to be complete (a checkpoint).

        Why buffer: a row a step costs each backend a system call (a file flush, a pipe write that wakes the MLflow
        process), ~0.1 ms of a ~10 ms step on a small model. A kill -9 loses at most the last `flush_every_s` of
        rows, all of them after the last checkpoint. Flushed in reverse order, so the first backend (`metrics.jsonl`,
        which `open_tracking` always opens first) never holds a row the others lack.
        """
        for t in reversed(list(self.trackers)):
            if hasattr(t, "flush"):
                try:
                    t.flush()
                except Exception as e:  # keep training; see the class docstring
                    log.warning("tracker %s failed in flush (%s); it is disabled for the rest of the run", _name(t), e)
                    self.trackers.remove(t)
        self._flushed = time.monotonic()

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        if images:
            self._each("log_images", step, images)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._each("log_artifact", Path(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.trackers = []

    def get(self, kind: type) -> Any | None:
        """The first backend of class `kind`, if any (e.g. for tests and for printing where things went)."""
        return next((t for t in self.trackers if isinstance(t, kind)), None)


def _name(tracker: Any) -> str:
    return type(tracker).__name__
