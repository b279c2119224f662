"""DreamBooth class rows: every instance batch gets as many rows from `dataset.class_cache_dir` appended.

The class cache is read in its own resumable order (shuffle seed + 1). Its position is derived from the instance
sampler's: the k-th instance batch of the run (counted over epochs) is paired with the k-th class batch, so a
resumed run pairs exactly what an uninterrupted one would, with no extra checkpoint state.

Merged batch: latent_moments / text_embeds = instance rows then class rows; `is_prior` (2B,) bool; `index` keeps
the instance rows only (what the loop reports for a bad step); `loss_mask` when either cache has one (ones fill in
for the other).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from flowtrain.data.cache import LOSS_MASK, CacheDataset, ResumableSampler

_SAME = ("family", "text_encoder_layers", "max_sequence_length", "latent_stats_sha256")


def check_class_cache(instance: dict, klass: dict, where: str | Path) -> None:
    """The class cache must come from the same model and settings as the instance cache (tensors are concatenated)."""
    fi, fc = instance["fingerprint"], klass["fingerprint"]
    diff = {k: (fi.get(k), fc.get(k)) for k in _SAME if fi.get(k) != fc.get(k)}
    for k in ("latent_shape", "text_shape"):
        if instance.get(k) != klass.get(k):
            diff[k] = (instance.get(k), klass.get(k))
    if diff:
        lines = ", ".join(f"{k}: instance {a!r} ≠ class {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"dataset.class_cache_dir={str(where)!r} does not match dataset.cache_dir ({lines}); precompute the class "
            "images with the same model, resolution and text settings"
        )


class WithClassRows:
    """Iterable over merged (instance + class) batches; wraps the instance DataLoader (same `num_workers`)."""

    def __init__(self, loader: DataLoader, class_loader: DataLoader):
        self.loader, self.class_loader = loader, class_loader

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        classes = iter(self.class_loader)
        for inst in self.loader:
            yield merge_class_rows(inst, next(classes))


def merge_class_rows(inst: dict[str, torch.Tensor], cls: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b, c = inst["latent_moments"].shape[0], cls["latent_moments"].shape[0]
    out = {k: torch.cat([inst[k], cls[k]]) for k in ("latent_moments", "text_embeds")}
    out["index"] = inst["index"]
    out["is_prior"] = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(c, dtype=torch.bool)])
    if LOSS_MASK in inst or LOSS_MASK in cls:
        like = inst.get(LOSS_MASK, cls.get(LOSS_MASK))
        parts = [d.get(LOSS_MASK, torch.ones(n, *like.shape[1:])) for d, n in ((inst, b), (cls, c))]
        out[LOSS_MASK] = torch.cat(parts)
    return out


def with_class_rows(loader: DataLoader, class_cache_dir: str, sampler: ResumableSampler, manifest: dict) -> Any:
    """Wrap the instance `loader` (built on `sampler`) so each batch also holds class rows (see module doc)."""
    dataset = CacheDataset(class_cache_dir)
    check_class_cache(manifest, dataset.manifest, class_cache_dir)
    probe = ResumableSampler(len(dataset), sampler.batch_size, seed=0, world_size=sampler.world_size)
    done = sampler.start_epoch * sampler.batches_per_epoch + sampler.start_batch
    epoch, batch = divmod(done, probe.batches_per_epoch)
    class_sampler = ResumableSampler(
        len(dataset),
        sampler.batch_size,
        seed=sampler.seed + 1,
        shuffle=sampler.shuffle,
        rank=sampler.rank,
        world_size=sampler.world_size,
        start_epoch=epoch,
        start_batch=batch,
    )
    class_loader = DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=class_sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )
    return WithClassRows(loader, class_loader)
