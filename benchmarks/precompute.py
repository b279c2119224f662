"""Precompute: images/s of `flowtrain.data.precompute.precompute` vs a bare loop running the same VAE and text
encoder on the same images (read the raw shard, decode, resize/crop, VAE encode, text encode) — nothing else.

flowtrain also writes the cache (Parquet, zstd), checks the shards and writes the manifest. With the encoders on
an accelerator it decodes the next batch on a thread while the current one encodes; on CPU it decodes inline (the
thread would only preempt the encoders' intra-op threads: measured ~25% slower on 2 cores). Fixed costs (loading
the pipeline, the empty-prompt embedding, the manifest) are taken out by timing N + 8 and 8 images and dividing the
difference by N, for both.

Pipelines:
  tiny     the test suite's tiny pipeline at 32 px (decoding and Python dominate)
  encoder  a heavier VAE (4 blocks, 8× down, 32 latent channels, widths 32-128) at 256 px and a 27-layer Qwen3
           text encoder (hidden 256) at 128 tokens, so encoding dominates as it does for Klein

With --processes: images/s of `flowtrain precompute` in one process vs `accelerate launch --num_processes 2 -m
flowtrain precompute` (gloo on CPU, one intra-op thread per process, so the ratio is the scaling the second process
buys; 1.0 means none, 2.0 is ideal), and of one process with as many threads as the two have. Each rank encodes
its own cache shards (flowtrain.data.precompute_dist); the raw data is prepared in shards of 16 images (encoder: 4)
so the two ranks get equal shares. The time is what the main process logs from after the first barrier (encoders
loaded) to the merged manifest: launching, imports and loading are left out.

    .venv/bin/python benchmarks/precompute.py           # ~4 min on 2 cores
    .venv/bin/python benchmarks/precompute.py --pipeline encoder --images 48 --reps 3
    .venv/bin/python benchmarks/precompute.py --processes --pipeline tiny --reps 2   # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PIPELINES = {
    "tiny": {"resolution": 32, "seq": 32, "image_size": (40, 48), "images": 256},
    "encoder": {"resolution": 256, "seq": 128, "image_size": (320, 384), "images": 24},
}
SMALL = 8  # images of the run that measures the fixed costs (one batch)


def pipeline(name: str) -> Path:
    from flowtrain.models.flux2_klein.tiny import TinySpec, build_tiny_pipeline, save_tiny_pipeline

    path = common.bench_dir() / f"precompute-{name}" / "pipeline"
    if name == "tiny":
        return save_tiny_pipeline(path)
    if not (path / "model_index.json").exists():
        spec = TinySpec(te_hidden=256, latent_channels=32, vae_channels=(32, 64, 128, 128))
        build_tiny_pipeline(spec).save_pretrained(path)
    return path


def raw_dirs(name: str, n: int) -> tuple[Path, Path]:
    """(raw dir of SMALL images, raw dir of SMALL + n images): prepared like `flowtrain prepare` does."""
    from flowtrain.data.prepare import prepare
    from flowtrain.testing.data import make_image_folder

    spec, root = PIPELINES[name], common.bench_dir() / f"precompute-{name}"
    dirs = []
    for count in (SMALL, SMALL + n):
        raw = root / f"raw-{count}"
        if not (raw / "manifest.json").exists():
            images = make_image_folder(root / f"images-{count}", n=count, size=spec["image_size"])
            prepare(images, raw, progress=False)
        dirs.append(raw)
    return dirs[0], dirs[1]


def model_options(name: str):
    """The validated `model:` section precompute gets: bf16 encoders and text column (precompute's former default,
    and what the bare loop loads)."""
    from flowtrain.testing.data import tiny_model

    return tiny_model(pipeline(name), max_sequence_length=PIPELINES[name]["seq"], dtype="bfloat16")


def flowtrain_time(name: str, raw: Path) -> float:
    from flowtrain.data.precompute import precompute

    out = common.bench_dir() / f"precompute-{name}" / "cache-run"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    precompute(
        raw,
        out,
        model_options(name),
        resolution=PIPELINES[name]["resolution"],
        batch_size=8,
        device="cpu",
        progress=False,
    )
    dt = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return dt


class Bare:
    """The same encoders, loaded once, and a plain loop over the raw shards."""

    def __init__(self, name: str):
        import torch
        from diffusers import Flux2KleinPipeline

        self.m = model_options(name)
        self.resolution = PIPELINES[name]["resolution"]
        self.pipe = Flux2KleinPipeline.from_pretrained(self.m.pretrained, transformer=None, dtype=torch.bfloat16)

    def time(self, raw: Path) -> float:
        import pyarrow.parquet as pq
        import torch
        from PIL import Image

        from flowtrain.models.common import resize_to_cover  # the same Lanczos scale-to-cover, a pure function

        pipe, m, res = self.pipe, self.m, self.resolution
        t = time.perf_counter()
        pipe.encode_prompt([""], device="cpu", max_sequence_length=m.max_sequence_length,
                           text_encoder_out_layers=tuple(m.text_encoder_layers))  # fmt: skip
        for shard in sorted(raw.glob("*.parquet")):
            table = pq.read_table(shard, columns=["caption", "image"])
            for i in range(0, table.num_rows, 8):
                rows = table.slice(i, 8).to_pydict()
                images = [resize_to_cover(Image.open(io.BytesIO(b)).convert("RGB"), res) for b in rows["image"]]
                pixels = torch.cat([pipe.image_processor.preprocess(im, height=res, width=res, resize_mode="crop")
                                    for im in images])  # fmt: skip
                with torch.no_grad():
                    dist = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist
                    torch.cat([dist.mean, dist.logvar], dim=1).float()
                    pipe.encode_prompt(rows["caption"], device="cpu", max_sequence_length=m.max_sequence_length,
                                       text_encoder_out_layers=tuple(m.text_encoder_layers))  # fmt: skip
        return time.perf_counter() - t


def measure(name: str, n: int, reps: int) -> dict:
    small, full = raw_dirs(name, n)
    bare = Bare(name)
    res = common.interleave(
        {
            "bare_full": lambda: bare.time(full),
            "ft_full": lambda: flowtrain_time(name, full),
            "bare_small": lambda: bare.time(small),
            "ft_small": lambda: flowtrain_time(name, small),
        },
        reps,
    )
    med = {k: common.median(v) for k, v in res.items()}
    bare_rate = n / (med["bare_full"] - med["bare_small"])
    ft_rate = n / (med["ft_full"] - med["ft_small"])
    print(name, {k: [round(x, 2) for x in v] for k, v in res.items()})
    return {
        "pipeline": name,
        "resolution": PIPELINES[name]["resolution"],
        "bare_img_per_s": bare_rate,
        "flowtrain_img_per_s": ft_rate,
        "ratio": ft_rate / bare_rate,
        "images×reps": f"{n}×{reps}",
    }


RAW_SHARD = {"tiny": 16, "encoder": 4}  # images per raw shard for --processes: whole shards to share between ranks


def sharded_raw_dirs(name: str, n: int) -> tuple[Path, Path]:
    """(raw dir of SMALL images, of SMALL + n images), prepared in shards of RAW_SHARD[name] images."""
    from flowtrain.data.prepare import prepare
    from flowtrain.testing.data import make_image_folder

    spec, root = PIPELINES[name], common.bench_dir() / f"precompute-{name}"
    dirs = []
    for count in (SMALL, SMALL + n):
        raw = root / f"raw-sharded-{count}"
        if not (raw / "manifest.json").exists():
            images = make_image_folder(root / f"images-{count}", n=count, size=spec["image_size"])
            prepare(images, raw, shard_size=RAW_SHARD[name], progress=False)
        dirs.append(raw)
    return dirs[0], dirs[1]


def cli_time(name: str, raw: Path, processes: int, threads: int) -> float:
    """Seconds `flowtrain precompute` on `processes` processes of `threads` threads each spent encoding: the time
    its main process logs from after the first barrier (encoders loaded, folder set up) to the merged manifest, so
    launching, imports and loading, which swamp the tiny pipeline's encoding on a loaded machine, are left out."""
    import re

    from flowtrain.testing.launch import accelerate_launch, cpu_env, ddp_args, run

    out = common.bench_dir() / f"precompute-{name}" / "cache-cli"
    shutil.rmtree(out, ignore_errors=True)
    args = ["-m", "flowtrain", "precompute", str(raw), "--out", str(out), "--model", str(pipeline(name)),
            "--resolution", str(PIPELINES[name]["resolution"]), "--batch-size", "8", "--dtype", "bfloat16",
            f"model.max_sequence_length={PIPELINES[name]['seq']}"]  # fmt: skip
    cmd = [sys.executable, *args] if processes == 1 else accelerate_launch([*ddp_args(processes, 29650), *args])
    log = run(cmd, cpu_env({"OMP_NUM_THREADS": str(threads)}))
    shutil.rmtree(out, ignore_errors=True)
    return float(re.findall(r"precompute: \d+ rows in ([0-9.]+)s", log)[-1])


def measure_processes(name: str, n: int, reps: int) -> dict:
    _, full = sharded_raw_dirs(name, n)
    rows = SMALL + n
    variants = {"1 process × 1 thread": (1, 1), "2 processes × 1 thread": (2, 1), "1 process × 2 threads": (1, 2)}
    runs = {v: (lambda p=p, t=t: cli_time(name, full, p, t)) for v, (p, t) in variants.items()}
    res = common.interleave(runs, reps)
    print(name, {k: [round(x, 2) for x in v] for k, v in res.items()})
    rate = {v: rows / common.median(res[v]) for v in variants}
    # Also the median of the ratios within each repetition (its variants ran back to back): steadier than the
    # ratio of medians when the machine's load drifts between repetitions.
    one = res["1 process × 1 thread"]
    per_rep = {v: common.median([a / b for a, b in zip(one, res[v], strict=True)]) for v in variants}
    return {
        "pipeline": name,
        "resolution": PIPELINES[name]["resolution"],
        **{f"{v} img/s": round(r, 2) for v, r in rate.items()},
        "2 processes / 1 process": round(rate["2 processes × 1 thread"] / rate["1 process × 1 thread"], 3),
        "same, median per rep": round(per_rep["2 processes × 1 thread"], 3),
        "1 process 2 threads / 1 thread": round(rate["1 process × 2 threads"] / rate["1 process × 1 thread"], 3),
        "same, median per rep ": round(per_rep["1 process × 2 threads"], 3),
        "images×reps": f"{rows}×{reps}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", choices=[*PIPELINES, "all"], default="all")
    p.add_argument("--images", type=int, help="images beyond the fixed-cost run (default: tiny 256, encoder 24)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--processes", action="store_true", help="1 vs 2 processes of the CLI (accelerate launch)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = list(PIPELINES) if args.pipeline == "all" else [args.pipeline]
    if args.processes:
        rows = [measure_processes(n, args.images or {"tiny": 256, "encoder": 32}[n], args.reps) for n in names]
        common.report(
            "precompute processes (images per second, 1 vs 2 processes)", rows, {"command": " ".join(sys.argv)}
        )
        return
    rows = [measure(n, args.images or PIPELINES[n]["images"], args.reps) for n in names]
    common.report("precompute (flowtrain / bare images per second)", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
