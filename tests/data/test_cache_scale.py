"""The cache reader at scale: a bounded number of open shard handles (an epoch over a 1M-row cache touches ~4k
shards, each a file descriptor and a footer in memory), and rows read the same whatever that bound."""

from __future__ import annotations

import os

import torch

from flowtrain.data import cache as cache_mod
from flowtrain.data.cache import CacheDataset
from flowtrain.testing.synthetic import write_synthetic_cache


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_shard_handles_are_bounded_and_rows_unchanged(tmp_path, monkeypatch):
    path = write_synthetic_cache(tmp_path / "c", 60, latent_shape=(2, 2, 2), text_shape=(4, 8), rows_per_shard=2)
    want = [CacheDataset(path)[i] for i in range(60)]  # the default bound: all 30 shards stay open
    monkeypatch.setattr(cache_mod, "OPEN_SHARDS", 4)
    ds = CacheDataset(path, lru_row_groups=1)
    before = _open_fds()
    order = torch.randperm(60, generator=torch.Generator().manual_seed(0)).tolist()
    for i in order:
        got = ds[i]
        assert all(torch.equal(got[k], want[i][k]) for k in ("latent_moments", "text_embeds"))
        assert len(ds._pf) <= 4
    assert _open_fds() - before <= 4
