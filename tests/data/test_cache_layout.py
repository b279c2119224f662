"""The shard layout in the manifest (`data.layout`): a cache opens without reading every shard's footer, reads the
same rows as through the footers, and still refuses a shard changed after precompute with a clear error."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from flowtrain.data import cache as cache_mod
from flowtrain.data.cache import CacheDataset
from flowtrain.data.layout import LAYOUT_KEYS, has_layout
from flowtrain.data.manifest import CacheError, CacheManifest
from flowtrain.testing.synthetic import write_synthetic_cache

COLS = ("latent_moments", "text_embeds")


@pytest.fixture
def layout_cache(tmp_path):
    # 5 shards of 40 rows (the last 20) in row groups of 16: groups of 16, 16, 8 per full shard
    return write_synthetic_cache(tmp_path / "c", 180, latent_shape=(2, 2, 2), text_shape=(4, 8), rows_per_shard=40)


def _strip_layout(src, dst):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["shards"] = [{k: v for k, v in s.items() if k not in LAYOUT_KEYS} for s in m["shards"]]
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _count_footer_reads(monkeypatch) -> list:
    calls = []
    real = cache_mod._read_footer
    monkeypatch.setattr(cache_mod, "_read_footer", lambda p: calls.append(p) or real(p))
    return calls


def test_precompute_records_each_shards_layout(tiny_cache):
    manifest = CacheManifest.read(tiny_cache[1])
    assert has_layout(manifest.shards)
    for s in manifest.shards:
        md = pq.read_metadata(tiny_cache[1] / s["file"])
        assert s["row_groups"] == [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert s["bytes"] == (tiny_cache[1] / s["file"]).stat().st_size


def test_open_reads_no_footer_and_rows_equal_an_old_manifests(layout_cache, tmp_path, monkeypatch):
    old = _strip_layout(layout_cache, tmp_path / "old")
    calls = _count_footer_reads(monkeypatch)
    ds_old = CacheDataset(old)
    assert len(calls) == 5  # an old manifest: every footer, as before
    calls.clear()
    ds = CacheDataset(layout_cache)
    assert calls == [] and ds._pf == {}  # nothing opened until a row is read
    assert ds.row_group_sizes() == ds_old.row_group_sizes() == [16, 16, 8] * 4 + [16, 4]
    # without file sizes an old manifest's shuffle blocks are its row groups; with them, a small-row shard's
    # groups are one block (data.cache.BLOCK_BYTES)
    assert ds_old.shuffle_blocks(None)["blocks"].tolist() == ds.row_group_sizes()
    assert ds.shuffle_blocks(None)["blocks"].tolist() == [40] * 4 + [20]
    order = torch.randperm(180, generator=torch.Generator().manual_seed(0)).tolist()
    for i in order:
        a, b = ds[i], ds_old[i]
        assert all(torch.equal(a[k], b[k]) for k in COLS) and a["index"] == b["index"] == i


def test_a_shard_changed_after_precompute_is_refused(layout_cache, monkeypatch):
    shard = layout_cache / "cache-00000-0002.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 30), shard)  # another size: checked through its footer at open
    with pytest.raises(CacheError, match=r"cache-00000-0002.parquet: 30 rows, manifest.json says 40"):
        CacheDataset(layout_cache)
    shard.unlink()
    with pytest.raises(CacheError, match=r"cache-00000-0002.parquet: listed in manifest.json but missing"):
        CacheDataset(layout_cache)


def test_a_shard_whose_footer_disagrees_with_the_layout_is_refused_when_first_read(layout_cache):
    # the same file size but other row groups than recorded (as if rewritten in place): only the footer can tell
    m = json.loads((layout_cache / "manifest.json").read_text())
    m["shards"][1]["row_groups"] = [20, 20]
    (layout_cache / "manifest.json").write_text(json.dumps(m))
    ds = CacheDataset(layout_cache)
    assert torch.equal(ds[0]["latent_moments"], ds[0]["latent_moments"])  # shard 0 is fine
    with pytest.raises(CacheError, match=r"cache-00000-0001.parquet: row groups of \[16, 16, 8\] rows, manifest"):
        ds[40]


def test_a_shard_deleted_after_open_gives_the_clear_error_when_read(layout_cache):
    ds = CacheDataset(layout_cache)
    (layout_cache / "cache-00000-0003.parquet").unlink()
    with pytest.raises(CacheError, match=r"cache-00000-0003.parquet: listed in manifest.json but missing"):
        ds[125]
