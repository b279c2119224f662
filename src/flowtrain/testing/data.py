"""Tiny image folders, caches and configs for tests and benchmarks (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_FAMILY = "flux2_klein"
TINY_RES = 32  # pixels; the tiny Klein VAE downsamples 2× → 16×16 latents → 8×8 = 64 tokens
TINY_SEQ = 32  # text tokens


def make_image_folder(root: Path, n: int = 8, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """n RGB PNGs (a colour per image plus noise) with captions `a photo number i`."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = np.zeros((*size, 3), dtype=np.uint8)
        base[..., i % 3] = 200
        img = np.clip(base + rng.integers(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a photo number {i}")
    return root


def tiny_model(pipeline: Path, family: str = DEFAULT_FAMILY, **options: Any):
    """The validated `model:` section for a family's tiny pipeline folder (fp32 unless `dtype` is given)."""
    from flowtrain.config import FlowtrainConfig
    from flowtrain.models import get_family

    data = {"family": family, "pretrained": str(pipeline), "dtype": "float32", **get_family(family).tiny_options}
    return FlowtrainConfig.model_validate({"model": {**data, **options}}).model


def make_tiny_cache(
    root: Path, pipeline: Path, n: int = 8, text_dtype: str = "float32", family: str = DEFAULT_FAMILY
) -> tuple[Path, Path]:
    """prepare + precompute n images at the family's tiny resolution; returns (raw_dir, cache_dir). `text_dtype`
    is model.dtype: the encoders' dtype and the text columns' storage dtype."""
    from flowtrain.data.precompute import precompute
    from flowtrain.data.prepare import prepare
    from flowtrain.models import get_family

    images = make_image_folder(root / "images", n=n)
    prepare(images, root / "raw", progress=False)
    model = tiny_model(pipeline, family, dtype=text_dtype)
    resolution = get_family(family).tiny_resolution
    precompute(root / "raw", root / "cache", model, resolution=resolution, batch_size=4, progress=False)
    return root / "raw", root / "cache"


def tiny_config_dict(pipeline: Path, cache: Path, out: Path, family: str = DEFAULT_FAMILY, **train) -> dict:
    """A FlowtrainConfig dict for a family's tiny pipeline: fp32 on CPU, LoRA rank 4 on attention, JSONL tracking."""
    from flowtrain.models import get_family

    return {
        "model": {"family": family, "pretrained": str(pipeline), "dtype": "float32", **get_family(family).tiny_options},
        "dataset": {"cache_dir": str(cache)},
        "train": {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "mixed_precision": "no", **train},
        "train_mode": "lora",
        "lora": {"rank": 4, "targets": "attention"},
        "checkpoint": {"every_steps": 3, "keep_last": None},
        # JSONL only and no end-of-run graphs: MLflow's store and matplotlib cost seconds per run; the tests of
        # tracking (and the CLI e2e) turn them on.
        "tracking": {"report_to": ["jsonl"], "graphs": False},
        "output_dir": str(out),
    }
