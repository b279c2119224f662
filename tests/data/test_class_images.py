"""`flowtrain class-images`: DreamBooth class images sampled with the tiny Klein pipeline, prepared and precomputed
into a class cache that prior-preservation training reads; a rerun samples only what is missing, and the same;
the cache holds exactly --num-class-images samples whatever else the images folder holds. (A video family's class
clips: test_class_images_video.py.)"""

from __future__ import annotations

import logging
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from flowtrain.cli import main
from flowtrain.data.cache import CacheDataset
from flowtrain.data.class_images import class_images, sample_name
from flowtrain.data.prior import check_class_cache
from flowtrain.testing.data import TINY_RES, tiny_model

PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def made(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("class") / "dog"
    done = class_images(out, PROMPT, 3, tiny_model(tiny_pipeline_dir), resolution=TINY_RES, steps=2, progress=False)
    return out, done


def test_class_images_are_sampled_prepared_and_precomputed(made, tiny_cache):
    out, done = made
    assert done.sampled == 3 and done.cache == out / "cache"
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [sample_name(i) for i in range(3)]
    assert [(out / "images" / sample_name(i)).with_suffix(".txt").read_text() for i in range(3)] == [PROMPT] * 3
    klass = CacheDataset(done.cache)
    assert len(klass) == 3
    assert pq.read_table(done.cache / klass.manifest.shards[0]["file"])["caption"].to_pylist() == [PROMPT] * 3
    check_class_cache(CacheDataset(tiny_cache[1]).manifest, klass.manifest, done.cache)  # fits the instance cache
    assert not list(out.rglob("*.tmp"))


def test_rerun_samples_only_the_missing_image_and_the_same_one(made, tiny_pipeline_dir):
    out, _ = made
    images = out / "images"
    lost = (images / sample_name(1)).read_bytes()
    kept = {i: (images / sample_name(i)).stat().st_ino for i in (0, 2)}
    (images / sample_name(1)).unlink()
    done = class_images(out, PROMPT, 3, tiny_model(tiny_pipeline_dir), resolution=TINY_RES, steps=2, progress=False)
    assert done.sampled == 1
    assert {i: (images / sample_name(i)).stat().st_ino for i in (0, 2)} == kept  # not sampled again
    assert (images / sample_name(1)).read_bytes() == lost  # seeded by its index: the image an unbroken run made
    assert len(CacheDataset(done.cache)) == 3


def test_samples_beyond_num_stay_in_images_but_out_of_the_cache(made, tiny_pipeline_dir, tmp_path, caplog):
    out = tmp_path / "dog"
    shutil.copytree(made[0], out)  # a finished run of 3 images, raw/ and cache/ included
    with caplog.at_level(logging.WARNING, logger="flowtrain.data.class_images"):
        done = class_images(out, PROMPT, 2, tiny_model(tiny_pipeline_dir), resolution=TINY_RES, steps=2,
                            progress=False)  # fmt: skip
    assert done.sampled == 0
    assert "1 class samples beyond --num-class-images 2" in caplog.text
    klass = CacheDataset(done.cache)
    keys = [k for s in klass.manifest.shards for k in pq.read_table(done.cache / s["file"])["key"].to_pylist()]
    assert keys == ["class-00000", "class-00001"]  # exactly the first --num-class-images, not every file there
    assert (out / "images" / sample_name(2)).read_bytes() == (made[0] / "images" / sample_name(2)).read_bytes()


def test_another_class_prompt_resamples_and_recaches_everything(made, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "cat"
    shutil.copytree(made[0], out)  # a finished run of 3 dog images, raw/ and cache/ included
    done = class_images(out, "a photo of a cat", 3, tiny_model(tiny_pipeline_dir), resolution=TINY_RES, steps=2,
                        progress=False)  # fmt: skip
    assert done.sampled == 3
    klass = CacheDataset(done.cache)
    # the same keys as the dog cache's: its shards must not pass for the cat images' (they are keyed alike)
    captions = [c for s in klass.manifest.shards for c in pq.read_table(done.cache / s["file"])["caption"].to_pylist()]
    assert captions == ["a photo of a cat"] * 3
    dog = CacheDataset(made[0] / "cache")
    assert not torch.equal(klass[0]["latent_moments"], dog[0]["latent_moments"])


def test_cli_then_prior_preservation_training(tiny_pipeline_dir, tiny_cache, tmp_path, capsys):
    from flowtrain.testing.training import train_config
    from flowtrain.train.loop import train

    rc = main(["class-images", str(tmp_path / "cls"), "--class-prompt", PROMPT, "--num-class-images", "2",
               "--model", str(tiny_pipeline_dir), "--resolution", str(TINY_RES), "--steps", "2", "--quiet",
               "--dtype", "float32", "model.max_sequence_length=32"])  # fmt: skip
    assert rc == 0
    assert f"dataset.class_cache_dir={tmp_path / 'cls' / 'cache'}" in capsys.readouterr().out
    cfg = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "db", train={"max_steps": 2},
        dataset={"class_cache_dir": str(tmp_path / "cls" / "cache")},
        loss={"name": "prior_preservation", "prior_loss_weight": 1.0},
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert sorted(result.losses) == [1, 2] and all(v == v for v in result.losses.values())


def test_bad_requests_are_refused(tiny_pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="--class-prompt is empty"):
        class_images(tmp_path, " ", 2, tiny_model(tiny_pipeline_dir), resolution=TINY_RES)
    with pytest.raises(ValueError, match="--num-class-images must be at least 1"):
        class_images(tmp_path, PROMPT, 0, tiny_model(tiny_pipeline_dir), resolution=TINY_RES)


def test_a_folder_of_the_users_is_not_replaced(tiny_pipeline_dir, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="raw holds files flowtrain did not write"):
        class_images(tmp_path, PROMPT, 1, tiny_model(tiny_pipeline_dir), resolution=TINY_RES, steps=1, progress=False)
    assert (tmp_path / "raw" / "notes.txt").read_text() == "mine"
