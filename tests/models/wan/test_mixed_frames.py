"""Images and videos in one Wan cache (an image is a one-frame video): `flowtrain prepare` on a folder of .mp4
clips and .png images → `flowtrain precompute` at `dataset.video.frames: 5` → 5-frame clips (2 latent frames) and
the images as one-frame clips (1 latent frame) in shards of their own → training whose every batch holds one frame
count, resumed mid-epoch exactly."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from flowtrain.data.video import decode_frames, write_video
from flowtrain.testing.training import assert_resume_exact, train_config

RES, FRAMES, VIDEOS, IMAGES = 32, 5, 4, 3  # 5 frames → (5 - 1)/4 + 1 = 2 latent frames; an image → 1


def moving_square(n: int, rng: np.random.Generator, size: int = RES) -> np.ndarray:
    """(n, size, size, 3) uint8 frames: a bright square moving right over noise, so frames differ."""
    frames = (rng.random((n, size, size, 3)) * 60).astype(np.uint8)
    for f in range(n):
        frames[f, 8:20, 2 + 2 * f : 14 + 2 * f] = 230
    return frames


@pytest.fixture(scope="module")
def mixed(wan_dir, tmp_path_factory):
    """(raw_dir, cache_dir, precompute args) of a folder of 4 videos (7 frames) and 3 images, all captioned."""
    from flowtrain.cli import main

    root = tmp_path_factory.mktemp("mixed")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(VIDEOS):
        write_video(src / f"v{i}.mp4", moving_square(7, rng), fps=8)
        (src / f"v{i}.txt").write_text(f"a square moving right {i}")
    for i in range(IMAGES):
        Image.fromarray((rng.random((RES, RES, 3)) * 255).astype(np.uint8)).save(src / f"still{i}.png")
        (src / f"still{i}.txt").write_text(f"a still image {i}")
    assert main(["prepare", str(src), "--out", str(root / "raw"), "--quiet"]) == 0
    args = ["--model", str(wan_dir), "--resolution", str(RES), "--dtype", "float32", "--quiet",
            "model.max_sequence_length=32", f"dataset.video.frames={FRAMES}"]  # fmt: skip
    assert main(["precompute", str(root / "raw"), "--out", str(root / "cache"), *args]) == 0
    return root / "raw", root / "cache", args


def _frames_of_rows(manifest) -> list[int]:
    """Each cache row's clip length: its shard's `frames`, else the declared one."""
    return [f or FRAMES for s, f in zip(manifest.shards, manifest.shard_frames, strict=True) for _ in range(s["rows"])]


def test_the_cache_holds_both_clip_lengths_in_shards_of_their_own(mixed):
    from flowtrain.data.bucket_sampler import rows_by_bucket
    from flowtrain.data.cache import CacheDataset
    from flowtrain.data.clips import frame_counts

    raw, cache, _ = mixed
    ds = CacheDataset(cache)  # checks every shard's footer against the manifest's (per-shard) shapes
    manifest = json.loads((cache / "manifest.json").read_text())
    assert ds.manifest.column("latent_moments").shape == (32, 2, 4, 4)  # the declared: 5-frame clips
    videos, images = manifest["shards"]
    assert (videos["file"], videos["rows"]) == ("cache-00000-0000.parquet", VIDEOS)
    assert "frames" not in videos and "shapes" not in videos  # the declared shapes: as a video-only cache's
    assert (images["file"], images["rows"], images["frames"]) == ("cache-00000-0000-f001.parquet", IMAGES, 1)
    assert images["shapes"] == {"latent_moments": [32, 1, 4, 4]}  # only the columns that differ
    raw_rows = sum(s["rows"] for s in json.loads((raw / "manifest.json").read_text())["shards"])
    assert len(ds) == raw_rows == VIDEOS + IMAGES  # no image dropped
    assert [ds[i]["latent_moments"].shape[1] for i in range(len(ds))] == [2] * VIDEOS + [1] * IMAGES
    assert manifest["fingerprint"]["settings"]["video"]["images"] is True
    assert rows_by_bucket(ds.manifest) == [list(range(VIDEOS)), list(range(VIDEOS, VIDEOS + IMAGES))]
    assert frame_counts(ds.manifest) == {FRAMES: VIDEOS, 1: IMAGES}  # what precompute prints


def test_rows_are_the_familys_own_encodes_an_image_its_one_frame_path(mixed, fam, encoders):
    from flowtrain.data.cache import CacheDataset

    raw, cache, _ = mixed
    ds = CacheDataset(cache)
    keys = [k for s in ds.manifest.shards for k in pq.read_table(cache / s["file"]).column("key").to_pylist()]
    assert keys == [f"v{i}" for i in range(VIDEOS)] + [f"still{i}" for i in range(IMAGES)]
    source = {r["key"]: r for r in pq.read_table(raw / "raw-00000.parquet").to_pylist()}
    for i in range(IMAGES):  # what an image-only cache computes: (B, 3, H, W) into encode_pixels, i.e. F = 1
        image = Image.open(io.BytesIO(source[f"still{i}"]["image"])).convert("RGB")
        pixels = fam.preprocess_images(encoders, [image], resolution=RES)
        want = fam.encode_pixels(encoders, pixels)["latent_moments"][0]
        torch.testing.assert_close(ds[keys.index(f"still{i}")]["latent_moments"], want, rtol=0, atol=1e-5)
    frames = decode_frames(source["v1"]["image"], list(range(FRAMES)))  # `head`: the first 5 frames
    pixels = fam.preprocess_images(encoders, frames, resolution=RES).permute(1, 0, 2, 3)[None]  # (1, 3, 5, H, W)
    want = fam.encode_pixels(encoders, pixels)["latent_moments"][0]
    torch.testing.assert_close(ds[keys.index("v1")]["latent_moments"], want, rtol=0, atol=1e-5)


def test_fingerprints_change_only_where_the_cache_does():
    """`images` enters the fingerprint only where it changes what is cached: a video-only folder, or a mixed one at
    frames 1 (images were always cached there), keeps the fingerprint it had before the option existed."""
    from flowtrain.config.video import VideoConfig
    from flowtrain.data.clips import clip_settings

    mixed = {"videos": 2, "shards": [{"rows": 3}]}
    videos_only = {"videos": 3, "shards": [{"rows": 3}]}
    before = VideoConfig(frames=9).model_dump(exclude={"images"})  # what every cache of frames 9 recorded
    assert clip_settings(VideoConfig(frames=9), videos_only) == before
    assert clip_settings(VideoConfig(frames=9, images=False), mixed) == before  # images left out, as before
    assert clip_settings(VideoConfig(frames=9), mixed) == before | {"images": True}  # now cached: a new cache
    one = VideoConfig(frames=1).model_dump(exclude={"images"})
    assert clip_settings(VideoConfig(frames=1), mixed) == one
    assert clip_settings(VideoConfig(frames=1, images=False), mixed) == one | {"images": False}


def test_images_false_leaves_them_out(mixed, tmp_path):
    from flowtrain.cli import main
    from flowtrain.data.manifest import CacheManifest

    raw, cache, args = mixed
    assert main(["precompute", str(raw), "--out", str(tmp_path / "c"), *args, "dataset.video.images=false"]) == 0
    manifest = CacheManifest.read(tmp_path / "c")
    assert [s["file"] for s in manifest.shards] == ["cache-00000-0000.parquet"] and manifest.num_rows == VIDEOS
    assert "images" not in manifest.fingerprint["settings"]["video"]
    assert manifest.fingerprint["id"] != CacheManifest.read(cache).fingerprint["id"]


def _cfg(wan_dir: Path, cache: Path, out: Path, **sections):
    sections.setdefault("timesteps", {"shift_mode": "resolution"})
    sections.setdefault("model", {"num_frames": FRAMES})
    return train_config(wan_dir, cache, out, family="wan", **sections)


def test_batches_hold_one_frame_count_and_the_shift_follows_their_tokens(mixed, wan_dir, fam, tmp_path):
    from flowtrain.data.cache import CacheDataset
    from flowtrain.testing.ddp_probe import train_recording
    from flowtrain.train.step import sigma_shift

    _, cache, _ = mixed
    cfg = _cfg(wan_dir, cache, tmp_path / "run", train={"max_steps": 6, "batch_size": 2})
    result, rows = train_recording(cfg)
    assert len(rows) == 6 and all(math.isfinite(v) for v in result.losses.values())
    ds = CacheDataset(cache)
    frames = _frames_of_rows(ds.manifest)
    assert all(len({frames[i] for i in batch}) == 1 for batch in rows), rows
    assert {frames[batch[0]] for batch in rows} == {FRAMES, 1}  # 3 batches an epoch: both lengths trained
    norm = ds.latent_norm
    for batch_rows in rows[:3]:
        batch = ds.collate([ds[i] for i in batch_rows])
        f = 2 if frames[batch_rows[0]] == FRAMES else 1
        assert batch["latent_moments"].shape == (2, 32, f, 4, 4)  # (B, 2C, F', h, w): one F' per batch
        x0, grid = fam.training_latents(batch, norm, None)
        assert grid == (f, 4, 4) and x0.shape == (2, f * 4 * 4, 16)  # one token per latent pixel
        assert sigma_shift(cfg, fam, x0.shape[1]) == fam.resolution_shift(cfg.model, f * 16)


def test_resume_mid_epoch_is_exact_on_a_mixed_cache(mixed, wan_dir, tmp_path):
    _, cache, _ = mixed
    extra = {"train": {"max_steps": 4}, "checkpoint": {"every_steps": 1, "keep_last": 2}}
    straight, interrupted = (_cfg(wan_dir, cache, tmp_path / run, **extra) for run in ("straight", "interrupted"))
    assert_resume_exact(straight, interrupted, stop=2)  # 3 batches an epoch: stopped mid-epoch


def test_flowtrain_train_runs_on_the_mixed_cache(mixed, wan_dir, tmp_path, monkeypatch):
    from flowtrain.cli import main

    _, cache, _ = mixed
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(wan_dir, cache, tmp_path / "runs" / "m", train={"max_steps": 3}).model_dump(mode="json")
    Path("mixed.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "mixed.yaml", "--quiet"]) == 0
    metrics = [json.loads(x) for x in (tmp_path / "runs/m/logs/metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_ranks_step_through_the_same_clip_length_together(mixed):
    """DDP lockstep: at every step all ranks hold disjoint rows of one clip length (the bucket sampler's rule)."""
    from itertools import islice

    from flowtrain.data.bucket_sampler import BucketSampler, rows_by_bucket
    from flowtrain.data.manifest import CacheManifest

    manifest = CacheManifest.read(mixed[1])
    frames, groups = _frames_of_rows(manifest), rows_by_bucket(manifest)
    ranks = [BucketSampler(groups, 1, seed=3, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3  # 4 clips → 2 global batches of 2, 3 images → 1 (one sits out)
    steps = [list(islice(iter(s), 6)) for s in ranks]  # two epochs, one row per rank and step
    for a, b in zip(*steps, strict=True):
        assert a != b and frames[a] == frames[b]


def test_an_interrupted_mixed_precompute_continues(mixed, tmp_path):
    """The images' shard is planned and checked by its keys like any other: a rerun after a kill redoes only it."""
    import shutil

    from flowtrain.cli import main
    from flowtrain.data.manifest import CacheManifest

    raw, cache, args = mixed
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    first = CacheManifest.read(out)
    before = pq.read_table(out / "cache-00000-0000-f001.parquet")
    (out / "cache-00000-0000-f001.parquet").unlink()
    (out / "manifest.json").unlink()  # as if killed before the end
    assert main(["precompute", str(raw), "--out", str(out), *args]) == 0
    again = CacheManifest.read(out)
    assert again.shards == first.shards and again.fingerprint == first.fingerprint
    assert pq.read_table(out / "cache-00000-0000-f001.parquet").equals(before)
