"""The pieces of "one failing process stops the run": the fault hook, what counts as a lost peer, the launcher's
exit code, and that a single process sees no change (the 2-process behaviour: tests/dist/test_failures_ddp.py)."""

from __future__ import annotations

import signal

import pytest

from flowtrain.train import faults
from flowtrain.train.errors import EXIT_INTERRUPTED, EXIT_PEER_FAILED
from flowtrain.train.failures import launcher_exit_code, lost_peer, one_failure_stops_all

TERM, KILL = -int(signal.SIGTERM), -int(signal.SIGKILL)


def test_fault_spec_parses_and_refuses_typos():
    assert faults.parse_faults("step@1:3, checkpoint@0:2") == {("step", 1, 3), ("checkpoint", 0, 2)}
    assert faults.parse_faults("") == set()
    for bad in ("step@1", "stpe@1:3", "step@x:3", "step1:3"):
        with pytest.raises(ValueError, match=faults.TEST_FAULT_ENV):
            faults.parse_faults(bad)


def test_faults_fire_only_on_their_rank_and_step(monkeypatch):
    monkeypatch.delenv(faults.TEST_FAULT_ENV, raising=False)
    faults.at_step(1, 3)  # unset: nothing
    monkeypatch.setenv(faults.TEST_FAULT_ENV, "step@1:3,checkpoint@0:2")
    faults.at_step(0, 3)
    faults.at_step(1, 2)
    faults.at_checkpoint(1, 2)
    with pytest.raises(faults.InjectedFault, match="rank 1 at step 3"):
        faults.at_step(1, 3)
    with pytest.raises(OSError, match="rank 0 for checkpoint-2"):
        faults.at_checkpoint(0, 2)


@pytest.mark.parametrize(
    ("codes", "first", "expected"),
    [
        ({0: EXIT_INTERRUPTED, 1: EXIT_INTERRUPTED}, 1, EXIT_INTERRUPTED),  # a preemption: both saved and stopped
        ({0: TERM, 1: EXIT_INTERRUPTED}, 1, EXIT_INTERRUPTED),  # rank 0 killed by the launcher after it saved
        ({0: TERM, 1: 2}, 1, 2),  # rank 1 failed (bad data): its code, not the launcher's SIGTERM to rank 0
        ({0: EXIT_PEER_FAILED, 1: 74}, 1, 74),
        ({0: 74, 1: 74}, 0, 74),
        ({0: EXIT_PEER_FAILED, 1: KILL}, 0, 128 + int(signal.SIGKILL)),  # a stuck rank the launcher had to kill
        ({0: 3, 1: 74}, 1, 74),  # two different causes: the first to fail
        ({0: EXIT_PEER_FAILED, 1: TERM}, 0, 1),  # no cause known
        ({0: 2}, None, 2),  # one process
    ],
)
def test_launcher_exit_code_is_the_cause(codes, first, expected):
    assert launcher_exit_code(codes, first) == expected


def test_lost_peer_recognises_transport_failures_only():
    assert lost_peer(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1943. This is typically"))
    assert lost_peer(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation to complete"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not lost_peer(ValueError("Connection closed by peer"))  # not what torch raises


def test_single_process_errors_pass_through_unchanged(tmp_path):
    err = RuntimeError("Connection closed by peer")  # even one that looks like a lost peer: there is no peer
    with pytest.raises(RuntimeError) as got, one_failure_stops_all(tmp_path, 30.0):
        raise err
    assert got.value is err
