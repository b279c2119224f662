"""A tiny mixed-shape dataset and its aspect-ratio bucketed cache, for tests and benchmarks (no downloads).

At the tiny Klein pipeline's 32 px (pixel multiple 4, max aspect 2) the buckets are 40×24, 36×28, 32×32, 28×36 and
24×40 (height × width); `MIXED_SIZES` fills four of them with at least four rows each (two global batches of 2 on
one process, one on two), from shapes that are tall, wide, tiny, large and odd.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (height, width) of each image → the bucket it lands in at 32 px
MIXED_SIZES: tuple[tuple[int, int], ...] = (
    (32, 32), (48, 48), (200, 210), (33, 31),  # square-ish → 32×32
    (64, 32), (100, 30), (80, 41), (42, 24),  # tall, up to 3.3:1 → 40×24 (the crop takes the rest)
    (32, 64), (24, 44), (30, 90), (300, 520),  # wide → 24×40
    (45, 35), (20, 16), (90, 70), (37, 29),  # 5:4-ish portrait, one tiny (scaled up) → 36×28
)  # fmt: skip
TINY_BUCKET_SPEC = {"targets": (32,), "multiple": 4, "max_aspect": 2.0}


def make_mixed_image_folder(root: Path, sizes: tuple[tuple[int, int], ...] = MIXED_SIZES, seed: int = 0) -> Path:
    """One RGB PNG per (height, width) in `sizes`, with a caption each; a gradient plus noise, so a crop or a
    stretch changes the latents."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([255 * yy / max(h - 1, 1), 255 * xx / max(w - 1, 1), np.full((h, w), 80.0 * (i % 3))], -1)
        img = np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a {h} by {w} picture number {i}")
    return root


def make_bucketed_cache(
    root: Path,
    pipeline: Path,
    *,
    family: str = "flux2_klein",
    sizes: tuple[tuple[int, int], ...] = MIXED_SIZES,
    rows_per_shard: int = 256,
    resolution: int | None = None,
) -> tuple[Path, Path]:
    """prepare + precompute (`--buckets` at `resolution`, default the family's tiny resolution, its pixel multiple,
    max aspect 2) images of `sizes` for a family's tiny pipeline; returns (raw_dir, cache_dir)."""
    from flowtrain.data.buckets import BucketSpec
    from flowtrain.data.precompute import precompute
    from flowtrain.data.prepare import prepare
    from flowtrain.models import get_family
    from flowtrain.testing.data import tiny_model

    images = make_mixed_image_folder(root / "images", sizes)
    prepare(images, root / "raw", progress=False)
    fam, model = get_family(family), tiny_model(pipeline, family)
    side = resolution or fam.tiny_resolution
    spec = BucketSpec((side,), fam.pixel_multiple(model), TINY_BUCKET_SPEC["max_aspect"])
    precompute(root / "raw", root / "cache", model, resolution=side, batch_size=4, progress=False,
               rows_per_shard=rows_per_shard, buckets=spec)  # fmt: skip
    return root / "raw", root / "cache"
