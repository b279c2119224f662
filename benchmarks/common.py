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


# ---- Klein-shaped transformers for benchmarks/gpu.py --------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A FLUX.2 Klein transformer's architecture (`Flux2Transformer2DModel` kwargs), its text length and VAE latent
    channels, and the two training resolutions measured."""

    name: str
    transformer: dict
    text_len: int
    latent_channels: int  # the VAE's; the transformer sees 4× that after the 2×2 patchify
    resolutions: tuple[int, int]


# FLUX.2 Klein 4B (black-forest-labs/FLUX.2-klein-base-4B, transformer/config.json): 5 double-stream + 20 single-stream
# blocks, 24 heads × 128 = 3072 wide, MLP ratio 3, RoPE axes 4 × 32, no guidance embedding (base model). Text: Qwen3-4B
# hidden states of layers (9, 18, 27) stacked, 3 × 2560 = 7680 wide, padded to 512 tokens (docs/models/flux2_klein.md,
# configs/klein4b/base.yaml). VAE: 32 latent channels, 8× down, so 128 channels and (px / 16)² image tokens.
KLEIN4B = Shape(
    name="klein4b",
    transformer={
        "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
        "axes_dims_rope": (32, 32, 32, 32), "guidance_embeds": False,
    },
    text_len=512,
    latent_channels=32,
    resolutions=(512, 1024),
)  # fmt: skip
# The same code path at test-suite size (`gpu.py --quick`): 16 / 64 image tokens, 32 text tokens.
TINY_SHAPE = Shape(
    name="tiny-shape",
    transformer={
        "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 96, "timestep_guidance_channels": 32, "mlp_ratio": 3.0,
        "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": False,
    },
    text_len=32,
    latent_channels=4,
    resolutions=(64, 128),
)  # fmt: skip


def shaped_pipeline(shape: Shape, device: str = "cpu") -> Path:
    """A pipeline folder holding only `shape`'s transformer, randomly initialised (seed 0) and saved in bf16, and a
    model_index.json naming it: all that training from a latent cache loads. Built on `device` (a 4B model's random
    init takes seconds on a GPU, minutes on CPU), written once under runs/bench/ and reused."""
    root = bench_dir() / f"{shape.name}-pipeline"
    if (root / "model_index.json").exists():
        return root
    import diffusers
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = Flux2Transformer2DModel(**shape.transformer)
    transformer.to("cpu", torch.bfloat16).save_pretrained(root / "transformer")
    del transformer
    index = {"_class_name": "Flux2KleinPipeline", "_diffusers_version": diffusers.__version__, "is_distilled": False,
             "transformer": ["diffusers", "Flux2Transformer2DModel"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index, indent=2))  # last: marks the folder complete
    return root


def shaped_cache(shape: Shape, resolution: int, rows: int = 4) -> Path:
    """A synthetic latent cache (`flowtrain.testing.synthetic`: precompute's writer, Gaussian values) of `rows`
    rows at `resolution` px for `shape`: posterior moments (2C, px/8, px/8) float32, text (text_len, width) bf16."""
    from flowtrain.testing.synthetic import write_synthetic_cache

    side = resolution // 8
    return write_synthetic_cache(
        bench_dir() / f"{shape.name}-cache-{resolution}-{rows}",
        rows,
        latent_shape=(2 * shape.latent_channels, side, side),
        text_shape=(shape.text_len, shape.transformer["joint_attention_dim"]),
        text_dtype="bfloat16",
    )


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
    print_rows(f"{name} — {machine()} — {time.strftime('%Y-%m-%d %H:%M')}", rows)
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "rows": rows}
    record.update(extra or {})
    with open(bench_dir() / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def print_rows(title: str, rows: list[dict]) -> None:
    """Print `rows` (dicts with the first row's keys) as an aligned table under `title`."""
    print(f"\n== {title}")
    if rows:
        keys = list(rows[0])
        widths = [max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys]
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
        for r in rows:
            print("  ".join(_fmt(r.get(k)).ljust(w) for k, w in zip(keys, widths, strict=True)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
