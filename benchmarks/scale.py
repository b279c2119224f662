"""Scale: does the training data path cost the same at 1M rows as at 10k? Ratios between two synthetic caches.

Two caches as `flowtrain precompute` lays them out (`flowtrain.testing.synthetic`: its writer, 256 rows a shard,
its row-group sizes; Gaussian values): 10k rows and 1M rows, both of tiny rows (latent moments (2, 2, 2) float32,
text (4, 8) float32: ~100 bytes), so the number of rows, shards and row groups is all that differs. Each is
opened in a fresh process that does what `flowtrain.train.run` does with a cache before the first step —
`CacheDataset` (the manifest and each shard's layout in it, one `stat` a shard; footers are read when a shard is
first opened), `ResumableSampler` with `shuffle_blocks`, the DataLoader
(`build_loader`, `dataset.*` defaults), the first batch — then reads batches for the throughput:

  start-up      seconds from before `CacheDataset(...)` to the first batch in hand   target: 1M / 10k ≤ 1.5×
  peak RSS      the process's ru_maxrss after the batches, minus the 10k cache's    target: ≤ 100 MB more
  throughput    samples/s over the batches after the first                          target: 1M / 10k ≥ 0.9×

A third run reads the 1M cache through a manifest without the shard layout (`data.layout`; the shards linked
into `cache-1000000-nolayout`), as every reader did before: start-up then reads all ~3,900 footers.

The model is left out of those on purpose, to see the data path's own growth. With --train, the measure the
issue names: `flowtrain train` itself, in a fresh process (the tiny Klein pipeline, LoRA, JSONL tracking, 3 steps),
on a 10k-row and a 1M-row cache of rows it trains on (16 px latents (8, 8, 8) + 8-token text (8, 96), float32:
5 KiB a row, 5 GB for 1M; written once, ~3 min):

  training start-up   process start → the first optimizer step done (`time` of step 1 in logs/metrics.jsonl)
                                                                                      target: 1M / 10k ≤ 1.5×
  peak RSS            the training process's maximum resident set (wait4)             target: ≤ 100 MB more
  throughput          the data path alone (as above) on the same two caches           target: 1M / 10k ≥ 0.9×

With --bytes: bytes per sample of each family's cache at 1024 px, as declared (the columns' shapes and dtypes,
docs/models/) and on disk: a shard of 16 rows in each family's layout written by precompute's own `write_shard`
(zstd) with Gaussian values: zstd finds next to nothing to remove from them, so the figure is the declared size
plus Parquet's own overhead; real encoder outputs may compress somewhat better.

    .venv/bin/python benchmarks/scale.py                 # builds the caches once (~3 min), then ~1 min per rep
    .venv/bin/python benchmarks/scale.py --rows 10000 1000000 --batches 2000 --reps 3
    .venv/bin/python benchmarks/scale.py --bytes         # ~1 min
    .venv/bin/python benchmarks/scale.py --train --reps 3  # builds its caches once, then ~1 min per rep
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

LATENT, TEXT = (2, 2, 2), (4, 8)
BATCH = 4


def cache(rows: int, latent: tuple[int, ...] = LATENT, text: tuple[int, ...] = TEXT, name: str = "cache") -> Path:
    """A synthetic cache of `rows` rows of these shapes, written once under the bench folder."""
    from flowtrain.testing.synthetic import write_synthetic_cache

    path = common.bench_dir() / "scale" / f"{name}-{rows}"
    if not (path / "manifest.json").exists():
        t = time.perf_counter()
        write_synthetic_cache(path, rows, latent_shape=latent, text_shape=text)
        print(f"wrote {rows} rows to {path} in {time.perf_counter() - t:.0f}s", flush=True)
    return path


def without_layout(path: Path) -> Path:
    """The same cache as a manifest from before `data.layout` sees it: shards linked, layout keys dropped (so its
    reader reads every footer at start-up, as all readers did before)."""
    from flowtrain.data.layout import LAYOUT_KEYS

    old = path.with_name(path.name + "-nolayout")
    if not (old / "manifest.json").exists():
        old.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():
            if f.name != "manifest.json" and not (old / f.name).exists():
                (old / f.name).symlink_to(f.resolve())
        m = json.loads((path / "manifest.json").read_text())
        m["shards"] = [{k: v for k, v in s.items() if k not in LAYOUT_KEYS} for s in m["shards"]]
        (old / "manifest.json").write_text(json.dumps(m))
    return old


def child(path: Path, batches: int) -> dict:
    """In a fresh process: what training does with the cache before its first step, then `batches` batches."""
    import resource

    import torch

    from flowtrain.config.schema import DatasetConfig
    from flowtrain.data.cache import CacheDataset, ResumableSampler
    from flowtrain.data.loader import build_loader

    d = DatasetConfig(cache_dir=str(path))  # the defaults a config gets
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    dataset = CacheDataset(path)
    t_open = time.perf_counter() - t0
    sampler = ResumableSampler(len(dataset), BATCH, seed=0, shuffle=d.shuffle,
                               **dataset.shuffle_blocks(d.shuffle_window))  # fmt: skip
    loader = build_loader(dataset, sampler, batch_size=BATCH, collate_fn=dataset.collate, num_workers=d.num_workers,
                          pin_memory=d.pin_memory, prefetch_factor=d.prefetch_factor,
                          device=torch.device("cpu"))  # fmt: skip
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * BATCH / (time.perf_counter() - t1)
    return {
        "startup_s": startup,
        "open_s": t_open,
        "samples_per_s": rate,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss0,
    }


def run_child(path: Path, batches: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--batches", str(batches)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


TRAIN_LATENT, TRAIN_TEXT = (8, 8, 8), (8, 96)  # the tiny Klein pipeline at 16 px, max_sequence_length 8


def train_run(cache_dir: Path, work: Path, steps: int = 3) -> dict:
    """`flowtrain train` on `cache_dir` in a fresh process: seconds to the first optimizer step, peak RSS."""
    import os
    import shutil

    import yaml

    fx = common.tiny_fixture()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = common.train_config(fx, work / "run", max_steps=steps)
    cfg["model"]["max_sequence_length"] = TRAIN_TEXT[0]
    cfg["dataset"]["cache_dir"] = str(cache_dir)
    cfg["checkpoint"]["final"] = False
    cfg["tracking"] = {"report_to": ["jsonl"], "graphs": False}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "flowtrain", "train", "cfg.yaml", "--quiet"], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"flowtrain train on {cache_dir} failed:\n{err[-3000:]}")
    first = json.loads((work / "run" / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    return {"first_step_s": first["time"] - start, "train_peak_rss_mb": usage.ru_maxrss / 1024}


def train_scale(rows: list[int], reps: int, batches: int) -> None:
    """Each rep, interleaved: `flowtrain train` on each cache, then the data path alone (`child`) on each."""
    small, large = (cache(n, TRAIN_LATENT, TRAIN_TEXT, name="train-cache") for n in rows)
    work = common.bench_dir() / "scale" / "train"
    res = common.interleave({"small": lambda: {**train_run(small, work / "small"), **run_child(small, batches)},
                             "large": lambda: {**train_run(large, work / "large"), **run_child(large, batches)}},
                            reps)  # fmt: skip
    print(json.dumps(res, indent=1))
    med = {k: {m: common.median([r[m] for r in v]) for m in v[0]} for k, v in res.items()}
    s, g = med["small"], med["large"]
    out = [
        {"measure": "training start-up s (process start → first optimizer step)", "10k": s["first_step_s"],
         "1M": g["first_step_s"], "ratio": g["first_step_s"] / s["first_step_s"], "target": "≤ 1.5×"},
        {"measure": "peak RSS MiB of the training process", "10k": s["train_peak_rss_mb"], "1M": g["train_peak_rss_mb"],
         "ratio": g["train_peak_rss_mb"] - s["train_peak_rss_mb"], "target": "≤ +100 MB (ratio column: difference)"},
        {"measure": f"loader samples/s ({batches} batches of {BATCH}, data path alone)", "10k": s["samples_per_s"],
         "1M": g["samples_per_s"], "ratio": g["samples_per_s"] / s["samples_per_s"], "target": "≥ 0.9×"},
        {"measure": "data path alone: open the cache → first batch s", "10k": s["startup_s"], "1M": g["startup_s"],
         "ratio": g["startup_s"] / s["startup_s"], "target": "(part of the start-up above)"},
    ]  # fmt: skip
    out = [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in out]
    common.report("scale: flowtrain train on 10k vs 1M rows", out, {"command": " ".join(sys.argv), "rows": rows})


# Each family's columns at 1024 px (docs/models/*.md give where every number comes from): (name, dtype, shape);
# a variable-length text column's shape has its length first: Qwen-Image's L = 45 is a 40-token caption.
LAYOUTS_1024 = {
    "flux2_klein 4B": [("latent_moments", "float32", (64, 128, 128)), ("text_embeds", "bfloat16", (512, 7680))],
    "flux2_klein 9B": [("latent_moments", "float32", (64, 128, 128)), ("text_embeds", "bfloat16", (512, 12288))],
    "flux1 dev": [
        ("latent_moments", "float32", (32, 128, 128)),
        ("prompt_embeds", "bfloat16", (512, 4096)),
        ("pooled_prompt_embeds", "bfloat16", (768,)),
    ],  # fmt: skip
    "qwen_image (L = 45)": [
        ("latent_moments", "float32", (32, 1, 128, 128)),
        ("prompt_embeds*", "bfloat16", (45, 3584)),
    ],
    # Wan 2.1 T2V: z_dim 16, 8× spatial and 4× temporal VAE; UMT5-XXL text (d_model 4096), stored at its length
    "wan, an image (L = 45)": [
        ("latent_moments", "float32", (32, 1, 128, 128)),
        ("prompt_embeds*", "bfloat16", (45, 4096)),
    ],
    "wan, an 81-frame clip (L = 45)": [
        ("latent_moments", "float32", (32, 21, 128, 128)),
        ("prompt_embeds*", "bfloat16", (45, 4096)),
    ],
}


def bytes_per_sample(rows: int = 16) -> list[dict]:
    import pyarrow as pa
    import torch

    from flowtrain.data.precompute import write_shard
    from flowtrain.data.tensors import STORAGE_DTYPES, ragged_column, tensor_column

    out = []
    g = torch.Generator().manual_seed(0)
    for name, cols in LAYOUTS_1024.items():
        arrays, declared = {"key": pa.array([f"k{i}" for i in range(rows)])}, 0
        for col, dtype, shape in cols:
            values = torch.randn(rows, *shape, generator=g).to(STORAGE_DTYPES[dtype])
            declared += values[0].numel() * values.element_size()
            variable = col.endswith("*")
            arrays[col.rstrip("*")] = ragged_column(list(values), dtype) if variable else tensor_column(values, dtype)
        path = common.bench_dir() / "scale" / "bytes.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_shard(pa.table(arrays), path)
        on_disk = path.stat().st_size / rows
        path.unlink()
        out.append({"family": name, "declared B/sample": declared, "on disk B/sample (zstd)": round(on_disk),
                    "on disk MiB": round(on_disk / 2**20, 2),
                    "disk / declared": round(on_disk / declared, 3)})  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs=2, default=[10_000, 1_000_000], help="the small and the large cache")
    p.add_argument("--batches", type=int, default=2000, help=f"batches of {BATCH} read for the throughput")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bytes", action="store_true", help="bytes per sample per family at 1024 px, then exit")
    p.add_argument("--train", action="store_true", help="time `flowtrain train` to its first step on each cache")
    args = p.parse_args()
    if args.train:
        train_scale(args.rows, args.reps, args.batches)
        return
    if args.bytes:
        common.report("cache bytes per sample at 1024 px", bytes_per_sample(), {"command": " ".join(sys.argv)})
        return
    if args.child:
        print(json.dumps(child(args.child, args.batches)))
        return
    small, large = (cache(n) for n in args.rows)
    legacy = without_layout(large)
    res = common.interleave({"small": lambda: run_child(small, args.batches),
                             "large": lambda: run_child(large, args.batches),
                             "legacy": lambda: run_child(legacy, args.batches)}, args.reps)  # fmt: skip
    med = {k: {m: common.median([r[m] for r in v]) for m in v[0]} for k, v in res.items()}
    print(json.dumps(res, indent=1))
    s, g, o = med["small"], med["large"], med["legacy"]
    rows = [
        {"measure": "start-up s (open cache → first batch)", "10k": s["startup_s"], "1M": g["startup_s"],
         "ratio": g["startup_s"] / s["startup_s"], "target": "≤ 1.5×"},
        {"measure": "  of which CacheDataset() s", "10k": s["open_s"], "1M": g["open_s"],
         "ratio": g["open_s"] / s["open_s"], "target": ""},
        {"measure": "peak RSS MiB", "10k": s["peak_rss_mb"], "1M": g["peak_rss_mb"],
         "ratio": g["peak_rss_mb"] - s["peak_rss_mb"], "target": "≤ +100 MB (ratio column: difference)"},
        {"measure": "loader samples/s", "10k": s["samples_per_s"], "1M": g["samples_per_s"],
         "ratio": g["samples_per_s"] / s["samples_per_s"], "target": "≥ 0.9×"},
        {"measure": "1M, manifest without layout: start-up s", "10k": s["startup_s"], "1M": o["startup_s"],
         "ratio": o["startup_s"] / s["startup_s"], "target": "(before data.layout)"},
        {"measure": "  of which CacheDataset() s", "10k": s["open_s"], "1M": o["open_s"],
         "ratio": o["open_s"] / s["open_s"], "target": ""},
        {"measure": "1M, manifest without layout: samples/s", "10k": s["samples_per_s"], "1M": o["samples_per_s"],
         "ratio": o["samples_per_s"] / s["samples_per_s"], "target": ""},
    ]  # fmt: skip
    rows = [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    common.report("scale (10k vs 1M rows)", rows, {"command": " ".join(sys.argv), "rows": args.rows})


if __name__ == "__main__":
    main()
