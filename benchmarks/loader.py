"""Cache loader: samples/s through flowtrain's real DataLoader (CacheDataset + ResumableSampler + collate, workers
0/1/2) vs the raw read of the same bytes (pyarrow: every row group in file order, `to_numpy`, no torch).

Caches are synthetic but written by precompute's own writer (same compression and row groups) with real shapes:
  klein4b       latent moments 128×32×32 float32 + text 512×7680 bfloat16 (Klein-4B at 512 px), ~8 MiB a row
  klein4b-rg16  the same rows in the earlier layout of 16 rows per row group
  tiny          latent moments 8×16×16 float32 + text 32×96 float32 (the test suite's tiny pipeline)
Values are Gaussian: zstd gains ~4% on them; real embeddings may compress better, which changes the bytes on disk
more than the decoding work.

Orders: `block` is flowtrain's default (dataset.shuffle_window auto: row groups permuted and rows shuffled within
windows of 8 groups, or one global permutation where that costs nothing, e.g. one row per group); `global` forces
one global permutation; `sequential` is shuffle off.

    .venv/bin/python benchmarks/loader.py                    # all row kinds, ~10 min on 2 cores
    .venv/bin/python benchmarks/loader.py --rows tiny --workers 0 2 --orders global block
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# rows_per_group: None = what precompute writes (one Klein row per row group; 16 tiny rows); klein4b-rg16 is the
# earlier layout (16 Klein rows per group), kept to show what block shuffling buys there.
# lru: the reader's row-group LRU; 2 of klein4b-rg16's 6 groups makes that cache 3× larger than the LRU, as a real
# one is (10k images = 625 groups of 16 vs the default LRU of 8).
# max_rows: rows read per measurement (global order on klein4b-rg16 decodes a 16-row group per row: keep it short).
SHAPES = {
    "klein4b": {"latent": (128, 32, 32), "text": (512, 7680), "text_dtype": "bfloat16", "rows": 96, "batch": 1,
                "rows_per_group": None, "lru": 8, "max_rows": {"block": 48, "sequential": 48, "global": 48},
                "orders": ["block"], "workers": [0, 1, 2]},
    "klein4b-rg16": {"latent": (128, 32, 32), "text": (512, 7680), "text_dtype": "bfloat16", "rows": 96,
                     "batch": 1, "rows_per_group": 16, "lru": 2,
                     "max_rows": {"block": 48, "sequential": 48, "global": 12},
                     "orders": ["block", "global"], "workers": [0]},
    "tiny": {"latent": (8, 16, 16), "text": (32, 96), "text_dtype": "float32", "rows": 8192, "batch": 8,
             "rows_per_group": None, "lru": 8, "max_rows": {"block": 8192, "sequential": 8192, "global": 4096},
             "orders": ["block", "global"], "workers": [0, 1, 2]},
}  # fmt: skip


def synthetic_cache(name: str, rows: int) -> Path:
    """A cache of `rows` Gaussian rows with the shapes of `name`, written like precompute writes shards."""
    from flowtrain.testing.synthetic import write_synthetic_cache

    spec = SHAPES[name]
    return write_synthetic_cache(
        common.bench_dir() / f"loader-{name}-{rows}",
        rows,
        latent_shape=spec["latent"],
        text_shape=spec["text"],
        text_dtype=spec["text_dtype"],
        rows_per_shard=256 if name == "tiny" else 48,
        rows_per_group=spec["rows_per_group"],
    )


def raw_read(cache: Path) -> tuple[float, int]:
    """(seconds, rows): read every row group of every shard and turn each declared column into a numpy array."""
    import json

    import pyarrow.parquet as pq

    manifest = json.loads((cache / "manifest.json").read_text())
    columns = [c["name"] for c in manifest["columns"]]  # the family's declared columns (fixed-shape here)
    t, n = time.perf_counter(), 0
    for s in manifest["shards"]:
        pf = pq.ParquetFile(cache / s["file"])
        for rg in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(rg, columns=columns)
            for col in columns:
                table.column(col).combine_chunks().to_numpy_ndarray()
            n += table.num_rows
    return time.perf_counter() - t, n


def loader_read(cache: Path, batch: int, workers: int, order: str, lru: int, max_rows: int) -> tuple[float, int]:
    """(seconds, rows) for up to `max_rows` rows (one epoch at most) through the training DataLoader, timed after
    its first batch (worker start-up is paid once per run, not per sample)."""
    import torch

    from flowtrain.data.cache import CacheDataset, ResumableSampler
    from flowtrain.data.loader import build_loader

    ds = CacheDataset(cache, lru_row_groups=lru)
    blocks = ds.shuffle_blocks(None if order == "block" else 0)
    sampler = ResumableSampler(len(ds), batch, seed=0, shuffle=order != "sequential", **blocks)
    loader = build_loader(ds, sampler, batch_size=batch, collate_fn=ds.collate, num_workers=workers, pin_memory=True,
                          prefetch_factor=2, device=torch.device("cpu"))  # fmt: skip
    it = iter(loader)
    next(it)
    steps = min(sampler.batches_per_epoch, max_rows // batch) - 1
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    dt = time.perf_counter() - t
    del it, loader
    return dt, steps * batch


def on_disk(cache: Path) -> tuple[float, float, str]:
    """(bytes per row on disk, bytes per row uncompressed, compression codec)."""
    import pyarrow.parquet as pq

    files = sorted(cache.glob("cache-*.parquet"))
    disk = sum(f.stat().st_size for f in files)
    md = pq.ParquetFile(files[0]).metadata
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    raw = 0
    for f in files:
        m = pq.ParquetFile(f).metadata
        raw += sum(m.row_group(i).total_byte_size for i in range(m.num_row_groups))
    codec = md.row_group(0).column(md.num_columns - 1).compression
    return disk / rows, raw / rows, f"{codec}, {md.row_group(0).num_rows} rows/row group"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--workers", nargs="*", type=int, help="DataLoader workers to measure (default: per row kind)")
    p.add_argument("--orders", nargs="*", choices=["sequential", "block", "global"],
                   help="orders to measure (default: per row kind; `block` is flowtrain's default, auto)")  # fmt: skip
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions (median)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = []
    for name in args.rows:
        spec = SHAPES[name]
        cache = synthetic_cache(name, spec["rows"])
        per_row, raw_row, codec = on_disk(cache)
        runs = {"raw": lambda c=cache: raw_read(c)}
        for order in args.orders or spec["orders"]:
            for w in spec["workers"] if args.workers is None else args.workers:
                runs[f"{order}/w{w}"] = lambda c=cache, w=w, o=order, s=spec: loader_read(
                    c, s["batch"], w, o, s["lru"], s["max_rows"][o]
                )
        rates = common.interleave({k: (lambda f=f: (lambda r: r[1] / r[0])(f())) for k, f in runs.items()}, args.reps)
        raw = common.median(rates["raw"])
        for k, v in rates.items():
            rate = common.median(v)
            results.append({
                "rows": name, "reader": k, "samples_per_s": rate, "MB_per_s": rate * raw_row / 1e6,
                "vs_raw": rate / raw, "disk_MB_per_sample": per_row / 1e6, "compression": f"{codec}, "
                f"{per_row / raw_row:.2f}× of {raw_row / 1e6:.3g} MB",
            })  # fmt: skip
    common.report("cache loader (samples/s vs raw pyarrow read)", results, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
