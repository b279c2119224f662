"""Exact resume of the autoencoder trainer: from a checkpoint in-process, and after kill -9 (mid-step and
mid-checkpoint-write) through the CLI. "Exact": the logged losses and the final weights (VAE, EMA, discriminator)
equal those of a run never interrupted, bitwise."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowtrain.autoencoder import load_autoencoder_config, train_autoencoder
from flowtrain.testing.killharness import child_env, latest_step
from flowtrain.train.checkpoint import TEST_SLEEP_ENV

from .conftest import REPO, tiny_overrides

DEMO = REPO / "configs/demo/autoencoder.yaml"
# GAN from step 2, EMA, free bits, a log window (3) that a checkpoint (every 4) cuts in the middle.
FEATURES = [
    "train.max_steps=12", "train.log_every=3", "checkpointing.every_steps=4", "checkpointing.keep_last=null",
    "gan.enabled=true", "gan.start_step=2", "gan.discriminator_layers=2", "gan.discriminator_channels=8",
    "ema.enabled=true", "ema.decay=0.9", "loss.free_bits=0.01",
]  # fmt: skip
VOLATILE = {"s_per_step", "time"}  # wall-clock


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows if "rec" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "diffusion_pytorch_model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def reference(digits_raw, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ae_ref") / "run"
    train_autoencoder(load_autoencoder_config(DEMO, tiny_overrides(digits_raw, out, *FEATURES)), progress=False)
    return out


def test_resume_from_a_checkpoint_continues_exactly(reference, digits_raw, tmp_path):
    assert sorted(p.name for p in reference.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4",
        "checkpoint-8",
    ]
    out = tmp_path / "resumed"
    cfg = load_autoencoder_config(DEMO, tiny_overrides(digits_raw, tmp_path / "unused", *FEATURES))
    result = train_autoencoder(cfg, run_dir=out, resume=reference / "checkpoint-4", progress=False)
    assert result.resumed_from == reference / "checkpoint-4" and result.step == 12
    ref_rows = _rows(reference)
    assert _rows(out) == [r for r in ref_rows if r["step"] > 4]  # step 6's window began before the checkpoint
    assert any("d" in r and "g" in r for r in ref_rows)
    _assert_same(_weights(out / "vae"), _weights(reference / "vae"))  # the EMA weights
    _assert_same(_weights(out / "vae_trained"), _weights(reference / "vae_trained"))
    _assert_same(
        load_file(str(out / "checkpoint-8/discriminator.safetensors")),
        load_file(str(reference / "checkpoint-8/discriminator.safetensors")),
    )


def test_resume_refuses_changed_essentials(reference, digits_raw, tmp_path):
    cfg = load_autoencoder_config(DEMO, tiny_overrides(digits_raw, tmp_path / "x", *FEATURES, "train.batch_size=4"))
    with pytest.raises(ValueError, match="batch_size"):
        train_autoencoder(cfg, resume=reference / "checkpoint-4", progress=False)


@pytest.mark.slow
def test_kill_9_mid_step_and_mid_write_then_resume_exactly(reference, digits_raw, tmp_path):
    """Kill -9 once inside a step after checkpoint-4, once inside checkpoint-8's write (paused by the test hook),
    then run to the end with `--resume_from_checkpoint latest`: same losses and weights as the reference."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "flowtrain", "autoencoder", str(DEMO), *tiny_overrides(digits_raw, out, *FEATURES),
           "--quiet", "--resume_from_checkpoint", "latest"]  # fmt: skip
    with open(tmp_path / "killed.log", "ab") as log:

        def start(extra: dict[str, str] | None = None) -> subprocess.Popen:
            return subprocess.Popen(cmd, env=child_env(extra), stdout=log, stderr=subprocess.STDOUT)

        def wait_for(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and not ready() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait()

        proc = start()  # 1: killed in the step right after checkpoint-4 is sealed
        wait_for(proc, lambda: latest_step(out) >= 4)
        assert latest_step(out) == 4
        proc = start({TEST_SLEEP_ENV: "30"})  # 2: resumes at 4, killed inside checkpoint-8's write
        tmp = out / ".checkpoint-8.tmp"
        wait_for(proc, lambda: (tmp / "optimizer.pt").exists())
        assert tmp.exists() and latest_step(out) == 4  # the half-written checkpoint is not `latest`
        done = subprocess.run(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, timeout=300)  # 3: to the end
        assert done.returncode == 0, (tmp_path / "killed.log").read_text()[-3000:]
        assert not tmp.exists()
        assert _rows(out) == _rows(reference)
        _assert_same(_weights(out / "vae"), _weights(reference / "vae"))
        _assert_same(_weights(out / "vae_trained"), _weights(reference / "vae_trained"))


def test_resume_latest_without_a_checkpoint_starts_over_with_a_clean_log(digits_raw, tmp_path):
    out = tmp_path / "early"
    cfg = load_autoencoder_config(DEMO, tiny_overrides(digits_raw, out, "train.max_steps=3"))
    first = train_autoencoder(cfg, progress=False)  # stands in for a first attempt killed before any checkpoint
    again = train_autoencoder(cfg, resume="latest", progress=False)
    assert again.resumed_from is None and [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert again.losses == first.losses  # the same fresh run
