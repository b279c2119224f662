"""SIGTERM / SIGINT: finish the step, write a checkpoint, exit 75; resume continues exactly. A second signal aborts
at once and still leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from flowtrain.testing import killharness as kh
from flowtrain.train import loop as loop_mod
from flowtrain.train.checkpoint import TEST_SLEEP_ENV, list_checkpoints, verify_checkpoint
from flowtrain.train.control import StopSignals
from flowtrain.train.errors import EXIT_INTERRUPTED
from flowtrain.train.loop import train


def _rows(out: Path) -> int:
    path = out / "logs" / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sigterm_writes_checkpoint_exits_75_and_resume_is_exact(reference_run, tmp_path):
    out = tmp_path / "run"
    # No periodic checkpoints: the one checkpoint before the resume is the one the signal asked for. (The
    # reference saves every step; saving must not change the numbers either.)
    # Rows reach metrics.jsonl at once (tracking.flush_every_s=0): the test reads them to know training is under way.
    overrides = ["checkpoint.every_steps=null", "tracking.flush_every_s=0"]
    cmd = kh.train_command(reference_run.config, out, overrides, resume=False)
    proc = subprocess.Popen(cmd, env=kh.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _rows(out) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    stopped = list_checkpoints(out)
    assert len(stopped) == 1, stopped
    step, path = stopped[0]
    assert 4 <= step < reference_run.max_steps and verify_checkpoint(path) is None
    assert "received SIGTERM" in stderr and f"stopped by SIGTERM at step {step}" in stderr
    assert "--resume_from_checkpoint latest" in stderr and "Traceback" not in stderr
    assert _rows(out) == step  # the step in progress was finished and logged, nothing after it
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # no final export for an interrupted run

    rc = kh.run_once(kh.train_command(reference_run.config, out, ["checkpoint.every_steps=null"]), kh.child_env(),
                     tmp_path / "resume.log")  # fmt: skip
    assert rc == 0, (tmp_path / "resume.log").read_text()[-3000:]
    ref = reference_run.wait()
    assert kh.loss_sequence(out) == kh.loss_sequence(ref)
    a, b = kh.final_weights(out), kh.final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_signal_aborts_at_once_and_keeps_previous_checkpoint(reference_run, tmp_path):
    out = tmp_path / "run"
    cmd = kh.train_command(reference_run.config, out, ["checkpoint.every_steps=3"], resume=False)
    # The test hook holds every checkpoint write open for 4 s after its first files are written.
    env = kh.child_env({TEST_SLEEP_ENV: "4"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait(lambda: (out / ".checkpoint-6.tmp" / "optimizer.pt").exists(), proc)
    proc.send_signal(signal.SIGTERM)  # first: "finish the step and save" — the process is inside a write
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # second: abort now, without finishing that write
    _, stderr = proc.communicate(timeout=60)
    # A graceful stop would have finished checkpoint-6 and exited 75; the abort ends the process by the signal.
    assert proc.returncode == -signal.SIGTERM, stderr[-3000:]
    assert "received SIGTERM" in stderr
    assert [s for s, _ in list_checkpoints(out)] == [3] and verify_checkpoint(out / "checkpoint-3") is None
    assert (out / ".checkpoint-6.tmp").exists()  # the interrupted write: never `latest`, removed by the next save


# ---- in-process: fast checks of the same machinery ----------------------------------------------------------


def _signal_at(monkeypatch, at_step: int, signum: int = signal.SIGTERM) -> None:
    """Deliver `signum` to this process from inside step index `at_step` (its first micro-batch)."""
    real = loop_mod.step_seed

    def step_seed(seed, step, micro, rank):
        if step == at_step and micro == 0:
            signal.raise_signal(signum)
        return real(seed, step, micro, rank)

    monkeypatch.setattr(loop_mod, "step_seed", step_seed)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_in_process_stop_request_finishes_step_and_saves(rel_cfg, tmp_path, monkeypatch, signum):
    """The signal arrives inside step 5 (index 4): step 5 is finished and saved, then train() returns. (That the
    resume from such a checkpoint is exact is checked by the SIGTERM test above and by test_resume_exact.)"""
    # Python's own SIGINT handler, as an interactive process has it: a disposition left behind by whatever ran
    # earlier in this process (an ignored SIGINT is kept ignored, by design) is not what this test is about.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _stop_request_finishes_step_and_saves(rel_cfg, tmp_path, monkeypatch, signum)
    finally:
        signal.signal(signal.SIGINT, inherited)


def _stop_request_finishes_step_and_saves(rel_cfg, tmp_path, monkeypatch, signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _signal_at(monkeypatch, at_step=4, signum=signum)
    res = train(rel_cfg(tmp_path / "r", train={"max_steps": 8}, checkpoint={"every_steps": None}), progress=False)
    assert res.interrupted == signal.Signals(signum).name and res.step == 5 and sorted(res.losses) == [1, 2, 3, 4, 5]
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [5]
    # 8 rows, batch 2: 4 batches an epoch, so after 5 steps the data position is epoch 1, batch 1
    state = json.loads((tmp_path / "r" / "checkpoint-5" / "state.json").read_text())
    assert state["data"] == {"epoch": 1, "batch": 1, "seed": 0} and state["step"] == 5
    assert not (tmp_path / "r" / "pytorch_lora_weights.safetensors").exists()
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored


def test_stop_signals_outside_main_thread_is_a_no_op():
    seen = []

    def body():
        with StopSignals() as stop:
            seen.append(stop.requested)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [None] and signal.getsignal(signal.SIGTERM) == before


def test_second_sigint_in_process_raises_keyboard_interrupt_and_ignored_signals_stay_ignored():
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignals() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job started by a shell script
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
