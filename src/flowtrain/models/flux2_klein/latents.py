"""FLUX.2 Klein latents and position ids: pure tensor functions, each equal to its `Flux2KleinPipeline` counterpart.

image : VAE mean (B, C, H, W) → 2×2 patchify (B, 4C, H/2, W/2) → BatchNorm-stat normalise → pack (B, H/2·W/2, 4C)
ids   : text (t=0, h=0, w=0, l); image (t=0, h, w, l=0)
"""

from __future__ import annotations

import functools

import torch


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 4C, H/2, W/2): each 2×2 spatial patch becomes channels (channel-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`: (B, 4C, h, w) → (B, C, 2h, 2w)."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h·w, C) tokens in row-major order."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h·w, C) → (B, C, h, w); inverse of `pack`."""
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def latent_ids(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, h·w, 4) int64 position ids (t=0, h, w, l=0) for a packed h×w token grid."""
    h = torch.arange(height).repeat_interleave(width)
    w = torch.arange(width).repeat(height)
    zeros = torch.zeros_like(h)
    return torch.stack([zeros, h, w, zeros], dim=-1).unsqueeze(0).expand(batch, -1, -1)


def text_ids(batch: int, length: int) -> torch.Tensor:
    """(B, L, 4) int64 position ids (t=0, h=0, w=0, l) for L text tokens."""
    ell = torch.arange(length)
    zeros = torch.zeros_like(ell)
    return torch.stack([zeros, zeros, zeros, ell], dim=-1).unsqueeze(0).expand(batch, -1, -1)


@functools.lru_cache(maxsize=32)
def position_ids(batch: int, height: int, width: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(latent_ids, text_ids) on `device`, built once per shape: a training run sees one or a few shapes, and
    rebuilding them cost a few small CPU ops and two host→device copies every step. The transformer only reads them."""
    return latent_ids(batch, height, width).to(device), text_ids(batch, length).to(device)


def normalize_latents(patched: torch.Tensor, bn_mean: torch.Tensor, bn_std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with the VAE BatchNorm running stats; patched (B, 4C, h, w), stats (4C,)."""
    return (patched - bn_mean.view(1, -1, 1, 1).to(patched)) / bn_std.view(1, -1, 1, 1).to(patched)


def training_latents(
    moments: torch.Tensor,
    bn_mean: torch.Tensor,
    bn_std: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Cached VAE moments → the packed, normalised x0 the transformer is trained on.

    Args:
        moments: (B, 2C, H, W) posterior mean ‖ logvar, as stored in the cache.
        bn_mean, bn_std: (4C,) the VAE's BatchNorm statistics (std = sqrt(running_var + eps)).
        generator: None → posterior mode (the reference); else one sample mean + std·ε drawn from it.
    Returns:
        x0 (B, H/2·W/2, 4C), and the token grid height H/2 and width W/2.
    """
    mean, logvar = moments.chunk(2, dim=1)
    z = mean
    if generator is not None:
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        z = mean + std * eps
    patched = normalize_latents(patchify(z), bn_mean, bn_std)
    return pack(patched), patched.shape[2], patched.shape[3]
