"""DreamBooth class rows: every instance batch gets as many rows from `dataset.class_cache_dir` appended.

The class cache is read in its own resumable order (shuffle seed + 1). Its position is derived from the instance
sampler's: the k-th instance batch of the run (counted over epochs) is paired with the k-th class batch, so a
resumed run pairs exactly what an uninterrupted one would, with no extra checkpoint state.

Merged batch: every column = instance rows then class rows (variable-length columns re-padded to the longer of
the two, masks alike); `is_prior` (2B,) bool; `index` keeps the instance rows only (what the loop reports for a
bad step); `loss_mask` when either cache has one (ones fill in for the other).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from flowtrain.data.cache import LOSS_MASK, ResumableSampler
from flowtrain.data.manifest import CacheError, CacheManifest


def check_class_cache(instance: CacheManifest, klass: CacheManifest, where: str | Path) -> None:
    """The class cache must come from the same family and settings, with the same column shapes, as the instance
    cache (their rows are concatenated). Whether either fits the model is `ModelFamily.check_cache`'s question."""
    diff: dict[str, tuple[Any, Any]] = {}
    if instance.family != klass.family:
        diff["family"] = (instance.family, klass.family)
    si, sc = instance.fingerprint.get("settings", {}), klass.fingerprint.get("settings", {})
    diff.update({k: (si.get(k), sc.get(k)) for k in si.keys() | sc.keys() if si.get(k) != sc.get(k)})
    ci, cc = ({c.name: list(c.shape) for c in m.columns} for m in (instance, klass))
    diff.update({f"column {k}": (ci.get(k), cc.get(k)) for k in ci.keys() | cc.keys() if ci.get(k) != cc.get(k)})
    if diff:
        lines = ", ".join(f"{k}: instance {a!r} ≠ class {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CacheError(
            f"dataset.class_cache_dir={str(where)!r} does not match dataset.cache_dir ({lines}); precompute the class "
            "images with the same model, resolution and text settings"
        )


class WithClassRows:
    """Iterable over merged (instance + class) batches: the instance loader's and the class loader's (built alike,
    on `class_sampler`), batch by batch."""

    def __init__(self, loader: DataLoader, class_loader: DataLoader):
        self.loader, self.class_loader = loader, class_loader

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        classes = iter(self.class_loader)
        for inst in self.loader:
            yield merge_class_rows(inst, next(classes))


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along the batch, zero-padding dim 1 (a variable-length column or its mask) to the longer."""
    if a.ndim > 1 and a.shape[1] != b.shape[1]:
        n = max(a.shape[1], b.shape[1])
        a, b = (torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1], *t.shape[2:])], dim=1) for t in (a, b))
    return torch.cat([a, b])


def merge_class_rows(inst: dict[str, torch.Tensor], cls: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b, c = len(inst["index"]), len(cls["index"])
    out = {k: _cat_padded(inst[k], cls[k]) for k in inst if k not in ("index", LOSS_MASK)}
    out["index"] = inst["index"]
    out["is_prior"] = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(c, dtype=torch.bool)])
    if LOSS_MASK in inst or LOSS_MASK in cls:
        like = inst.get(LOSS_MASK, cls.get(LOSS_MASK))
        parts = [d.get(LOSS_MASK, torch.ones(n, *like.shape[1:])) for d, n in ((inst, b), (cls, c))]
        out[LOSS_MASK] = torch.cat(parts)
    return out


def class_sampler(sampler: ResumableSampler, num_class_rows: int) -> ResumableSampler:
    """The class cache's sampler, paired with the instance `sampler` (see module doc): its own order (seed + 1), at
    the position of as many batches as the instance sampler starts after."""
    probe = ResumableSampler(num_class_rows, sampler.batch_size, seed=0, world_size=sampler.world_size)
    done = sampler.start_epoch * sampler.batches_per_epoch + sampler.start_batch
    epoch, batch = divmod(done, probe.batches_per_epoch)
    return ResumableSampler(
        num_class_rows,
        sampler.batch_size,
        seed=sampler.seed + 1,
        shuffle=sampler.shuffle,
        rank=sampler.rank,
        world_size=sampler.world_size,
        start_epoch=epoch,
        start_batch=batch,
    )
