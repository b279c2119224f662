"""One failing process stops the whole distributed run: soon, with its own message printed once.

Under DDP every step has collectives (the gradient all-reduce, the per-step `control.agree`), so a process that
raises leaves the others blocked in a collective it will never join. Three things bound that wait:

- The failing process closes its process group as soon as the exception leaves the training loop, before any
  other cleanup: the others' pending and next collectives then fail at once ("Connection closed by peer"), even
  if the failing process takes a while to exit. The launcher (torchrun's agent) also stops the others when a
  process exits non-zero.
- Those others recognise a lost peer and stop with `PeerFailedError` (exit code EXIT_PEER_FAILED, one line that
  points at the other process's message) instead of a traceback of their own.
- A process that is stuck but alive closes nothing: `train.collective_timeout_minutes` (the process group's
  timeout) ends the others' wait. It must exceed the longest wait a healthy run has, e.g. the other processes
  waiting at a collective while the main process writes a full fine-tune's checkpoint or runs validation.

Failures that every process detects together (non-finite loss, a failed checkpoint write: `TrainingAborted`)
need none of this: every process raises the same error at the same step.

`launcher_exit_code` turns the exit codes of a launch's processes into the one the launcher should return
(`flowtrain launch`), so a job script can tell a preemption (75) from a crash.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path

from flowtrain.train.errors import EXIT_PEER_FAILED, PeerFailedError, TrainingAborted

log = logging.getLogger(__name__)

# What gloo (and NCCL through torch) say when the process at the other end is gone or silent. torch raises these
# as plain RuntimeErrors from inside backward / all_reduce, so the message is all there is to go by.
_LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out waiting")
_TIMED_OUT = "timed out"


def distributed() -> bool:
    """Whether this process belongs to an initialised torch.distributed group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lost_peer(e: BaseException) -> bool:
    """True when `e` says a collective failed because another process is gone or did not answer in time."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _LOST_PEER)


def close_process_group() -> None:
    """Leave the process group now, so that the other processes' collectives fail at once instead of waiting
    for this process to exit (or for the timeout). Errors are ignored: we are already failing."""
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.destroy_process_group()


@contextlib.contextmanager
def one_failure_stops_all(output_dir: Path, timeout_minutes: float) -> Iterator[None]:
    """Around a training run: a local exception closes the process group (the others stop at once) and is
    re-raised; a collective that failed because of another process becomes `PeerFailedError`. Nothing changes
    for a single process or for `TrainingAborted` errors, which all processes raise together."""
    try:
        yield
    except TrainingAborted:
        raise
    except BaseException as e:
        if not distributed():
            raise
        if lost_peer(e):
            close_process_group()
            raise PeerFailedError(_peer_message(e, output_dir, timeout_minutes)) from e
        close_process_group()
        raise


def _peer_message(e: BaseException, output_dir: Path, timeout_minutes: float) -> str:
    from flowtrain.train.checkpoint import list_checkpoints

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[/path/to/pair.cc:553] " source location
    first = first.split(". ")[0]  # "Connection closed by peer [host]:port", without gloo's advice after it
    if _TIMED_OUT in first.lower():
        why = (f"another process did not take part in a collective for train.collective_timeout_minutes="
               f"{timeout_minutes:g}: it is stuck or far slower than this one")  # fmt: skip
    else:
        why = "another process of this run failed; its own error message is above"
    ckpts = list_checkpoints(output_dir)
    kept = f"the last checkpoint {ckpts[-1][1]} is intact" if ckpts else "no checkpoint was written yet"
    return (f"{why} ({type(e).__name__}: {first[:300]}); this process stopped too and {kept}. Fix the cause, "
            "then resume with --resume_from_checkpoint latest.")  # fmt: skip


# The exit codes of processes that stopped *because* another one failed: they say nothing about the cause.
_CONSEQUENCES = frozenset({EXIT_PEER_FAILED, -signal.SIGTERM})


def launcher_exit_code(codes: Mapping[int, int], first_rank: int | None = None) -> int:
    """The exit code for a launch whose processes (rank → exit code; negative: killed by that signal) did not
    all succeed: the cause's code, so a job script sees what one process would have returned (75 after a
    preemption, 74 after a failed write, ...).

    Processes that stopped because of another one (EXIT_PEER_FAILED, or killed by the launcher's SIGTERM) are not
    causes. When the causes disagree, the first one to fail (`first_rank`) wins; a signal `s` maps to 128 + s as
    in a shell; with no cause at all, 1.
    """
    causes = {rank: code for rank, code in codes.items() if code != 0 and code not in _CONSEQUENCES}
    if len(set(causes.values())) == 1:
        code = next(iter(causes.values()))
    elif first_rank is not None and first_rank in causes:
        code = causes[first_rank]
    else:
        return 1
    return code if code > 0 else 128 - code
