"""Reading the latent cache in training: a map-style Dataset plus a resumable, rank-sharded sampler."""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler

from flowtrain.data.precompute import CACHE_KIND
from flowtrain.data.tensors import column_to_tensor


def read_manifest(cache_dir: str | Path) -> dict:
    """The cache manifest; a clear error when the folder is not a finished cache."""
    path = Path(cache_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `flowtrain precompute RAW_DIR --out {cache_dir}` first "
            "(a cache without manifest.json is incomplete)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != CACHE_KIND:
        raise ValueError(f"{path}: kind {manifest.get('kind')!r} is not a flowtrain latent cache")
    return manifest


class CacheDataset(Dataset):
    """Rows of a latent cache: {"latent_moments": (2C, h, w) f32, "text_embeds": (L, D) f32, "index": int}.

    Shards are read one row group at a time with a small LRU, so memory stays bounded for Klein-sized rows.
    """

    def __init__(self, cache_dir: str | Path, lru_row_groups: int = 8):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        self.text_dtype = self.manifest["text_storage_dtype"]
        self.latent_dtype = self.manifest.get("latent_storage_dtype", "float32")
        self._files = [s["file"] for s in self.manifest["shards"]]
        self._starts: list[int] = []
        n = 0
        for s in self.manifest["shards"]:
            self._starts.append(n)
            n += s["rows"]
        self._len = n
        self._lru: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()
        self._lru_size = lru_row_groups
        self._pf: dict[int, pq.ParquetFile] = {}
        self._rg_starts: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self._len

    def empty_prompt_embeds(self) -> torch.Tensor:
        """(L, D) float32 embedding of the empty prompt (caption dropout / CFG's unconditional branch)."""
        from safetensors.torch import load_file

        return load_file(str(self.dir / self.manifest["empty_prompt"]))["text_embeds"].float()

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard not in self._pf:  # opened lazily: DataLoader workers each open their own handles
            pf = pq.ParquetFile(self.dir / self._files[shard])
            starts, n = [], 0
            for i in range(pf.metadata.num_row_groups):
                starts.append(n)
                n += pf.metadata.row_group(i).num_rows
            self._pf[shard], self._rg_starts[shard] = pf, starts
        return self._pf[shard]

    def _row_group(self, shard: int, rg: int) -> dict[str, torch.Tensor]:
        key = (shard, rg)
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        table = self._file(shard).read_row_group(rg, columns=["latent_moments", "text_embeds"])
        data = {
            "latent_moments": column_to_tensor(table.column("latent_moments"), self.latent_dtype),
            "text_embeds": column_to_tensor(table.column("text_embeds"), self.text_dtype),
        }
        self._lru[key] = data
        if len(self._lru) > self._lru_size:
            self._lru.popitem(last=False)
        return data

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self._len:
            raise IndexError(index)
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        self._file(shard)
        rg = bisect.bisect_right(self._rg_starts[shard], local) - 1
        data = self._row_group(shard, rg)
        i = local - self._rg_starts[shard][rg]
        return {
            "latent_moments": data["latent_moments"][i].float(),
            "text_embeds": data["text_embeds"][i].float(),
            "index": index,
        }


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack rows into (B, ...) tensors; `index` becomes a (B,) int64 tensor."""
    return {
        "latent_moments": torch.stack([r["latent_moments"] for r in rows]),
        "text_embeds": torch.stack([r["text_embeds"] for r in rows]),
        "index": torch.tensor([r["index"] for r in rows], dtype=torch.int64),
    }


def epoch_permutation(num_rows: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The row order of one epoch; a pure function of (seed, epoch) so resume can rebuild it."""
    if not shuffle:
        return torch.arange(num_rows)
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class ResumableSampler(Sampler[int]):
    """Yields row indices for one rank, epoch after epoch, starting at (epoch, batch) — exact resume.

    Each epoch's permutation is split into `batch_size * world_size` blocks; rank r takes the r-th slice of each
    block, and the incomplete tail is dropped so every rank runs the same number of steps (DDP needs that).
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_epoch: int = 0,
        start_batch: int = 0,
    ):
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.batches_per_epoch = num_rows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the cache has {num_rows} rows, fewer than one global batch "
                f"(train.batch_size={batch_size} × {world_size} processes): lower train.batch_size or add data"
            )

    def __iter__(self) -> Iterator[int]:
        epoch, first = self.start_epoch, self.start_batch
        global_batch = self.batch_size * self.world_size
        while True:
            perm = epoch_permutation(self.num_rows, self.seed, epoch, self.shuffle)
            for b in range(first, self.batches_per_epoch):
                block = perm[b * global_batch : (b + 1) * global_batch]
                yield from block[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            epoch, first = epoch + 1, 0

    def position_after(self, batches_consumed: int) -> tuple[int, int]:
        """(epoch, batch) of the next batch after `batches_consumed` batches since the start position."""
        total = self.start_epoch * self.batches_per_epoch + self.start_batch + batches_consumed
        return divmod(total, self.batches_per_epoch)
