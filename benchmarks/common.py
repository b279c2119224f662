"""Shared fixtures and statistics for the benchmarks (not a test module; imported by the scripts next to it).

Fixtures are built once under `runs/bench/` (git-ignored; `FLOWTRAIN_BENCH_DIR` moves it) and reused by later
runs, so a benchmark's timed part never includes building models or caches.

Two transformers are measured:
  tiny      the test suite's pipeline (`flowtrain.models.flux2_klein.tiny`): 8×8 = 64 image tokens, 32 text tokens.
  bench70m  a 72.5M-parameter Klein-architecture transformer (FLUX.2 blocks: 2 double + 4 single, 12 heads × 64,
            128 latent channels like Klein) with 16×16 = 256 image tokens and 64 text tokens, bf16 text cache.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


def bench_dir() -> Path:
    d = Path(os.environ.get("FLOWTRAIN_BENCH_DIR", ROOT / "runs" / "bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass(frozen=True)
class Fixture:
    """A pipeline folder, a latent cache made from it, and the settings a config needs to train on it."""

    name: str
    pipeline: Path
    cache: Path
    max_sequence_length: int
    model_dtype: str  # the frozen base's dtype for LoRA
    mixed_precision: str


# ---- fixtures ---------------------------------------------------------------------------------------------------
BENCH70M = {
    "te_hidden": 64,  # joint_attention_dim = 3 · 64 = 192
    "latent_channels": 32,  # Klein's 32 → 128 channels after the 2×2 patchify
    "inner_heads": 12,
    "head_dim": 64,
    "double": 2,
    "single": 4,
    "resolution": 64,  # tiny VAE 2× down → 32×32 latent → 16×16 = 256 tokens
    "seq": 64,
}


def tiny_fixture(n_images: int = 32) -> Fixture:
    """The test suite's tiny pipeline and a float32 cache at 32 px (64 image tokens, 32 text tokens)."""
    from flowtrain.models.flux2_klein.tiny import save_tiny_pipeline
    from flowtrain.testing.data import TINY_SEQ, make_tiny_cache

    root = bench_dir() / f"tiny-{n_images}"
    pipe = save_tiny_pipeline(root / "pipeline")
    if not (root / "cache" / "manifest.json").exists():
        make_tiny_cache(root, pipe, n=n_images)
    return Fixture("tiny", pipe, root / "cache", TINY_SEQ, "float32", "no")


def build_bench70m_pipeline(path: Path) -> Path:
    """Save a Klein pipeline whose transformer is the 72.5M-parameter bench70m one (random init, seed 0)."""
    if (path / "model_index.json").exists():
        return path
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    from flowtrain.models.flux2_klein.tiny import TinySpec, build_components

    s = BENCH70M
    comps = build_components(TinySpec(te_hidden=s["te_hidden"], latent_channels=s["latent_channels"]), seed=0)
    torch.manual_seed(1)
    comps["transformer"] = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * s["latent_channels"],
        num_layers=s["double"],
        num_single_layers=s["single"],
        attention_head_dim=s["head_dim"],
        num_attention_heads=s["inner_heads"],
        joint_attention_dim=3 * s["te_hidden"],
        timestep_guidance_channels=256,
        axes_dims_rope=(16, 16, 16, 16),
        guidance_embeds=False,
    )
    Flux2KleinPipeline(**comps, is_distilled=False).save_pretrained(path)
    return path


def bench70m_fixture(n_images: int = 16) -> Fixture:
    """bench70m pipeline + a bf16-text cache of `n_images` images at 64 px (256 image tokens, 64 text tokens)."""
    from flowtrain.data.precompute import precompute
    from flowtrain.data.prepare import prepare
    from flowtrain.testing.data import make_image_folder, tiny_model

    s = BENCH70M
    root = bench_dir() / f"bench70m-{n_images}"
    pipe = build_bench70m_pipeline(root / "pipeline")
    cache = root / "cache"
    if not (cache / "manifest.json").exists():
        images = make_image_folder(root / "images", n=n_images, size=(80, 96))
        prepare(images, root / "raw", progress=False)
        model = tiny_model(pipe, max_sequence_length=s["seq"], dtype="bfloat16")  # bf16 encoders and text column
        precompute(root / "raw", cache, model, resolution=s["resolution"], batch_size=8, progress=False)
    return Fixture("bench70m", pipe, cache, s["seq"], "bfloat16", "bf16")


def fixture(name: str) -> Fixture:
    return {"tiny": tiny_fixture, "bench70m": bench70m_fixture}[name]()


def train_config(fx: Fixture, out: Path, **train) -> dict:
    """A flowtrain config dict for `fx`: LoRA rank 16 on the attention preset, AdamW, clip 1.0, no mid-run saves."""
    return {
        "model": {
            "family": "flux2_klein",
            "pretrained": str(fx.pipeline),
            "max_sequence_length": fx.max_sequence_length,
            "dtype": fx.model_dtype,
        },
        "dataset": {"cache_dir": str(fx.cache)},
        "train": {
            "batch_size": 2,
            "learning_rate": 1e-4,
            "mixed_precision": fx.mixed_precision,
            "max_grad_norm": 1.0,
            "log_every": 1,
            **train,
        },
        "train_mode": "lora",
        "lora": {"rank": 16, "targets": "attention"},
        "checkpoint": {"every_steps": None, "keep_last": 1},
        "output_dir": str(out),
    }


# ---- statistics and reporting -----------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def interleave(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Call each run `reps` times in alternating order (A B, B A, A B, ...) so drift in machine load hits every
    variant alike. Returns each variant's results in call order."""
    names, out = list(runs), {n: [] for n in runs}
    for r in range(reps):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(runs[n]())
    return out


def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} CPU cores, {model}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def report(name: str, rows: list[dict], extra: dict | None = None) -> None:
    """Print a table and append a JSON record to runs/bench/results.jsonl (the README table is made from it)."""
    print(f"\n== {name} — {machine()} — {time.strftime('%Y-%m-%d %H:%M')}")
    if rows:
        keys = list(rows[0])
        widths = [max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys]
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
        for r in rows:
            print("  ".join(_fmt(r.get(k)).ljust(w) for k, w in zip(keys, widths, strict=True)))
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "rows": rows}
    record.update(extra or {})
    with open(bench_dir() / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
