"""Aspect-ratio buckets end to end on the tiny Klein pipeline: the bucketed cache (one bucket per shard, per-row
latent shapes, counts that add up), the pixels a bucket's image becomes (a crop, never a stretch), the square
bucket equal to a square cache bitwise, batches of one bucket in the real loop with the shift of each batch's own
token count, exact resume, and a whole run through the CLI (prepare → precompute --buckets → train, validation at
configured sizes)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from flowtrain.data.bucket_sampler import rows_by_bucket
from flowtrain.data.buckets import BucketSpec, bucket_counts, cover_size, crop_box, shard_counts
from flowtrain.data.cache import CacheDataset
from flowtrain.data.manifest import CacheManifest
from flowtrain.testing.buckets import MIXED_SIZES, TINY_BUCKET_SPEC, make_bucketed_cache, make_mixed_image_folder
from flowtrain.testing.data import TINY_SEQ, tiny_model
from flowtrain.testing.training import assert_resume_exact, train_config

SPEC = BucketSpec(**TINY_BUCKET_SPEC)


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, tiny_pipeline_dir) -> tuple[Path, Path]:
    return make_bucketed_cache(tmp_path_factory.mktemp("buckets"), tiny_pipeline_dir)


def _bucket_of_rows(manifest: CacheManifest) -> list[tuple[int, int]]:
    return [b for s, b in zip(manifest.shards, manifest.shard_buckets, strict=True) for _ in range(s["rows"])]


def test_the_cache_records_each_rows_bucket_and_the_counts_add_up(bucketed):
    raw, cache = bucketed
    manifest = CacheManifest.read(cache)
    assert manifest.fingerprint["buckets"] == SPEC.to_json()
    assert manifest.num_rows == len(MIXED_SIZES)
    channels = manifest.column("latent_moments").shape[0]  # 2C: mean ‖ logvar
    per_bucket = Counter()
    for shard, bucket in zip(manifest.shards, manifest.shard_buckets, strict=True):
        per_bucket[bucket] += shard["rows"]
        h, w = bucket
        assert shard["shapes"] == {"latent_moments": [channels, h // 2, w // 2]}  # the tiny VAE halves each side
        # readable with pyarrow alone: each shard's tensor column carries its bucket's shape
        assert pq.read_schema(cache / shard["file"]).field("latent_moments").type.shape == [channels, h // 2, w // 2]
    assert dict(per_bucket) == bucket_counts(MIXED_SIZES, SPEC) == {(24, 40): 4, (32, 32): 4, (36, 28): 4, (40, 24): 4}
    assert shard_counts(manifest.shards) == per_bucket and sum(per_bucket.values()) == manifest.num_rows
    ds = CacheDataset(cache)
    buckets = _bucket_of_rows(manifest)
    keys = []
    for i in range(len(ds)):
        h, w = buckets[i]
        assert ds[i]["latent_moments"].shape == (channels, h // 2, w // 2)
        assert ds[i]["text_embeds"].shape[0] == TINY_SEQ
    for s in manifest.shards:
        keys += pq.read_table(cache / s["file"], columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == [f"img{i:02d}" for i in range(len(MIXED_SIZES))]  # every image once
    rows = rows_by_bucket(manifest)
    assert sorted(i for r in rows for i in r) == list(range(len(MIXED_SIZES)))


@pytest.mark.parametrize("size", [(100, 30), (30, 90), (20, 16), (200, 210)])
def test_a_bucket_image_is_scaled_to_cover_and_centre_cropped_never_stretched(tiny_pipeline_dir, size):
    """The family's pixels for a bucket equal our own cover-scale (one factor, aspect kept) + centre crop."""
    from flowtrain.data.buckets import assign
    from flowtrain.models import get_family

    family, model = get_family("flux2_klein"), tiny_model(tiny_pipeline_dir)
    encoders = family.load_encoders(model, dtype=torch.float32, device="cpu")
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    bucket = assign(size, SPEC)
    pixels = family.preprocess_images(encoders, [im], resolution=32, size=bucket)
    assert pixels.shape == (1, 3, *bucket)
    sh, sw = cover_size(size, bucket)
    assert abs(sh / sw - size[0] / size[1]) <= (size[0] / size[1]) * (1 / min(sh, sw))  # aspect kept to a pixel
    want = np.asarray(im.resize((sw, sh), Image.Resampling.LANCZOS).crop(crop_box((sh, sw), bucket)), np.float32)
    want = torch.from_numpy(want / 127.5 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(pixels[0], want, atol=1e-6, rtol=0)


def test_the_square_bucket_equals_a_square_cache_bitwise(bucketed, tiny_pipeline_dir, tmp_path):
    """Rows in the 32×32 bucket are encoded exactly as the square cache at 32 px encodes them."""
    from flowtrain.data.precompute import precompute

    raw, cache = bucketed
    square = tmp_path / "square"
    precompute(raw, square, tiny_model(tiny_pipeline_dir), resolution=32, batch_size=4, progress=False)
    sq = {r["key"]: r for s in CacheManifest.read(square).shards for r in pq.read_table(square / s["file"]).to_pylist()}
    manifest = CacheManifest.read(cache)
    (shard,) = [s for s, b in zip(manifest.shards, manifest.shard_buckets, strict=True) if b == (32, 32)]
    rows = pq.read_table(cache / shard["file"]).to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert row == sq[row["key"]]
    # ...and a square-only cache (no --buckets) has no bucket in its fingerprint: its id is what it always was
    assert "buckets" not in CacheManifest.read(square).fingerprint


def test_loop_batches_are_homogeneous_and_the_shift_follows_each_batch(bucketed, tiny_pipeline_dir, tmp_path):
    """In the real training loop: every micro-batch holds rows of one bucket; the σ shift of each batch is the
    family's at that batch's own token count (`timesteps.shift_mode: resolution`)."""
    from flowtrain.flow import sample_sigmas
    from flowtrain.models import get_family
    from flowtrain.testing.ddp_probe import train_recording
    from flowtrain.train.step import make_inputs, step_seed

    _, cache = bucketed
    cfg = train_config(tiny_pipeline_dir, cache, tmp_path / "run", train={"max_steps": 8, "batch_size": 2},
                       timesteps={"shift_mode": "resolution"})  # fmt: skip
    result, rows = train_recording(cfg)
    buckets = _bucket_of_rows(CacheManifest.read(cache))
    assert len(rows) == 8 and all(math.isfinite(v) for v in result.losses.values())
    assert all(len({buckets[i] for i in batch}) == 1 for batch in rows), rows
    assert len({buckets[batch[0]] for batch in rows}) == 4  # 8 batches = one epoch: every bucket trained

    family, ds = get_family("flux2_klein"), CacheDataset(cache)
    shifts = set()
    for batch_rows in rows[:8]:
        batch = ds.collate([ds[i] for i in batch_rows])
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, 1, 0, 0))
        inputs = make_inputs(batch, cfg, family, ds.latent_norm, None, gen, torch.device("cpu"))
        h, w = buckets[batch_rows[0]]
        tokens = (h // 4) * (w // 4)  # VAE /2, then 2×2 patches
        assert inputs.x0.shape[1] == tokens
        shift = family.resolution_shift(cfg.model, tokens)
        t = cfg.timesteps
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, 1, 0, 0))
        kw = {"logit_mean": t.logit_mean, "logit_std": t.logit_std, "mode_scale": t.mode_scale, "shift": shift}
        want = sample_sigmas(2, gen, t.scheme, **kw)
        assert torch.equal(inputs.sigma, want)
        shifts.add(round(shift, 9))
    assert len(shifts) >= 2  # 60-token and 64-token (and 63-token) batches are shifted differently


def test_resume_mid_epoch_is_exact_on_a_bucketed_cache(bucketed, tiny_pipeline_dir, tmp_path):
    _, cache = bucketed
    extra = {"train": {"max_steps": 6, "caption_dropout": 0.2}, "checkpoint": {"every_steps": 1, "keep_last": 2},
             "dataset": {"latent_sampling": "sample"}}  # fmt: skip
    straight = train_config(tiny_pipeline_dir, cache, tmp_path / "straight", **extra)
    interrupted = train_config(tiny_pipeline_dir, cache, tmp_path / "interrupted", **extra)
    assert_resume_exact(straight, interrupted, stop=3)  # 8 batches an epoch: stopped mid-epoch


def test_mixed_shape_dataset_trains_through_the_cli(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    """prepare (sizes kept) → precompute --buckets → train with validation at two configured sizes."""
    from flowtrain.cli import main

    monkeypatch.chdir(tmp_path)
    make_mixed_image_folder(tmp_path / "src")
    assert main(["prepare", "src", "--out", "raw", "--quiet"]) == 0
    widths = pq.read_table("raw/raw-00000.parquet", columns=["width", "height"]).to_pylist()
    assert sorted((r["height"], r["width"]) for r in widths) == sorted(MIXED_SIZES)  # original sizes kept
    cfg = {
        "model": {"pretrained": str(tiny_pipeline_dir), "max_sequence_length": TINY_SEQ, "dtype": "float32"},
        "dataset": {"cache_dir": "cache"},
        "train": {"batch_size": 2, "learning_rate": 2e-3, "mixed_precision": "no", "max_steps": 10},
        "lora": {"rank": 4},
        "checkpoint": {"every_steps": 5, "keep_last": 1},
        "validation": {"prompts": ["a picture"], "every_steps": 10, "sizes": [[40, 24], [24, 40]],
                       "num_inference_steps": 2},
        "tracking": {"report_to": ["jsonl"], "graphs": False},
        "output_dir": "runs/unused",
    }  # fmt: skip
    Path("tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["precompute", "raw", "--config", "tiny.yaml", "--resolution", "32", "--buckets", "--quiet"]) == 0
    assert "buckets (height x width: rows): 24x40: 4, 32x32: 4, 36x28: 4, 40x24: 4" in capsys.readouterr().out
    manifest = json.loads(Path("cache/manifest.json").read_text())
    assert sorted({tuple(s["bucket"]) for s in manifest["shards"]}) == [(24, 40), (32, 32), (36, 28), (40, 24)]
    assert main(["train", "tiny.yaml", "--output_dir", "runs/b", "--quiet"]) == 0
    metrics = [json.loads(x) for x in Path("runs/b/logs/metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert Path("runs/b/pytorch_lora_weights.safetensors").exists()
    samples = sorted(Path("runs/b/samples").glob("step000010_00_*x*.png"))
    assert sorted(Image.open(p).size for p in samples) == [(24, 40), (40, 24)]  # PIL: (width, height)


def test_bad_bucket_settings_are_refused(bucketed, tiny_pipeline_dir, tmp_path, capsys):
    from flowtrain.cli import main
    from flowtrain.data.precompute import precompute

    raw, _ = bucketed
    with pytest.raises(SystemExit):
        main(["precompute", str(raw), "--buckets", "--bucket-sides", "0"])
    assert "positive integer" in capsys.readouterr().err
    args = ["precompute", str(raw), "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "c")]
    assert main([*args, "--max-aspect", "3"]) != 0
    assert "add --buckets" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="resolution 30 is not a multiple of the model's pixel multiple 4: use e.g"):
        precompute(raw, tmp_path / "c", tiny_model(tiny_pipeline_dir), resolution=30, progress=False, buckets=SPEC)
    assert not (tmp_path / "c").exists()  # refused before anything was written


@pytest.mark.parametrize("family", ["flux1", "qwen_image", "wan"])
def test_every_family_trains_on_a_bucketed_cache(family, tmp_path):
    """FLUX.1 (fixed-length text, pooled vector, scheduler shift), Qwen-Image (variable-length text, a frame axis in
    its latents) and Wan (images as one-frame clips, a static shift) on the same mixed shapes: per-shard shapes as
    declared, one bucket per batch, finite losses, and each batch's σ drawn with the family's shift at that batch's
    own token count."""
    from flowtrain.flow import sample_sigmas
    from flowtrain.models import get_family
    from flowtrain.testing.ddp_probe import train_recording
    from flowtrain.train.step import make_inputs, step_seed

    pipeline = get_family(family).save_tiny_pipeline(tmp_path / "pipeline")
    # Wan's pixel multiple is 16 (its VAE's 8× and 2×2 patches): at its tiny 32 px every image would land in
    # 32×32, so its images are bucketed around 64 px
    side = 64 if family == "wan" else None
    _, cache = make_bucketed_cache(tmp_path / "data", pipeline, family=family, resolution=side)
    manifest = CacheManifest.read(cache)
    image = [c for c in manifest.columns if c.source == "image"]
    ds = CacheDataset(cache)
    buckets = _bucket_of_rows(manifest)
    f = {"flux1": 2, "qwen_image": 2, "wan": 8}[family]  # the tiny VAE's down-sampling (Wan's keeps the real 8×)
    for i in range(len(ds)):
        for c in image:
            assert ds[i][c.name].shape[-2:] == tuple(x // f for x in buckets[i])
    cfg = train_config(pipeline, cache, tmp_path / "run", family=family, train={"max_steps": 8, "batch_size": 2},
                       timesteps={"shift_mode": "resolution"})  # fmt: skip
    result, rows = train_recording(cfg)
    assert all(len({buckets[i] for i in batch}) == 1 for batch in rows), rows
    assert len({buckets[batch[0]] for batch in rows}) == len(set(buckets)) >= 3  # an epoch: every bucket
    assert len(result.losses) == 8 and all(math.isfinite(v) for v in result.losses.values())

    fam, t, shifts = get_family(family), cfg.timesteps, set()
    for batch_rows in rows:
        batch = ds.collate([ds[i] for i in batch_rows])
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, 1, 0, 0))
        inputs = make_inputs(batch, cfg, fam, ds.latent_norm, None, gen, torch.device("cpu"))
        h, w = buckets[batch_rows[0]]
        # FLUX.1 and Qwen-Image pack 2×2 latent patches into a token; Wan's x0 is one row per latent position
        d = f if family == "wan" else 2 * f
        tokens = (h // d) * (w // d)
        assert inputs.x0.shape[1] == tokens
        shift = fam.resolution_shift(cfg.model, tokens)
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, 1, 0, 0))
        kw = {"logit_mean": t.logit_mean, "logit_std": t.logit_std, "mode_scale": t.mode_scale, "shift": shift}
        assert torch.equal(inputs.sigma, sample_sigmas(2, gen, t.scheme, **kw))
        shifts.add(round(shift, 9))
    # FLUX.1 and Qwen-Image shift with the token count, so the buckets' batches differ; Wan's UniPC shift is static
    varies = fam.resolution_shift(cfg.model, 64) != fam.resolution_shift(cfg.model, 4096)
    assert len(shifts) >= 2 if varies else len(shifts) == 1
    assert varies == (family != "wan")


def test_a_square_only_dataset_with_buckets_trains_bitwise_like_the_square_cache(tiny_pipeline_dir, tmp_path):
    """Square images bucketed: one bucket, so the plain sampler and the square cache's rows: the same losses and
    weights to the last bit as the square cache (the golden-loss path is untouched)."""
    from safetensors.torch import load_file

    from flowtrain.data.precompute import precompute
    from flowtrain.train.checkpoint import list_checkpoints
    from flowtrain.train.loop import train

    sizes = ((32, 32), (48, 48), (40, 40), (64, 64), (33, 33), (90, 90))
    raw, cache = make_bucketed_cache(tmp_path / "data", tiny_pipeline_dir, sizes=sizes)
    assert {b for b in CacheManifest.read(cache).shard_buckets} == {(32, 32)}
    assert rows_by_bucket(CacheManifest.read(cache)) is None  # one bucket: read as a square cache
    square = tmp_path / "square"
    precompute(raw, square, tiny_model(tiny_pipeline_dir), resolution=32, batch_size=4, progress=False)
    extra = {"train": {"max_steps": 4, "caption_dropout": 0.2}, "dataset": {"latent_sampling": "sample"}}
    outs = [tmp_path / "run-bucketed", tmp_path / "run-square"]
    runs = [train(train_config(tiny_pipeline_dir, c, o, **extra), progress=False)
            for c, o in zip((cache, square), outs, strict=True)]  # fmt: skip
    assert runs[0].losses == runs[1].losses and len(runs[0].losses) == 4
    a, b = (load_file(str(list_checkpoints(o)[-1][1] / "trainable.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_bucketed_precompute_continues(bucketed, tiny_pipeline_dir, tmp_path):
    """A rerun into an unfinished bucketed cache keeps the finished bucket shards and redoes only the missing one:
    the result equals the uninterrupted cache."""
    import shutil

    from flowtrain.data.precompute import precompute

    raw, cache = bucketed
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    manifest = CacheManifest.read(cache)
    lost = manifest.shards[1]["file"]
    (copy / lost).unlink()
    (copy / "manifest.json").unlink()  # as a killed run leaves it: no manifest yet
    kept = {s["file"]: (copy / s["file"]).stat().st_mtime_ns for s in manifest.shards if s["file"] != lost}
    again = precompute(raw, copy, tiny_model(tiny_pipeline_dir), resolution=32, batch_size=4, progress=False,
                       buckets=SPEC)  # fmt: skip
    assert again.shards == manifest.shards and again.fingerprint == manifest.fingerprint
    assert {f: (copy / f).stat().st_mtime_ns for f in kept} == kept  # not rewritten
    assert pq.read_table(copy / lost).equals(pq.read_table(cache / lost))


def test_prior_preservation_with_a_bucketed_instance_cache_is_refused_clearly(
    bucketed, tiny_cache, tiny_pipeline_dir, tmp_path
):
    """Class rows are read beside each instance batch and must share its latent shape, which a bucketed instance
    cache changes from batch to batch: refused before training, naming the key and the way out."""
    from flowtrain.train.loop import train

    _, cache = bucketed
    class_cache = tiny_cache[1]  # a square cache of the same tiny pipeline
    cfg = train_config(tiny_pipeline_dir, cache, tmp_path / "run", train={"max_steps": 2, "batch_size": 2},
                       dataset={"class_cache_dir": str(class_cache)},
                       loss={"name": "prior_preservation", "prior_loss_weight": 0.5})  # fmt: skip
    one_shape = r"dataset.class_cache_dir \(prior preservation\) needs an instance cache of one shape"
    with pytest.raises(ValueError, match=one_shape):
        train(cfg, progress=False)
    assert not list((tmp_path / "run").glob("checkpoint-*"))
