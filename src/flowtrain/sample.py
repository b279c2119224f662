"""`flowtrain sample`: images from a base model plus a trained LoRA or full transformer, via the diffusers
pipeline itself (so what users get here is what they get anywhere diffusers loads the LoRA)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

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

    from flowtrain.weights_check import load_errors

    kwargs: dict[str, Any] = {"dtype": dtype}
    with load_errors(model, lora):  # a missing model, a LoRA for another model: one message, not a traceback
        if transformer is not None:
            t = Path(transformer)
            sub = "transformer" if (t / "transformer" / "config.json").exists() else None
            kwargs["transformer"] = Flux2Transformer2DModel.from_pretrained(
                t, subfolder=sub, dtype=dtype, use_safetensors=True
            )
        pipe = Flux2KleinPipeline.from_pretrained(model, use_safetensors=True, **kwargs)
        if lora is not None:
            pipe.load_lora_weights(lora, use_safetensors=True)
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
    batch_size: int = 1,
    progress: bool = False,
) -> list:
    """One image per (prompt, k); image k of prompt i uses generator seed `seed + i * images_per_prompt + k`.

    `batch_size` > 1 runs that many (prompt, k) pairs per pipeline call, each with its own seeded generator, so
    the initial noise is the same as one at a time (outputs agree up to batched-matmul rounding) and small models
    sample many times faster. Images come back in (prompt, k) order either way.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    jobs = [(p, seed + i * images_per_prompt + k) for i, p in enumerate(prompts) for k in range(images_per_prompt)]
    images = []
    bar = tqdm(total=len(jobs), desc="sample", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        out = pipe(
            prompt=chunk[0][0] if len(chunk) == 1 else [p for p, _ in chunk],
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gens[0] if len(chunk) == 1 else gens,
            max_sequence_length=max_sequence_length,
            text_encoder_out_layers=tuple(text_encoder_layers),
            output_type=output_type,
        )
        images.extend(out.images)
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
