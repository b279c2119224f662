"""Kill -9 at random points (inside steps and inside checkpoint writes) of a Wan LoRA run on video batches, resume
from `latest` each time: the loss sequence and the final weights equal an uninterrupted run's, bitwise.

Subprocess runs of `flowtrain train` (each start imports torch and diffusers): slow. FLOWTRAIN_KILL_POINTS sets the
number of kills (default 4 here)."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowtrain.testing import killharness as kh
from flowtrain.testing.data import tiny_config_dict

STEPS = 10


@pytest.mark.slow
def test_sigkill_anywhere_on_video_batches_then_resume_equals_uninterrupted(wan_dir, video_cache, tmp_path):
    cfg = tiny_config_dict(wan_dir, video_cache, tmp_path / "unused", "wan")
    cfg["train"] |= {"max_steps": STEPS, "caption_dropout": 0.2, "log_every": 1}
    cfg["lora"] |= {"dropout": 0.1}
    cfg["dataset"] |= {"latent_sampling": "sample"}  # every random draw a step makes is exercised
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    cfg["timesteps"] = {"shift_mode": "resolution"}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref = tmp_path / "ref"
    with open(tmp_path / "ref.log", "wb") as log:  # the uninterrupted run, alongside the killed one
        proc = subprocess.Popen(kh.train_command(config, ref, resume=False), env=kh.child_env(), stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        kills = kh.kill_points(default=4)
        out = tmp_path / "killed"
        res = kh.kill_and_resume(config, out, STEPS, kills=kills, seed=17)
        assert res.final_returncode == 0, (tmp_path / "killed.log").read_text(errors="replace")[-4000:]
        assert proc.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text(errors="replace")[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(res.kills) == kills and all(k.returncode == -9 for k in res.kills), res.kills
    assert any(k.in_write for k in res.kills) and any(not k.in_write for k in res.kills), res.kills
    got, want = kh.loss_sequence(out), kh.loss_sequence(ref)
    assert [s for s, *_ in got] == list(range(1, STEPS + 1)) and got == want
    a, b = kh.final_weights(out), kh.final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (out, ref))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert any(la[k].abs().sum() > 0 for k in la if "lora_B" in k)  # it trained
