"""Test hook: make one process of a run fail at a chosen point, to prove that every process stops.

`FLOWTRAIN_TEST_FAULT=<where>@<rank>:<step>` (several separated by commas) makes the process with that rank
  - `step`:       raise an exception at the start of optimizer step <step> (1-based, the step being taken);
  - `checkpoint`: fail its own part of the write of checkpoint-<step> (each process writes its RNG state);
  - `hang`:       stop taking part at the start of step <step>, alive but silent, until it is killed (what the
                  collective timeout is for).

It exists only for tests/dist/test_failures_ddp.py: a failure that only one process sees cannot be caused by real
data or a real disk on one machine in every case (the bad-batch test does use a real NaN row). Nothing reads it
unless it is set; it has no other use.
"""

from __future__ import annotations

import os
import time

TEST_FAULT_ENV = "FLOWTRAIN_TEST_FAULT"
WHERE = ("step", "checkpoint", "hang")


class InjectedFault(RuntimeError):
    """The exception a `FLOWTRAIN_TEST_FAULT` raises."""


def parse_faults(spec: str) -> set[tuple[str, int, int]]:
    """`"step@1:3,checkpoint@0:2"` → {("step", 1, 3), ("checkpoint", 0, 2)}; a malformed entry raises ValueError."""
    faults = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, at = item.partition("@")
        rank, _, step = at.partition(":")
        if where not in WHERE or not rank.isdigit() or not step.isdigit():
            raise ValueError(f"{TEST_FAULT_ENV}={spec!r}: expected <{'|'.join(WHERE)}>@<rank>:<step>, got {item!r}")
        faults.add((where, int(rank), int(step)))
    return faults


def _wanted(where: str, rank: int, step: int) -> bool:
    spec = os.environ.get(TEST_FAULT_ENV)
    return bool(spec) and (where, rank, step) in parse_faults(spec)


def at_step(rank: int, step: int) -> None:
    """Called by the loop before step `step` (1-based): raise or hang when the hook asks for it; else nothing."""
    if _wanted("hang", rank, step):
        while True:  # a stuck process: it ignores the stop flag and never reaches the next collective
            time.sleep(1.0)
    if _wanted("step", rank, step):
        raise InjectedFault(f"injected exception ({TEST_FAULT_ENV}) on rank {rank} at step {step}")


def at_checkpoint(rank: int, step: int) -> None:
    """Called by each process before it writes its part of checkpoint-`step`: raise OSError when asked to."""
    if _wanted("checkpoint", rank, step):
        raise OSError(f"injected write failure ({TEST_FAULT_ENV}) on rank {rank} for checkpoint-{step}")
