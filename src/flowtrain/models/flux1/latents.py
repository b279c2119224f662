"""FLUX.1's latent and position-id math as pure functions (tensors in, tensors out), each equal to `FluxPipeline`'s.

Reference: diffusers `pipelines/flux/pipeline_flux.py` and `pipeline_flux_img2img.py`.
  normalise : x = (z - shift_factor) · scaling_factor                   (`_encode_vae_image`; decode inverts it)
  pack      : (B, C, H, W) → (B, H/2·W/2, 4C), each 2×2 patch → channels c·4 + 2·dy + dx (`_pack_latents`)
  ids       : image (h·w, 3) = (0, row, col); text (L, 3) zeros          (`_prepare_latent_image_ids`, `encode_prompt`)
The resolution shift is the scheduler's, shared with other families: `models.common.scheduler_shift`.
"""

from __future__ import annotations

import functools

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C) tokens in row-major patch order; H and W even."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h·w, 4C) tokens on an h×w grid → (B, C, 2h, 2w); inverse of `pack`."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, height, width, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height * 2, width * 2)


def normalize(z: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """VAE latent → the transformer's latent space: (z - shift_factor) · scaling_factor."""
    return (z - shift_factor) * scaling_factor


def denormalize(x: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """Inverse of `normalize` (what the pipeline does before `vae.decode`)."""
    return x / scaling_factor + shift_factor


def training_latents(
    moments: torch.Tensor,
    shift_factor: float,
    scaling_factor: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cached VAE moments → the packed, normalised x0 the transformer is trained on.

    Args:
        moments: (B, 2C, H, W) posterior mean ‖ logvar (logvar as diffusers clamps it), float32.
        shift_factor, scaling_factor: the VAE config's (FLUX.1: 0.1159, 0.3611).
        generator: None → the posterior mode; else one draw mean + exp(logvar/2)·ε: diffusers'
            `latent_dist.sample(generator)` itself (what the reference training script and
            `FluxImg2ImgPipeline._encode_vae_image` sample), so the same generator state gives the same numbers.
    Returns:
        x0 (B, H/2·W/2, 4C) and the token grid (H/2, W/2).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    posterior = DiagonalGaussianDistribution(moments)  # the VAE's own `latent_dist`, rebuilt from the cache
    z = posterior.mode() if generator is None else posterior.sample(generator)
    x = normalize(z, shift_factor, scaling_factor)
    return pack(x), (x.shape[2] // 2, x.shape[3] // 2)


def image_ids(height: int, width: int) -> torch.Tensor:
    """(h·w, 3) float32 position ids (0, row, col) of an h×w token grid, as `_prepare_latent_image_ids`."""
    rows = torch.arange(height, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, dtype=torch.float32).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)


def text_ids(length: int) -> torch.Tensor:
    """(L, 3) zeros: FLUX.1's text tokens all sit at position (0, 0, 0)."""
    return torch.zeros(length, 3)


@functools.lru_cache(maxsize=32)
def position_ids(height: int, width: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(image ids, text ids) on `device`, built once per shape (the transformer only reads them)."""
    return image_ids(height, width).to(device), text_ids(length).to(device)
