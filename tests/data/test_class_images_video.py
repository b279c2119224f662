"""`flowtrain class-images` for a video family, with the tiny Wan pipeline: class samples are .mp4 clips of the
sampler's `model.num_frames` frames that `flowtrain prepare` reads, cut by precompute as `dataset.video` says into a
class cache of clip rows that fits an instance video cache, and prior preservation trains on the two; a rerun
samples only the missing clips, the same ones."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from flowtrain.cli import main
from flowtrain.config.video import VideoConfig
from flowtrain.data.cache import CacheDataset
from flowtrain.data.class_images import CLIP, class_images, sample_name
from flowtrain.data.video import decode_frames, probe, write_video
from flowtrain.models import family_names

pytestmark = pytest.mark.skipif("wan" not in family_names(), reason="no video family registered")

PROMPT = "a dog running on a beach"
RES, FRAMES = 32, 9  # 9 frames → 3 latent frames; 32 px → 4×4 latents
# The options of both caches: 9-frame clips, short prompts (the cache's text settings must match).
OPTIONS = ["--resolution", str(RES), "--dtype", "float32", "--quiet", "model.max_sequence_length=32",
           f"model.num_frames={FRAMES}", f"dataset.video.frames={FRAMES}"]  # fmt: skip


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from flowtrain.models import get_family

    return get_family("wan").save_tiny_pipeline(tmp_path_factory.mktemp("wan") / "pipeline")


@pytest.fixture(scope="module")
def made(wan, tmp_path_factory):
    """OUT of `flowtrain class-images` with two 9-frame class clips, 2 steps each."""
    out = tmp_path_factory.mktemp("class") / "dog"
    args = ["class-images", str(out), "--class-prompt", PROMPT, "--num-class-images", "2", "--model", str(wan),
            "--steps", "2", *OPTIONS]  # fmt: skip
    assert main(args) == 0
    return out


def _model(wan):
    from flowtrain.testing.data import tiny_model

    return tiny_model(wan, "wan", max_sequence_length=32, num_frames=FRAMES)


def _rerun(out, wan):
    return class_images(out, PROMPT, 2, _model(wan), resolution=RES, steps=2, progress=False,
                        video=VideoConfig(frames=FRAMES))  # fmt: skip


def test_class_clips_are_videos_that_decode_to_the_sampled_frames(made):
    images = made / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        "class-00000.mp4", "class-00000.txt", "class-00001.mp4", "class-00001.txt"
    ]  # fmt: skip
    for i in range(2):
        info = probe((images / sample_name(i, CLIP)).read_bytes())
        assert (info.num_frames, info.width, info.height, info.fps) == (FRAMES, RES, RES, 16.0)  # model.fps
        assert (images / f"class-{i:05d}.txt").read_text() == PROMPT
    assert not list(made.rglob("*.tmp"))


def test_the_class_cache_holds_one_clip_row_per_sample(made):
    ds = CacheDataset(made / "cache")
    assert len(ds) == 2
    assert ds.manifest.column("latent_moments").shape == (32, 3, 4, 4)  # 2·16 channels, 3 latent frames, 4×4
    assert ds.manifest.fingerprint["settings"]["video"]["frames"] == FRAMES
    table = pq.read_table(made / "cache" / ds.manifest.shards[0]["file"], columns=["key", "caption"])
    assert table.to_pydict() == {"key": ["class-00000", "class-00001"], "caption": [PROMPT] * 2}


def test_rerun_samples_nothing_then_only_the_missing_clip_and_the_same_one(made, wan):
    images = made / "images"
    kept = {p.name: p.stat().st_ino for p in images.iterdir()}
    assert _rerun(made, wan).sampled == 0
    assert {p.name: p.stat().st_ino for p in images.iterdir()} == kept

    clip = images / sample_name(1, CLIP)
    lost = decode_frames(clip.read_bytes(), range(FRAMES))
    clip.unlink()
    done = _rerun(made, wan)
    assert done.sampled == 1 and (images / sample_name(0, CLIP)).stat().st_ino == kept["class-00000.mp4"]
    again = decode_frames(clip.read_bytes(), range(FRAMES))
    # seeded by its index: the clip an unbroken run made (x264 at crf 0 is lossless for the same frames)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, lost, strict=True))
    assert len(CacheDataset(done.cache)) == 2


def test_clips_too_short_for_dataset_video_are_refused_before_sampling(wan, tmp_path):
    with pytest.raises(ValueError, match=r"model.num_frames=9 is too short for dataset.video.frames=13"):
        class_images(tmp_path, PROMPT, 1, _model(wan), resolution=RES, steps=1, progress=False,
                     video=VideoConfig(frames=13))  # fmt: skip
    assert not (tmp_path / "images").exists()


def test_prior_preservation_trains_on_the_class_clips(made, wan, tmp_path):
    """An instance cache precomputed from .mp4 files with the same options, then two prior-preservation steps."""
    from flowtrain.data.prior import check_class_cache
    from flowtrain.testing.training import train_config
    from flowtrain.train.loop import train

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        frames = (rng.random((FRAMES, RES, RES, 3)) * 60).astype(np.uint8)
        for f in range(FRAMES):
            frames[f, 8:20, 2 + 2 * f : 14 + 2 * f] = 230  # a square moving right
        write_video(src / f"v{i}.mp4", frames, fps=16)
        (src / f"v{i}.txt").write_text("a sks dog running")
    assert main(["prepare", str(src), "--out", str(tmp_path / "raw"), "--quiet"]) == 0
    inst = tmp_path / "cache"
    assert main(["precompute", str(tmp_path / "raw"), "--out", str(inst), "--model", str(wan), *OPTIONS]) == 0
    check_class_cache(CacheDataset(inst).manifest, CacheDataset(made / "cache").manifest, made / "cache")

    cfg = train_config(
        wan, inst, tmp_path / "db", family="wan", model={"num_frames": FRAMES},
        timesteps={"shift_mode": "resolution"}, train={"max_steps": 2},
        dataset={"class_cache_dir": str(made / "cache")},
        loss={"name": "prior_preservation", "prior_loss_weight": 1.0},
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert sorted(result.losses) == [1, 2] and all(v == v for v in result.losses.values())
    logged = [json.loads(line) for line in (tmp_path / "db" / "logs" / "metrics.jsonl").read_text().splitlines()]
    prior = [r["loss/prior"] for r in logged if "loss/prior" in r]
    assert len(prior) == 2 and all(v == v and v > 0 for v in prior)  # class clips were in both steps' batches
