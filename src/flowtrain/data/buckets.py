"""Aspect-ratio buckets: which (height, width) each image is trained at, as pure functions of sizes.

A bucket is a training size whose sides are multiples of the family's pixel multiple (`ModelFamily.pixel_multiple`:
VAE factor × latent patch) and whose area is at most, and close to, a target area (side² of a target side). Every
image goes to the bucket of the target closest to its own area (never one that needs upscaling, when a smaller
target exists) whose aspect ratio is nearest to its own, in log space (2:1 and 1:2 are equally far from 1:1). It is
then scaled to cover the bucket, aspect kept, and centre-cropped: a crop, never a stretch.

Precompute (`flowtrain.data.precompute`) calls `assign`; the cache keeps one bucket per shard and the sampler
(`flowtrain.data.bucket_sampler`) batches within a bucket.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Size = tuple[int, int]  # (height, width) in pixels, the order validation.sizes and torch use


@dataclass(frozen=True)
class BucketSpec:
    """How precompute buckets a dataset. `targets`: square sides whose areas the buckets aim at (the first is the
    cache's `resolution`); `multiple`: the pixel multiple; `max_aspect`: the largest long/short side ratio."""

    targets: tuple[int, ...]
    multiple: int
    max_aspect: float = 2.0

    def __post_init__(self) -> None:
        if not self.targets or any(t < self.multiple for t in self.targets):
            raise ValueError(
                f"bucket target sides {list(self.targets)} must each be >= the pixel multiple {self.multiple}"
            )
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1 (long side / short side), got {self.max_aspect}")

    def to_json(self) -> dict:
        return {"targets": list(self.targets), "multiple": self.multiple, "max_aspect": self.max_aspect}

    @property
    def buckets(self) -> list[Size]:
        """Every bucket of every target, sorted (the order bucket indices refer to)."""
        return sorted({b for t in self.targets for b in buckets_for_area(t * t, self.multiple, self.max_aspect)})


@functools.lru_cache(maxsize=64)  # asked once per image with the same arguments
def buckets_for_area(area: int, multiple: int, max_aspect: float) -> tuple[Size, ...]:
    """The buckets of one target `area` (pixels²): for each short side s (a multiple of `multiple`), the longest
    long side l (a multiple too) with s·l ≤ area, kept when l/s ≤ max_aspect, as a tall (l, s) and a wide (s, l)
    bucket. Sorted by aspect h/w, tall first.

    At most the target area, so a batch of any bucket needs no more memory than the square one; more than
    area − l·multiple, since one more step of the short side would pass the target. Mirrored, so portrait and
    landscape images of the same shape are cropped alike.
    """
    m = multiple
    out: set[Size] = set()
    s = m
    while s * s <= area:
        long = (area // s) // m * m
        if long / s <= max_aspect + 1e-9:
            out |= {(long, s), (s, long)}
        s += m
    # A target that is not a multiple of `multiple` still gets its nearest square-ish bucket.
    if not out:
        side = max(m, math.isqrt(area) // m * m)
        out.add((side, side))
    return tuple(sorted(out, key=lambda b: (-b[0] / b[1], b)))


def log_aspect_error(size: Size, bucket: Size) -> float:
    """|log(h/w) − log(bh/bw)|: how far apart two aspect ratios are (0: the same shape)."""
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def choose_target(size: Size, targets: Sequence[int]) -> int:
    """The target side for an image of `size`: the largest whose area the image reaches (no upscaling), else the
    smallest (a tiny image is scaled up to the smallest target, as a square cache scales it up to `resolution`)."""
    area = size[0] * size[1]
    reachable = [t for t in targets if t * t <= area]
    return max(reachable) if reachable else min(targets)


def assign(size: Size, spec: BucketSpec) -> Size:
    """The bucket of an image of `size` (height, width): of its target's buckets, the one nearest in aspect (ties:
    the larger area, then the smaller height, so the choice is deterministic)."""
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"image size must be positive, got {size}")
    target = choose_target(size, spec.targets)
    candidates, logs = _by_log_aspect(target * target, spec.multiple, spec.max_aspect)
    # Aspects are distinct within one target (the long side shrinks as the short side grows), so the nearest is one
    # of the two around the image's own: a bisection instead of a scan (~16× faster with 85 buckets over three targets).
    i = bisect.bisect_left(logs, math.log(size[0] / size[1]))
    near = candidates[max(0, i - 1) : i + 1]
    return min(near, key=lambda b: (round(log_aspect_error(size, b), 12), -b[0] * b[1], b[0]))


@functools.lru_cache(maxsize=64)
def _by_log_aspect(area: int, multiple: int, max_aspect: float) -> tuple[tuple[Size, ...], list[float]]:
    """`buckets_for_area` sorted by log(h/w) ascending, with those logs."""
    ordered = tuple(sorted(buckets_for_area(area, multiple, max_aspect), key=lambda b: math.log(b[0] / b[1])))
    return ordered, [math.log(h / w) for h, w in ordered]


def cover_size(size: Size, bucket: Size) -> Size:
    """The (height, width) an image of `size` is scaled to before the centre crop: one scale factor for both sides
    (aspect kept), the smallest that covers `bucket`; rounded, never below the bucket."""
    h, w = size
    bh, bw = bucket
    scale = max(bh / h, bw / w)
    return max(bh, round(h * scale)), max(bw, round(w * scale))


def crop_box(scaled: Size, bucket: Size) -> tuple[int, int, int, int]:
    """The centred (left, top, right, bottom) box of `bucket` in an image of size `scaled` (PIL's crop order)."""
    (sh, sw), (bh, bw) = scaled, bucket
    left, top = (sw - bw) // 2, (sh - bh) // 2
    return left, top, left + bw, top + bh


def bucket_counts(sizes: Sequence[Size], spec: BucketSpec) -> dict[Size, int]:
    """How many of `sizes` land in each bucket (buckets with none left out), in `spec.buckets` order."""
    counts: dict[Size, int] = {}
    for s in sizes:
        b = assign(s, spec)
        counts[b] = counts.get(b, 0) + 1
    return {b: counts[b] for b in spec.buckets if b in counts}


def shard_counts(shards: Sequence[dict]) -> dict[Size, int]:
    """Rows per bucket of a cache's manifest `shards` (entries with a `bucket`), sorted by bucket; they add up to
    the rows of the bucketed shards."""
    counts: dict[Size, int] = {}
    for s in shards:
        if s.get("bucket"):
            b = (int(s["bucket"][0]), int(s["bucket"][1]))
            counts[b] = counts.get(b, 0) + int(s["rows"])
    return dict(sorted(counts.items()))


def describe_counts(counts: dict[Size, int]) -> str:
    """`24x40: 4, 32x32: 12` (height x width: rows), for summaries."""
    return ", ".join(f"{h}x{w}: {n}" for (h, w), n in counts.items())


# ---- the cache side: precompute's grouping, and the shapes a bucket's shard declares ------------------------------
def bucket_shapes(columns: Sequence[Any], resolution: int, bucket: Size) -> dict[str, list[int]]:
    """The per-row shapes of the image columns in a shard of `bucket`: a family declares its image columns at the
    square `resolution` with the latent grid (res/f, res/f) as their last two axes; a bucket's grid is (H/f, W/f).
    Text columns do not depend on the image size and are left out."""
    h, w = bucket
    out = {}
    for c in columns:
        if c.source != "image":
            continue
        *lead, gh, gw = c.shape
        if (gh * h) % resolution or (gw * w) % resolution:
            raise ValueError(
                f"bucket {h}x{w} does not map onto column {c.name!r}'s latent grid ({gh}x{gw} at {resolution} px): "
                "bucket sides must be multiples of the model's pixel multiple"
            )
        out[c.name] = [*lead, gh * h // resolution, gw * w // resolution]
    return out


def cache_slices(
    table: Any, raw_index: int, rows_per_shard: int, spec: BucketSpec | None
) -> Iterator[tuple[str, Size | None, Any]]:
    """(cache shard file name, bucket, rows) for one raw shard (a pyarrow table with `width` and `height` columns),
    at most `rows_per_shard` rows each. Square (`spec` None): slices of the table in order, `cache-RRRRR-CCCC.parquet`.
    Bucketed: the rows of each bucket in raw order, buckets in `spec.buckets` order, sliced the same way,
    `cache-RRRRR-bBBB-CCCC.parquet` (BBB the bucket's index in `spec.buckets`)."""
    if spec is None:
        parts = [(f"cache-{raw_index:05d}", None, table)]
    else:
        sizes = zip(table.column("height").to_pylist(), table.column("width").to_pylist(), strict=True)
        index = {b: i for i, b in enumerate(spec.buckets)}
        rows: dict[int, list[int]] = {}
        for row, size in enumerate(sizes):
            rows.setdefault(index[assign(size, spec)], []).append(row)
        parts = [(f"cache-{raw_index:05d}-b{i:03d}", spec.buckets[i], table.take(rows[i])) for i in sorted(rows)]
    for stem, bucket, group in parts:
        for chunk, start in enumerate(range(0, group.num_rows, rows_per_shard)):
            yield f"{stem}-{chunk:04d}.parquet", bucket, group.slice(start, rows_per_shard)


def shard_entry(name: str, rows: int, bucket: Size | None, columns: Sequence[Any], resolution: int) -> dict:
    """A cache manifest's `shards` entry: `file` and `rows`, plus `bucket` (height, width) and the image columns'
    `shapes` for a bucket's shard."""
    entry: dict[str, Any] = {"file": name, "rows": rows}
    if bucket is not None:
        entry |= {"bucket": list(bucket), "shapes": bucket_shapes(columns, resolution, bucket)}
    return entry
