"""`precompute` interrupted at any point: a rerun continues where it stopped and the cache equals an uninterrupted
run's (same shards, same columns to the last bit, every key exactly once)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flowtrain.data import precompute as pre
from flowtrain.data.cache import CacheDataset
from flowtrain.data.precompute import precompute
from flowtrain.data.prepare import prepare
from flowtrain.models.flux2_klein.family import Flux2Klein
from flowtrain.testing.data import TINY_RES, tiny_model

ROWS_PER_SHARD = 3  # 8 rows → shards of 3, 3, 2; batch 2 → 2, 2, 1 encoder calls


class Interrupted(Exception):
    pass


def _run(raw: Path, out: Path, pipeline: Path):
    return precompute(raw, out, tiny_model(pipeline), resolution=TINY_RES, batch_size=2, rows_per_shard=ROWS_PER_SHARD,
                      progress=False)  # fmt: skip


def _content(cache: Path) -> tuple[dict, dict[str, dict]]:
    """(manifest without its timestamp, {shard file: {column: python values}}) of a finished cache."""
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.pop("created")
    shards = {s["file"]: pq.read_table(cache / s["file"]).to_pydict() for s in manifest["shards"]}
    return manifest, shards


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_pipeline_dir, tiny_cache) -> Path:
    out = tmp_path_factory.mktemp("precompute") / "cache"
    _run(tiny_cache[0], out, tiny_pipeline_dir)
    return out


def _interrupt_encoder_after(monkeypatch, calls: int) -> None:
    real = Flux2Klein.encode_pixels
    count = {"n": 0}

    def encode_pixels(self, pipe, pixels):
        count["n"] += 1
        if count["n"] > calls:
            raise Interrupted(f"interrupted before encoder call {count['n']}")
        return real(self, pipe, pixels)

    monkeypatch.setattr(Flux2Klein, "encode_pixels", encode_pixels)


def _interrupt_while_writing_shard(monkeypatch, shard_no: int) -> None:
    """Die after the temporary file of the `shard_no`-th shard is written, before it is renamed."""
    real = pre.write_shard
    count = {"n": 0}

    def write(table, path):
        count["n"] += 1
        if count["n"] == shard_no:
            pq.write_table(table, path.with_suffix(".parquet.tmp"))
            raise Interrupted("killed mid-write")
        return real(table, path)

    monkeypatch.setattr(pre, "write_shard", write)


@pytest.mark.parametrize(
    "where",
    ["encoder:0", "encoder:3", "write:2"],  # before any shard, inside shard 2, while renaming shard 2
)
def test_interrupted_precompute_resumes_to_the_same_cache(
    where, uninterrupted, tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch
):
    kind, n = where.split(":")
    out = tmp_path / "cache"
    with monkeypatch.context() as m:
        if kind == "encoder":
            _interrupt_encoder_after(m, int(n))
        else:
            _interrupt_while_writing_shard(m, int(n))
        with pytest.raises(Interrupted):
            _run(tiny_cache[0], out, tiny_pipeline_dir)
    assert not (out / "manifest.json").exists()  # an unfinished cache is never taken for a finished one
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        CacheDataset(out)

    manifest = _run(tiny_cache[0], out, tiny_pipeline_dir)
    want_manifest, want_shards = _content(uninterrupted)
    got_manifest, got_shards = _content(out)
    assert got_manifest | {"source": None} == want_manifest | {"source": None}
    assert got_shards == want_shards  # every column, every value
    keys = [k for s in manifest.shards for k in pq.read_table(out / s["file"], columns=["key"])["key"].to_pylist()]
    raw_keys = [k for s in json.loads((tiny_cache[0] / "manifest.json").read_text())["shards"]
                for k in pq.read_table(tiny_cache[0] / s["file"], columns=["key"])["key"].to_pylist()]  # fmt: skip
    assert keys == raw_keys and len(set(keys)) == len(keys)  # no duplicate, no missing key
    assert not list(out.glob("*.tmp"))


def test_rerun_after_reprepare_recomputes_changed_shards(uninterrupted, tiny_pipeline_dir, tiny_cache, tmp_path):
    """An existing shard is reused only if it holds its raw slice's keys: re-prepared data is recomputed."""
    out = tmp_path / "cache"
    shutil.copytree(uninterrupted, out)
    # the same images minus the first one, prepared again
    images = tmp_path / "images"
    src = tiny_cache[0].parent / "images"
    shutil.copytree(src, images)
    (images / "img00.png").unlink()
    raw = tmp_path / "raw"
    prepare(images, raw, progress=False)
    manifest = _run(raw, out, tiny_pipeline_dir)
    fresh = tmp_path / "fresh"
    _run(raw, fresh, tiny_pipeline_dir)
    assert manifest.num_rows == 7
    assert _content(out)[1] == _content(fresh)[1]
    assert sorted(p.name for p in out.glob("cache-*")) == sorted(s["file"] for s in manifest.shards)


def test_other_settings_are_refused_before_the_encoders_load_and_user_files_stay(
    uninterrupted, tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch
):
    out = tmp_path / "cache"
    shutil.copytree(uninterrupted, out)
    (out / "manifest.json").unlink()  # an unfinished cache, made with max_sequence_length 32
    (out / "my-notes.tmp").write_text("the user's own file")

    def never(*args, **kwargs):
        raise AssertionError("the encoders were loaded before the settings were compared")

    with monkeypatch.context() as m:
        m.setattr(Flux2Klein, "load_encoders", never)
        with pytest.raises(ValueError, match="different settings"):
            precompute(tiny_cache[0], out, tiny_model(tiny_pipeline_dir, max_sequence_length=16),
                       resolution=TINY_RES, progress=False)  # fmt: skip
    _run(tiny_cache[0], out, tiny_pipeline_dir)  # the same settings: continued and finished
    assert (out / "my-notes.tmp").read_text() == "the user's own file"  # only precompute's own temporaries go
