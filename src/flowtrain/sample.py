"""`flowtrain sample`: images from a base model plus a trained LoRA or full transformer, via the model family's
diffusers pipeline itself (so what users get here is what they get anywhere diffusers loads the LoRA)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from flowtrain.config.model import ModelOptions
from flowtrain.media import DEFAULT_FPS, save_sample, still
from flowtrain.models import get_family

log = logging.getLogger(__name__)


def load_sampling_pipeline(
    model: ModelOptions,
    *,
    lora: str | None = None,
    transformer: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
) -> Any:
    """The family's pipeline for `model` with a LoRA loaded, and with `transformer` (a full fine-tune's folder) or
    else `model.dit` as its transformer; a missing model or a LoRA for another model is one message, not a
    traceback."""
    from flowtrain.weights_check import load_errors

    family = get_family(model.family)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with load_errors(model.pretrained, lora):
        return family.sampling_pipeline(model, dtype=dtype, device=device, transformer=transformer, lora=lora)


def generate(
    pipe: Any,
    prompts: list[str],
    model: ModelOptions,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int = 512,
    width: int = 512,
    images_per_prompt: int = 1,
    output_type: str = "pil",
    batch_size: int = 1,
    progress: bool = False,
) -> list:
    """One image per (prompt, k); image k of prompt i uses generator seed `seed + i * images_per_prompt + k`.

    `batch_size` > 1 runs that many (prompt, k) pairs per pipeline call, each with its own seeded generator, so
    the initial noise is the same as one at a time (outputs agree up to batched-matmul rounding) and small models
    sample many times faster. Images come back in (prompt, k) order either way. `steps` / `guidance_scale`: None
    takes the family's reference defaults (`ModelFamily.sampling_defaults`).
    """
    family = get_family(model.family)
    steps = family.sampling_defaults["steps"] if steps is None else steps  # the reference pipeline's own defaults
    guidance_scale = family.sampling_defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    jobs = [(p, seed + i * images_per_prompt + k) for i, p in enumerate(prompts) for k in range(images_per_prompt)]
    images = []
    bar = tqdm(total=len(jobs), desc="sample", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images += family.generate(
            pipe,
            [p for p, _ in chunk],
            model,
            generators=[torch.Generator(device="cpu").manual_seed(s) for _, s in chunk],
            height=height,
            width=width,
            steps=steps,
            guidance_scale=guidance_scale,
            output_type=output_type,
        )
        bar.update(len(chunk))
    bar.close()
    return images


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images row-major into one image."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(
    images: list[Any], out: str | Path, prompts: list[str], images_per_prompt: int = 1, fps: int = DEFAULT_FPS
) -> list[Path]:
    """`{out}/{i:03d}_{k:02d}.png` for each image, plus `grid.png` and `prompts.txt`. A video (a list of frames)
    is written as that PNG (its frame strip) plus `.mp4` and a `.gif` preview at `fps` (`media.save_sample`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, im in enumerate(images):
        p = out / f"{j // images_per_prompt:03d}_{j % images_per_prompt:02d}.png"
        save_sample(im, p, fps)
        paths.append(p)
    stills = [still(im) for im in images]
    make_grid(stills, cols=images_per_prompt if images_per_prompt > 1 else None).save(out / "grid.png")
    (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    return paths
