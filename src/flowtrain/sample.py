"""`flowtrain sample`: images from a base model plus a trained LoRA or full transformer, via the diffusers
pipeline itself (so what users get here is what they get anywhere diffusers loads the LoRA)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)


def load_sampling_pipeline(
    model: str,
    *,
    lora: str | None = None,
    transformer: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
) -> Any:
    """The base pipeline, with `transformer` (a diffusers folder) swapped in and/or a LoRA loaded."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    kwargs: dict[str, Any] = {"dtype": dtype}
    if transformer is not None:
        t = Path(transformer)
        sub = "transformer" if (t / "transformer" / "config.json").exists() else None
        kwargs["transformer"] = Flux2Transformer2DModel.from_pretrained(t, subfolder=sub, dtype=dtype)
    pipe = Flux2KleinPipeline.from_pretrained(model, **kwargs)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: Any,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = 28,
    guidance_scale: float = 4.0,
    height: int = 512,
    width: int = 512,
    max_sequence_length: int = 512,
    text_encoder_layers: tuple[int, ...] = (9, 18, 27),
    images_per_prompt: int = 1,
    output_type: str = "pil",
) -> list:
    """One image per (prompt, k); image k of prompt i uses generator seed `seed + i * images_per_prompt + k`."""
    images = []
    for i, prompt in enumerate(prompts):
        for k in range(images_per_prompt):
            gen = torch.Generator(device="cpu").manual_seed(seed + i * images_per_prompt + k)
            out = pipe(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=gen,
                max_sequence_length=max_sequence_length,
                text_encoder_out_layers=tuple(text_encoder_layers),
                output_type=output_type,
            )
            images.append(out.images[0])
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
    images: list[Image.Image], out: str | Path, prompts: list[str], images_per_prompt: int = 1
) -> list[Path]:
    """`{out}/{i:03d}_{k:02d}.png` for each image, plus `grid.png` and `prompts.txt`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, im in enumerate(images):
        p = out / f"{j // images_per_prompt:03d}_{j % images_per_prompt:02d}.png"
        im.save(p)
        paths.append(p)
    make_grid(images, cols=images_per_prompt if images_per_prompt > 1 else None).save(out / "grid.png")
    (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    return paths
