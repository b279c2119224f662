"""Block shuffling of the cache (dataset.shuffle_window): a permutation that reads each Parquet row group once an
epoch, a pure function of (row groups, seed, epoch), and a sampler that resumes mid-epoch exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

from flowtrain.data.cache import CacheDataset, ResumableSampler, block_permutation, resolve_shuffle_window
from flowtrain.testing.synthetic import write_synthetic_cache

GROUPS = [16, 16, 16, 16, 16, 7]  # a last, short row group as Parquet writes it


def _group_of(row: int) -> int:
    start = 0
    for g, n in enumerate(GROUPS):
        if row < start + n:
            return g
        start += n
    raise AssertionError(row)


def test_block_permutation_reads_each_row_group_in_one_window_only():
    perm = block_permutation(GROUPS, seed=3, epoch=0, window=2).tolist()
    assert sorted(perm) == list(range(sum(GROUPS)))  # a permutation of every row
    # Cut the order into its windows (two row groups each): every group's rows all fall into one window.
    windows, pos = [], 0
    order = []
    for r in perm:
        if _group_of(r) not in order:
            order.append(_group_of(r))
    for i in range(0, len(order), 2):
        size = sum(GROUPS[g] for g in order[i : i + 2])
        windows.append({_group_of(r) for r in perm[pos : pos + size]})
        pos += size
    assert [w == set(order[i * 2 : i * 2 + 2]) for i, w in enumerate(windows)] == [True] * len(windows)
    # Rows are shuffled within a window, not left in file order.
    assert perm[: GROUPS[order[0]]] != sorted(perm[: GROUPS[order[0]]])


def test_block_permutation_is_a_pure_function_of_seed_and_epoch():
    a = block_permutation(GROUPS, seed=1, epoch=2, window=3)
    assert torch.equal(a, block_permutation(GROUPS, seed=1, epoch=2, window=3))
    assert not torch.equal(a, block_permutation(GROUPS, seed=1, epoch=3, window=3))
    assert not torch.equal(a, block_permutation(GROUPS, seed=2, epoch=2, window=3))


def test_block_permutation_order_is_pinned():
    """The order is part of resume and of every run's data order: the lazy, window-by-window construction gives
    the same rows as the whole-epoch one it replaced (these digests are from that one)."""
    import hashlib

    def digest(groups, seed, epoch, window):
        return hashlib.sha256(block_permutation(groups, seed, epoch, window).numpy().tobytes()).hexdigest()[:16]

    assert digest([16] * 625, 0, 0, 8) == "d5f49900bf62bf6d"
    assert digest([16] * 625, 7, 3, 8) == "20522bae5c03c126"
    assert digest([3, 5, 16, 1, 7, 16, 16, 2] * 50, 7, 3, 3) == "14aaed7f7acfb640"


def test_the_sampler_draws_an_epochs_order_only_as_far_as_it_reads(monkeypatch):
    """The first batch of a large cache shuffles one window, not the whole epoch (start-up, benchmarks/scale.py)."""
    from flowtrain.data import cache as cache_mod

    windows = []
    real = cache_mod.block_permutation_windows

    def counting(*a, **k):
        for w in real(*a, **k):
            windows.append(len(w))
            yield w

    monkeypatch.setattr(cache_mod, "block_permutation_windows", counting)
    groups = [16] * 1000
    first = list(itertools.islice(ResumableSampler(16_000, 4, seed=0, blocks=groups, shuffle_window=8), 4))
    assert windows == [128] and first == block_permutation(groups, 0, 0, 8)[:4].tolist()


@pytest.mark.parametrize("world", [1, 2])
def test_block_shuffled_sampler_resumes_exactly(world):
    """Starting at (epoch, batch) yields exactly what an uninterrupted sampler yields from that batch on."""
    n, bs = sum(GROUPS), 4
    kw = {"seed": 5, "blocks": GROUPS, "shuffle_window": 2, "world_size": world}
    for rank in range(world):
        straight = list(itertools.islice(ResumableSampler(n, bs, rank=rank, **kw), 100 * bs))
        bpe = ResumableSampler(n, bs, rank=rank, **kw).batches_per_epoch
        for epoch, batch in [(0, 3), (1, 0), (2, bpe - 1)]:
            resumed = ResumableSampler(n, bs, rank=rank, start_epoch=epoch, start_batch=batch, **kw)
            skip = (epoch * bpe + batch) * bs
            assert list(itertools.islice(resumed, 8 * bs)) == straight[skip : skip + 8 * bs]


def test_auto_window_keeps_global_shuffle_where_it_costs_nothing():
    assert resolve_shuffle_window(None, [16] * 8, lru_blocks=8) == 0  # the whole cache fits the LRU
    assert resolve_shuffle_window(None, [16] * 9, lru_blocks=8) == 8
    assert resolve_shuffle_window(None, [1] * 500, lru_blocks=8) == 0  # Klein rows: a group per row
    assert resolve_shuffle_window(3, [16] * 100, lru_blocks=8) == 3
    assert resolve_shuffle_window(0, [16] * 100, lru_blocks=8) == 0


def test_precompute_gives_large_rows_row_groups_of_their_own():
    import pyarrow as pa

    from flowtrain.data.precompute import rows_per_group

    klein = pa.table({"t": pa.array([b"x" * (8 * 2**20)] * 3, pa.binary())})  # ~8 MiB a row, like Klein-4B
    small = pa.table({"t": pa.array([b"x" * 30_000] * 40, pa.binary())})
    assert rows_per_group(klein) == 1 and rows_per_group(small) == 16


def test_dataset_reports_its_row_groups_and_decodes_each_once_per_epoch(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", 70, rows_per_shard=40)  # shards of 40 + 30 rows, 16-row groups
    ds = CacheDataset(cache, lru_row_groups=2)
    assert ds.row_group_sizes() == [16, 16, 8, 16, 14]
    blocks = ds.shuffle_blocks(None)
    assert blocks["shuffle_window"] == 2  # 5 groups > LRU of 2
    sampler = ResumableSampler(len(ds), 5, seed=0, **blocks)
    reads = []
    original = ds._row_group

    def counting(shard, rg):
        if (shard, rg) not in ds._lru:
            reads.append((shard, rg))
        return original(shard, rg)

    ds._row_group = counting
    for i in itertools.islice(sampler, sampler.batches_per_epoch * 5):
        ds[i]
    assert len(reads) == len(set(reads)) == 5  # every row group decoded exactly once in the epoch


def test_small_rows_shuffle_by_blocks_of_a_shards_row_groups_each_decoded_once(tmp_path, monkeypatch):
    # rows of ~100 bytes in 16-row groups: a shard's groups join into blocks of BLOCK_BYTES of the file, so a
    # reader opens a shard once a block rather than once a row group (benchmarks/scale.py)
    from flowtrain.data import cache as cache_mod

    cache = write_synthetic_cache(tmp_path / "c", 600, latent_shape=(2, 2, 2), text_shape=(4, 8), rows_per_shard=100)
    shard_bytes = [s["bytes"] for s in CacheDataset(cache).manifest.shards]
    monkeypatch.setattr(cache_mod, "BLOCK_BYTES", shard_bytes[0] // 2)  # two blocks a 100-row shard: 64 + 36 rows
    monkeypatch.setattr(cache_mod, "OPEN_SHARDS", 3)  # as many handles as a window has blocks: a cache "too big"
    ds = CacheDataset(cache, lru_row_groups=3)
    assert ds.row_group_sizes() == ([16] * 6 + [4]) * 6
    blocks = ds.shuffle_blocks(None)
    assert blocks["blocks"].tolist() == [64, 36] * 6  # never across a shard
    assert blocks["shuffle_window"] == 3 and ds.lru_row_groups == 3 * 4  # a window of blocks, each up to 4 groups
    sampler = ResumableSampler(len(ds), 5, seed=0, **blocks)
    reads, opens = [], []
    load, open_file = ds._row_group, ds._file

    def counting(shard, rg):
        if (shard, rg) not in ds._lru:
            reads.append((shard, rg))
        return load(shard, rg)

    def counting_opens(shard):
        if shard not in ds._pf:
            opens.append(shard)
        return open_file(shard)

    ds._row_group, ds._file = counting, counting_opens
    for i in itertools.islice(sampler, sampler.batches_per_epoch * 5):
        ds[i]
    assert len(reads) == len(set(reads)) == 42  # every row group decoded exactly once in the epoch
    assert len(opens) <= 12  # a shard opened once a block at most (one a row group would be 42)
