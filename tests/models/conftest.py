"""Fixtures the family test folders share (test modules cannot import each other under --import-mode=importlib)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

VALIDATION = {"every_steps": 2, "num_inference_steps": 3, "guidance_scale": 2.0, "seed": 5}


@pytest.fixture(scope="session")
def validation_run() -> Callable[..., tuple[list[np.ndarray], Callable[..., list[np.ndarray]]]]:
    return _validation_run


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


def _validation_run(pipeline: Path, prompts: list[str], out: Path, make_config: Callable[[Path, dict], Any]):
    """Train the config `make_config(run_dir, validation_section)` (2 steps, validation at step 2: 3 steps, guidance
    2, seed 5) and return (its validation images, `sample(name, *overrides)`: the same prompts and settings through
    `flowtrain sample --model PIPELINE --lora RUN` into out/name, plus dotted overrides), images as int16 arrays."""
    from flowtrain.cli import main
    from flowtrain.models import get_family
    from flowtrain.train.loop import train

    run = out / "run"
    cfg = make_config(run, {**VALIDATION, "prompts": prompts})
    train(cfg, progress=False)
    seed = VALIDATION["seed"]
    pngs = [run / "samples" / f"step000002_{i:02d}_{seed + i}.png" for i in range(len(prompts))]
    assert all(p.exists() for p in pngs) and (run / "samples" / "step000002_grid.png").exists()
    side = str(get_family(cfg.model.family).tiny_resolution)

    def sample(name: str, *overrides: str) -> list[np.ndarray]:
        args = ["sample", "--model", str(pipeline), "--lora", str(run), "--out", str(out / name),
                *[a for p in prompts for a in ("--prompt", p)], "--steps", str(VALIDATION["num_inference_steps"]),
                "--guidance-scale", str(VALIDATION["guidance_scale"]), "--seed", str(seed), "--height", side,
                "--width", side, *overrides]  # fmt: skip
        assert main(args) == 0
        return [_png(out / name / f"{i:03d}_00.png") for i in range(len(prompts))]

    return [_png(p) for p in pngs], sample
