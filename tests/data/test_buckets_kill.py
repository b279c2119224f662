"""Kill -9 on a bucketed cache (flowtrain.testing.killharness): killed at random points inside steps and inside
checkpoint writes, resumed from `latest` each time, the run's loss sequence and final weights equal an uninterrupted
run's bitwise. Batches of different buckets have different token counts, so a resume that lost its place in the
bucket order would change the losses."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

from flowtrain.testing import killharness as kh
from flowtrain.testing.buckets import make_bucketed_cache
from flowtrain.testing.data import tiny_config_dict

STEPS = 10  # 8 batches of 2 an epoch: the kills land in the first epoch and the run ends in the second


@pytest.mark.slow  # ~4 process starts per run on the shared 2-core machine
def test_sigkill_on_a_bucketed_cache_then_resume_equals_uninterrupted(tiny_pipeline_dir, tmp_path):
    _, cache = make_bucketed_cache(tmp_path / "data", tiny_pipeline_dir)
    cfg = tiny_config_dict(tiny_pipeline_dir, cache, tmp_path / "unused", max_steps=STEPS, caption_dropout=0.2,
                           log_every=1)  # fmt: skip
    cfg["dataset"]["latent_sampling"] = "sample"
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))

    ref = tmp_path / "ref"
    with open(tmp_path / "ref.log", "wb") as log:  # the uninterrupted run, alongside the killed ones
        proc = subprocess.Popen(kh.train_command(config, ref, resume=False), env=kh.child_env(), stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        out = tmp_path / "killed"
        res = kh.kill_and_resume(config, out, STEPS, kills=kh.kill_points(default=3), seed=7)
    finally:
        rc = proc.wait(timeout=900)
    assert rc == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert res.final_returncode == 0, (tmp_path / "killed.log").read_text(errors="replace")[-4000:]
    assert all(k.returncode == -9 for k in res.kills), [(k.phase, k.returncode, k.log_tail) for k in res.kills]

    got, want = kh.loss_sequence(out), kh.loss_sequence(ref)
    assert [s for s, *_ in got] == list(range(1, STEPS + 1))
    assert got == want
    a, b = kh.final_weights(out), kh.final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
