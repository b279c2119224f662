"""A bucketed cache under DDP: two real CPU processes (`accelerate launch`, gloo) read disjoint rows of the same
bucket at every step, cover every row once an epoch, end with identical weights, and train like one process with
twice the batch (same global rows, same losses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowtrain.data.manifest import CacheManifest
from flowtrain.testing.buckets import make_bucketed_cache
from flowtrain.testing.data import tiny_config_dict
from flowtrain.testing.launch import accelerate_launch, cpu_env, ddp_args, run

STEPS, ROWS = 8, 16  # 4 buckets × 4 rows; a global batch of 4 → 4 steps an epoch, so 2 epochs
PORT = 29641
TIMEOUT = 900


def _config(tmp: Path, pipeline: Path, cache: Path, out: Path, batch_size: int) -> Path:
    train = {"max_steps": STEPS, "caption_dropout": 0.3, "random_draws": "global"}
    cfg = tiny_config_dict(pipeline, cache, out, batch_size=batch_size, **train)
    cfg["dataset"]["latent_sampling"] = "sample"
    cfg["checkpoint"] = {"every_steps": 4, "keep_last": None}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _probe(out: Path, rank: int) -> dict:
    doc = json.loads((out / f"rank{rank}-rows.json").read_text())
    doc["weights"] = load_file(str(out / f"rank{rank}-weights.safetensors"))
    doc["losses"] = {int(k): v for k, v in doc["losses"].items()}
    return doc


@pytest.mark.slow  # ~85 s on the shared 2-core machine (two launches + a reference run)
@pytest.mark.dist
def test_two_processes_step_through_one_bucket_at_a_time(tiny_pipeline_dir, tmp_path):
    from flowtrain.config import load_config
    from flowtrain.testing.ddp_probe import train_recording, write_probe

    _, cache = make_bucketed_cache(tmp_path / "data", tiny_pipeline_dir)
    manifest = CacheManifest.read(cache)
    bucket = [b for s, b in zip(manifest.shards, manifest.shard_buckets, strict=True) for _ in range(s["rows"])]
    assert len(bucket) == ROWS

    two = _config(tmp_path, tiny_pipeline_dir, cache, tmp_path / "two", batch_size=2)
    run(accelerate_launch([*ddp_args(2, PORT), "-m", "flowtrain.testing.ddp_probe", str(two)]), cpu_env(), TIMEOUT)
    ranks = [_probe(tmp_path / "two", r) for r in range(2)]

    for step in range(STEPS):
        r0, r1 = ranks[0]["rows"][step], ranks[1]["rows"][step]
        assert len(r0) == len(r1) == 2 and not set(r0) & set(r1), (step, r0, r1)  # disjoint
        assert len({bucket[i] for i in r0 + r1}) == 1, (step, r0, r1)  # one bucket on both ranks: lockstep shapes
    for epoch in range(2):
        seen = [i for r in ranks for s in range(4 * epoch, 4 * epoch + 4) for i in r["rows"][s]]
        assert sorted(seen) == list(range(ROWS)), f"epoch {epoch}: {sorted(seen)}"
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients were all-reduced
    assert any(k.endswith("lora_B.default.weight") and w0[k].abs().sum() > 0 for k in w0)

    # One process with the global batch (4) reads the same rows in the same order and logs the same losses.
    one = load_config(_config(tmp_path, tiny_pipeline_dir, cache, tmp_path / "one", batch_size=4))
    write_probe(one, *train_recording(one), rank=0)
    ref = _probe(tmp_path / "one", 0)
    assert [a + b for a, b in zip(ranks[0]["rows"], ranks[1]["rows"], strict=True)] == ref["rows"]
    for step, loss in ref["losses"].items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
