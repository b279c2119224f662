"""Two CPU processes under `accelerate launch`: SIGTERM to one rank stops both at the same step with one
checkpoint (both ranks' RNG state in it), and resuming on two processes is bitwise exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flowtrain.testing import killharness as kh
from flowtrain.train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _launch(cfg: Path, out: Path, port: int, resume: bool) -> list[str]:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "flowtrain", "train", str(cfg), f"output_dir={out}", "--quiet"]  # fmt: skip
    return cmd + (["--resume_from_checkpoint", "latest"] if resume else [])


def _env() -> dict[str, str]:
    return kh.child_env({"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the training process with RANK=rank (torchrun sets it in each worker's environment)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != launcher):
        try:
            env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env and b"flowtrain" in cmdline:
            return pid
    return None


def test_sigterm_to_one_rank_stops_all_and_resume_is_exact(tiny_pipeline_dir, tiny_cache, tmp_path):
    d = {
        "model": {"pretrained": str(tiny_pipeline_dir), "max_sequence_length": 32, "dtype": "float32"},
        "dataset": {"cache_dir": str(tiny_cache[1])},
        "train": {"max_steps": 8, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1},
        "lora": {"rank": 4, "dropout": 0.1},
        "checkpoint": {"every_steps": None},
        "tracking": {"report_to": ["jsonl"]},
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(d))
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = subprocess.run(_launch(cfg, ref, 29531, False), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    launcher = subprocess.Popen(_launch(cfg, run, 29532, False), env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = run / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    pid = _worker_of_rank(launcher.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # only rank 1 hears it, as when a node-local agent forwards a preemption
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0  # the workers exit with 75, which torchrun reports as a failure
    assert "stopped by SIGTERM" in output, output[-3000:]
    ((step, path),) = list_checkpoints(run)
    assert 3 <= step < 8 and (path / "rng-rank0.json").exists() and (path / "rng-rank1.json").exists()

    proc = subprocess.run(_launch(cfg, run, 29533, True), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert kh.loss_sequence(run) == kh.loss_sequence(ref)
    a, b = kh.final_weights(run), kh.final_weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
