"""Reconstruction grids: one row per image, three columns: input | decode(posterior mode) | decode(a sample)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8 (clamped, rounded)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def grid_rows(columns: list[torch.Tensor]) -> torch.Tensor:
    """Columns of (B, 3, H, W) images → one (3, B·H, len(columns)·W) image, row b = image b of every column."""
    return torch.cat([torch.cat(list(col), dim=1) for col in columns], dim=2)


@torch.no_grad()
def reconstruction_grid(
    vae: torch.nn.Module, pixels: torch.Tensor, path: str | Path, *, seed: int = 0, scale: int = 1
) -> Path:
    """Write the grid of `pixels` (B, 3, H, W) in [-1, 1] to `path` (PNG). The posterior sample uses its own
    generator seeded with `seed` (the training noise stream is left alone), and the VAE is in eval mode only
    for the call."""
    was_training = vae.training
    vae.eval()
    try:
        posterior = vae.encode(pixels).latent_dist
        gen = torch.Generator(device=pixels.device).manual_seed(seed)
        mode = vae.decode(posterior.mode()).sample
        sampled = vae.decode(posterior.sample(generator=gen)).sample
    finally:
        vae.train(was_training)
    image = grid_rows([pixels, mode, sampled])
    array = to_uint8(image[None])[0].numpy()
    out = Image.fromarray(array)
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
