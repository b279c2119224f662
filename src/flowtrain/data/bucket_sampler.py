"""The sampler of a cache of several latent shapes: every batch holds rows of one bucket only.

A bucket is one aspect-ratio bucket (`precompute --buckets`) and one clip length (a video cache's images are
one-frame clips next to its videos' clips). Rows of different buckets have latents of different shapes, so they
cannot share a batch. Each epoch, every
bucket's rows are shuffled and cut into global batches (`batch_size × world_size` rows; each bucket's incomplete
tail is dropped that epoch), and the global batches of all buckets are shuffled together. Rank r takes the r-th
`batch_size` rows of each global batch, so at every step all ranks hold disjoint rows of the same bucket and run
the same number of steps (DDP's collectives pair up; every rank's tensors have the same shape). The order is a
pure function of (seed, epoch): a resumed run rebuilds it and continues at its batch, mid-epoch.

torch's `BatchSampler` / a per-rank `DistributedSampler` cannot give this: they know nothing of buckets, and a
per-rank split of each bucket would let ranks step through different buckets (and different counts) at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from flowtrain.data.manifest import CacheManifest


def rows_by_bucket(manifest: CacheManifest) -> list[list[int]] | None:
    """Row indices of each bucket, a bucket being the rows of one latent shape: one clip length (`shard_frames`;
    a video cache's images are one-frame clips) and one aspect-ratio bucket (`shard_buckets`). Sorted by (frames,
    (height, width)), the declared frame count first; so an aspect-ratio bucketed cache's buckets are in (height,
    width) order as they always were. None for a cache of one shape (square, bucketed to one shape, or clips of
    one length), which the plain `ResumableSampler` reads as it always did."""
    buckets: dict[tuple[int, tuple[int, int]], list[int]] = {}
    start = 0
    for shard, frames, bucket in zip(manifest.shards, manifest.shard_frames, manifest.shard_buckets, strict=True):
        buckets.setdefault((frames or 0, bucket or (0, 0)), []).extend(range(start, start + shard["rows"]))
        start += shard["rows"]
    if len(buckets) <= 1:
        return None
    return [buckets[b] for b in sorted(buckets)]


def bucket_batches(buckets: Sequence[Sequence[int]], global_batch: int, seed: int, epoch: int, shuffle: bool):
    """The global batches of one epoch: a list of `global_batch`-row index lists, each from one bucket.

    With `shuffle`, one generator seeded by (seed, epoch) permutes each bucket's rows (in bucket order), then the
    order of all batches; without, buckets in order, rows in order. Each bucket's last `len % global_batch` rows
    (after its permutation) sit out the epoch.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches: list[list[int]] = []
    for rows in buckets:
        order = torch.tensor(rows, dtype=torch.int64)
        if shuffle:
            order = order[torch.randperm(len(rows), generator=g)]
        full = len(rows) // global_batch * global_batch
        batches.extend(order[:full].view(-1, global_batch).tolist() if full else [])
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


class BucketSampler(Sampler[int]):
    """Yields one rank's row indices, `batch_size` rows of one bucket per step, epoch after epoch, from (epoch,
    batch) on: the interface of `data.cache.ResumableSampler` (`batches_per_epoch`, `position_after`), so the loop,
    checkpoints and resume treat both alike."""

    def __init__(
        self,
        buckets: Sequence[Sequence[int]],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_epoch: int = 0,
        start_batch: int = 0,
    ):
        self.buckets = [list(b) for b in buckets]
        self.num_rows = sum(len(b) for b in self.buckets)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.start_batch = start_epoch, start_batch
        global_batch = batch_size * world_size
        self.batches_per_epoch = sum(len(b) // global_batch for b in self.buckets)
        if self.batches_per_epoch == 0:
            sizes = [len(b) for b in self.buckets]
            raise ValueError(
                f"no bucket of the cache (aspect ratio, or clip length) holds one global batch (train.batch_size="
                f"{batch_size} × {world_size} processes = {global_batch} rows; bucket sizes {sizes}): lower "
                "train.batch_size, add data, or precompute with fewer buckets (a smaller --max-aspect, without "
                "--buckets, or images and videos in separate caches)"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch` (all ranks' rows), in order."""
        return bucket_batches(self.buckets, self.batch_size * self.world_size, self.seed, epoch, self.shuffle)

    def __iter__(self) -> Iterator[int]:
        epoch, first = self.start_epoch, self.start_batch
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while True:
            for block in self.epoch_batches(epoch)[first:]:
                yield from block[lo:hi]
            epoch, first = epoch + 1, 0

    def position_after(self, batches_consumed: int) -> tuple[int, int]:
        """(epoch, batch) of the next batch after `batches_consumed` batches since the start position."""
        total = self.start_epoch * self.batches_per_epoch + self.start_batch + batches_consumed
        return divmod(total, self.batches_per_epoch)
