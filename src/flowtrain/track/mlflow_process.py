"""MLflow in a child process: the default way a training run is tracked in MLflow (`tracking.mlflow_async`).

Why a child process. In the training process MLflow cost, before the first optimizer step, ~4–6 s (importing it,
creating the SQLite store, opening the run, logging params) and ~190 MiB of resident memory for the whole run
(measured on the 2-core dev VM: +189 MiB RSS, 4.4 s blocked). Doing the same work in a background thread keeps the
wait but not the memory, and it competes for the GIL: a thread importing MLflow slowed a 1-thread torch loop in the
main thread 2.7× while it ran (1.14 → 3.06 s), i.e. exactly the first steps. A child process owns the import, the
store and the memory; the training process only writes JSON lines into a pipe (~+4 MiB, 0.4 ms to spawn), and the
child runs at a lower CPU priority, so it takes cores only when training leaves them idle.

The child is started early (`flowtrain.track.start_tracking`, before the model loads): it imports MLflow and, on
`warm`, creates the store meanwhile, so by the first step it is ready and the end of training hardly waits for it.

Protocol: one JSON object per line on the child's stdin, in call order: `warm` (optional: the store URI), `open`
(the MlflowTracker arguments and the log level), then `log_params` / `log_metrics` / `log_images` / `log_artifact`,
then `draw_graphs` (optional: the end-of-run graphs, drawn and logged here) and `close`. The child answers
nothing; it exits 0 after `close`. Metrics are batched there (`MlflowTracker.flush`, at most ~2 s behind), with
the timestamps the training process took, so the record is the one `tracking.mlflow_async: false` writes.

Lifetimes (nothing outlives the trainer, and nothing is lost that reached the pipe):
  - `close()` (end of training, or `atexit` after an exception: status FAILED) sends `close` and waits for the
    child to finish writing (at most `_CLOSE_TIMEOUT_S`, then it is killed with a warning).
  - The trainer killed (kill -9, out of memory): the child reads what is left in the pipe, writes it, marks the
    run FAILED and exits. It notices by end-of-file on stdin or by its parent pid changing (a forked data loader
    worker may hold the pipe open a little longer), and gives itself `_DRAIN_S` to do it.
  - The child dies or fails: the next call in the trainer raises, `MultiTracker` warns once and drops MLflow;
    training goes on and `metrics.jsonl` keeps everything.
  - Ctrl-C / SIGTERM reach the child too when sent to the process group: it ignores them, because the trainer
    handles them (checkpoint, then `close("KILLED")`) and the child must stay to record that.
A resume waits (up to `_DRAIN_S`) for a previous child still draining into the same run dir, through a lock on
`logs/mlflow_run.lock`, so the old child cannot mark the reopened run FAILED after the new one set it RUNNING.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from flowtrain.track.mlflow_store import RUN_FILE, local_store_uri, param_value, telemetry_off_by_default

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 600.0  # the final artifacts (a full fine-tune's weights) are copied/uploaded before the child exits
_DRAIN_S = 60.0  # how long an orphaned child may take to write what its dead trainer had sent
_POLL_S = 1.0  # how often an idle child checks that its trainer is still there
LOCK_FILE = "logs/mlflow_run.lock"


class MlflowProcessTracker:
    """The training process's side: a `Tracker` that forwards every call to the child process.

    Made in two steps so the child can start early: the constructor starts the child, which imports MLflow while
    the trainer loads the model; `open()` (when the resume step is known) tells it which run to open or continue.
    No call blocks on MLflow: the pipe is non-blocking, and what the pipe cannot take yet (the child still busy)
    waits in `_unsent` for the next call; only `close()` waits.
    """

    def __init__(self, store_uri: str | None = None) -> None:
        """`store_uri`: the tracking URI, if known already; the child then also creates / migrates the store."""
        env = dict(os.environ)
        telemetry_off_by_default(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowtrain.track.mlflow_process"], stdin=subprocess.PIPE, env=env, bufsize=0
        )
        assert self.proc.stdin is not None
        self._fd = self.proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._unsent = bytearray()
        self._rows: list[tuple[int, dict[str, float | None], int]] = []  # logged metrics not yet encoded
        self._opened = self._closed = False
        self.uri = ""
        atexit.register(self._abandon)
        if store_uri:
            self._send("warm", uri=store_uri)

    @property
    def waiting(self) -> bool:
        """Started, and not yet given a run (nor discarded)."""
        return not (self._opened or self._closed)

    def open(
        self,
        output_dir: str | Path,
        *,
        uri: str | None = None,
        experiment_name: str = "flowtrain",
        run_name: str | None = None,
        resume_step: int | None = None,
    ) -> MlflowProcessTracker:
        """Have the child open the run (`MlflowTracker`'s arguments); returns self."""
        out = Path(output_dir).resolve()
        self.uri = uri or local_store_uri(out)
        opened = {"output_dir": str(out), "uri": uri, "experiment_name": experiment_name, "run_name": run_name}
        level = logging.getLogger().getEffectiveLevel()
        self._send("open", **opened, resume_step=resume_step, log_level=level)
        self._opened = True
        return self

    # ---- Tracker ---------------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        # As MLflow will show them (strings), so any config value crosses the pipe.
        self._send("log_params", params={k: param_value(v) for k, v in params.items()})

    def log_metrics(self, step: int, metrics: Mapping[str, float | None]) -> None:
        # Kept as is; encoded and written into the pipe at `flush()` (MultiTracker: at most ~1 s later) or with the
        # next other call, all at once rather than inside every training step.
        self._rows.append((step, dict(metrics), int(time.time() * 1000)))

    def flush(self) -> None:
        """Write the queued rows into the pipe (as much as it takes now; the rest goes with the next call)."""
        self._send(None)

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        self._send("log_images", step=step, images={k: str(Path(p).resolve()) for k, p in images.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._send("log_artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def draw_graphs(self, output_dir: Path) -> None:
        """Have the child write `{output_dir}/graphs/` (`flowtrain plot`) and log it as the `graphs` artifact."""
        self._send("draw_graphs", output_dir=str(Path(output_dir).resolve()))

    def close(self, status: str = "FINISHED") -> None:
        """Send `close` and wait until the child has written everything and ended the run."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._abandon)
        try:
            if self._opened:  # a child that was never given a run ends at end-of-file
                self._send("close", status=status)
            os.set_blocking(self._fd, True)
            self._write(block=True)
        finally:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            code = self._wait()
        if code != 0:
            raise RuntimeError(f"the MLflow process ended with exit code {code} (its message is above)")

    def ui_hint(self) -> str:
        """What to run / open to see the run (its id is in `{output_dir}/logs/mlflow_run.json` once opened)."""
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri}"
        return f"tracking URI {self.uri}"

    # ---- the pipe --------------------------------------------------------------------------------------------
    def _encode_rows(self) -> None:
        """Move the logged metric rows into `_unsent`, in order, ahead of whatever is queued next."""
        rows, self._rows = self._rows, []
        for step, metrics, timestamp_ms in rows:
            values = {k: None if v is None else float(v) for k, v in metrics.items()}
            self._unsent += _line("log_metrics", step=step, metrics=values, timestamp_ms=timestamp_ms)

    def _send(self, op: str | None, **fields: Any) -> None:
        """Queue the logged metric rows, then `op` (None: nothing else), and write the queue into the pipe."""
        code = self.proc.poll()
        if code is not None:
            self._closed = True  # nothing left to close at exit; the caller (MultiTracker) drops this tracker
            atexit.unregister(self._abandon)
            raise RuntimeError(f"the MLflow process has ended (exit code {code}; its message is above)")
        self._encode_rows()
        if op is not None:
            self._unsent += _line(op, **fields)
        self._write(block=False)

    def _write(self, *, block: bool) -> None:
        """Write as much of `_unsent` as the pipe takes (all of it when `block`)."""
        view = memoryview(self._unsent)
        sent = 0
        try:
            while sent < len(view):
                try:
                    sent += os.write(self._fd, view[sent:])
                except BlockingIOError:
                    if block:
                        raise
                    break
        except BrokenPipeError:
            raise RuntimeError("the MLflow process has ended (its message is above)") from None
        finally:
            view.release()
            del self._unsent[:sent]

    def _wait(self) -> int:
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.info("waiting for MLflow to finish writing the run (at most %.0f s)", _CLOSE_TIMEOUT_S)
        try:
            return self.proc.wait(timeout=_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the MLflow process did not finish in %.0f s; it is stopped (metrics.jsonl is complete)",
                        _CLOSE_TIMEOUT_S)  # fmt: skip
            self.proc.kill()
            return self.proc.wait()

    def discard(self) -> None:
        """End a child that was started but never opened a run (building the run failed); no-op otherwise. Not
        waited for: it has nothing to write, and leaves at end-of-file once its import is done."""
        if not self._opened and not self._closed:
            self._closed = True
            atexit.unregister(self._abandon)
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]

    def _abandon(self) -> None:
        """At interpreter exit, a run that was never closed (training raised) is marked FAILED."""
        with contextlib.suppress(Exception):  # the child may be gone already; nothing useful to do then
            self.close("FAILED")


def _line(op: str, **fields: Any) -> bytes:
    """One message of the protocol: a JSON object on one line."""
    return (json.dumps({"op": op, **fields}) + "\n").encode()


# ---- the child ---------------------------------------------------------------------------------------------------
def _read_lines(stream: BinaryIO, lines: queue.Queue[bytes | None]) -> None:
    """Move stdin into `lines` as fast as it comes (None: end of file), so the trainer's pipe never fills while
    the child is importing MLflow or writing to the store."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _lock_run_dir(output_dir: Path) -> Any:
    """An exclusive lock on `logs/mlflow_run.lock` for this child's lifetime (released when it exits, however).
    Waits for a previous child (of a killed trainer) that is still writing to the same run, at most `_DRAIN_S`."""
    import fcntl

    path = output_dir / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")  # noqa: SIM115  kept open (and locked) until the process exits
    deadline = time.monotonic() + _DRAIN_S
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning("mlflow: another process still holds %s; going on without waiting for it", path)
                return fh
            time.sleep(0.1)


def _exit_after(seconds: float) -> None:
    """Bound an orphaned child's life: a store or server that hangs must not keep it around."""

    def stop() -> None:
        time.sleep(seconds)
        log.warning("mlflow: could not finish writing in %.0f s after training ended; giving up", seconds)
        os._exit(3)

    threading.Thread(target=stop, daemon=True).start()


def serve(stream: BinaryIO) -> int:
    """The child's main loop: open the run, then apply each message in order until `close` or the trainer is gone.
    Returns the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # see the module docstring
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Training comes first, from the start: the child takes cores the trainer leaves idle (its imports and model
    # load are mostly one thread). Measured on the shared 2-core VM with another engineer's benchmark on one core
    # (benchmarks/tracking.py, 4 reps): niced from the start, the first step came 1.05-1.6× JSONL-only's and the
    # trainer waited up to ~10 s at the end for the starved child; niced only once the run was open, the import and
    # store creation competed with the trainer's start and the first step came 1.8× JSONL-only's (the in-process
    # path: 1.6×). Time to the first step is what users wait for at every start, so: niced from the start.
    with contextlib.suppress(OSError):
        os.nice(10)
    parent = os.getppid()
    lines: queue.Queue[bytes | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(stream, lines), daemon=True).start()
    import mlflow.tracking  # noqa: F401  the slow part (seconds), done while the trainer loads its model

    from flowtrain.track.mlflow_store import MlflowTracker

    first = _first(lines, parent)
    if first is not None and json.loads(first)["op"] == "warm":
        if None not in list(lines.queue):  # not if the trainer has given up already (its output may be restored)
            _warm(json.loads(first)["uri"])
        first = _first(lines, parent)
    if first is None:  # the trainer ended (or failed to build the run) before opening one
        return 0
    opened = json.loads(first)
    logging.basicConfig(level=opened.pop("log_level"), format="%(message)s")
    for noisy in ("mlflow", "alembic"):  # MLflow configures its loggers on import; only its warnings matter here
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    out = Path(opened["output_dir"])
    _lock = _lock_run_dir(out)  # noqa: F841  held until exit

    try:
        tracker = MlflowTracker(
            out, uri=opened["uri"], experiment_name=opened["experiment_name"], run_name=opened["run_name"],
            resume_step=opened["resume_step"], async_metrics=False,
        )  # fmt: skip
    except Exception as e:
        log.warning("mlflow: could not open the run at %s (%s); training goes on, metrics.jsonl has everything",
                    opened["uri"] or local_store_uri(out), e)  # fmt: skip
        return 1
    log.debug("MLflow run %s%s (%s)", tracker.run_id, " (resumed)" if tracker.resumed else "", out / RUN_FILE)
    orphaned = False
    drawing_ready = False
    while True:
        try:
            line = lines.get(timeout=max(0.01, min(_POLL_S, tracker.flush_due_in())))
        except queue.Empty:
            if tracker.flush_due_in() <= 0:
                tracker.flush()
            if not drawing_ready:  # the end-of-run graphs' imports and fonts (~1 s), while training leaves it idle
                drawing_ready = True
                from flowtrain.track.plots import warm_up

                warm_up()
            if os.getppid() != parent and not orphaned:  # the trainer is gone; a forked worker holds the pipe
                orphaned = True
                _exit_after(_DRAIN_S)
            if orphaned and lines.empty():
                line = None
            else:
                continue
        if line is None:  # the trainer ended without close(): killed
            if not orphaned:
                _exit_after(_DRAIN_S)
            tracker.close("FAILED")
            return 0
        msg = json.loads(line)
        op = msg.pop("op")
        try:
            if op == "close":
                tracker.close(msg["status"])
                return 0
            _apply(tracker, op, msg)
        except Exception as e:  # as MultiTracker does in-process: report once, stop tracking, training goes on
            log.warning("mlflow: %s failed (%s); MLflow tracking is disabled for the rest of the run", op, e)
            with contextlib.suppress(Exception):
                tracker.close("FAILED")
            return 1


def _first(lines: queue.Queue[bytes | None], parent: int) -> bytes | None:
    """The next line before a run is open; None at end-of-file or once the trainer is gone."""
    while True:
        try:
            return lines.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # what the trainer sent is all in `lines` by now
                return None


def _warm(uri: str) -> None:
    """Create (or migrate) the store while the trainer still loads its model: a new SQLite store takes seconds of
    schema migrations. A failure is left for `open` to report."""
    from mlflow.tracking import MlflowClient

    from flowtrain.track.mlflow_store import seed_local_store

    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    with contextlib.suppress(Exception):
        seed_local_store(uri)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _apply(tracker: Any, op: str, msg: dict[str, Any]) -> None:
    """One forwarded call on the real `MlflowTracker`."""
    if op == "log_params":
        tracker.log_params(msg["params"])
    elif op == "log_metrics":
        tracker.log_metrics(msg["step"], msg["metrics"], timestamp_ms=msg["timestamp_ms"])
    elif op == "log_images":
        tracker.log_images(msg["step"], {k: Path(p) for k, p in msg["images"].items()})
    elif op == "log_artifact":
        tracker.log_artifact(Path(msg["path"]), msg["artifact_path"])
    elif op == "draw_graphs":
        from flowtrain.track import _plot_here

        out = Path(msg["output_dir"])
        _plot_here(out)
        if (out / "graphs").is_dir():
            tracker.log_artifact(out / "graphs", "graphs")
    else:
        raise ValueError(f"unknown message {op!r}")


if __name__ == "__main__":
    from flowtrain.exit import exit_now

    exit_now(serve(sys.stdin.buffer))  # the run is closed by now: skip MLflow's and SQLAlchemy's teardown
