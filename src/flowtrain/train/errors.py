"""Why a training run stopped early, and the process exit code each reason maps to (see docs/reliability.md).

Kept free of heavy imports: the CLI imports it to turn these into one clear message and a distinct exit code.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # bad config, missing files, incompatible cache: fix the input and run again
EXIT_NONFINITE = 3  # the loss/gradients went NaN/inf: resuming as is would diverge again
EXIT_CHECKPOINT_WRITE = 74  # EX_IOERR: a checkpoint could not be written (disk full, ...); the previous one is intact
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after writing a checkpoint; resume with `latest`
EXIT_PEER_FAILED = 76  # EX_PROTOCOL: another process of a distributed run failed (its message says why) or hung


class TrainingAborted(RuntimeError):
    """Training stopped before max_steps for a reason the user must act on; the message says what to do."""

    exit_code = 1


class NonFiniteLossError(TrainingAborted):
    """Non-finite loss or gradients under `train.nonfinite: stop`, or too many in a row under `skip`."""

    exit_code = EXIT_NONFINITE


class CheckpointWriteError(TrainingAborted):
    """A checkpoint could not be written; nothing of it was published and the previous checkpoint is intact."""

    exit_code = EXIT_CHECKPOINT_WRITE


class PeerFailedError(TrainingAborted):
    """A collective failed because another process of the run failed or stopped answering (see train.failures)."""

    exit_code = EXIT_PEER_FAILED
