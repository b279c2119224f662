"""Qwen-Image latents: pure functions, each equal to a piece of diffusers' `QwenImagePipeline`.

VAE latent      (B, 16, 1, H/8, W/8)   AutoencoderKLQwenImage is a video VAE: one frame for an image
normalised      (z - latents_mean) / latents_std, per channel (the VAE config's lists)
packed tokens   (B, H/16 · W/16, 64)   2×2 patches, channel-major within a token (`_pack_latents`)
img_shapes      [[(1, H/16, W/16)]] * B, the transformer's RoPE grid (frame, height, width)
"""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, H, W) → (B, H/2 · W/2, 4C); equals `QwenImagePipeline._pack_latents`."""
    b, c, f, h, w = latents.shape
    if f != 1:
        raise ValueError(f"an image latent has one frame, got {f}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h·w, 4C) tokens on an h×w grid → (B, C, 1, 2h, 2w); inverse of `pack` (`_unpack_latents`)."""
    b, n, c4 = tokens.shape
    x = tokens.reshape(b, height, width, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, height * 2, width * 2)


def _stats(values: torch.Tensor | list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values).reshape(1, -1, 1, 1, 1).to(like.device, like.dtype)


def normalize(z: torch.Tensor, mean: torch.Tensor | list[float], std: torch.Tensor | list[float]) -> torch.Tensor:
    """(z - mean) / std per channel of a (B, C, 1, H, W) latent, written as the pipelines write it (multiplying by
    1/std), so results agree to the last bit."""
    return (z - _stats(mean, z)) * (1.0 / _stats(std, z))


def denormalize(x: torch.Tensor, mean: torch.Tensor | list[float], std: torch.Tensor | list[float]) -> torch.Tensor:
    """Inverse of `normalize`, as `QwenImagePipeline.__call__` does before decoding."""
    return x / (1.0 / _stats(std, x)) + _stats(mean, x)


def training_latents(
    moments: torch.Tensor,
    mean: torch.Tensor | list[float],
    std: torch.Tensor | list[float],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cached VAE moments → the packed, normalised x0 the transformer is trained on.

    Args:
        moments: (B, 2C, 1, H, W) posterior mean ‖ logvar (logvar as the VAE clamps it), as cached.
        mean, std: (C,) the VAE config's `latents_mean` / `latents_std`.
        generator: None → the posterior mean (mode); else one draw mean + exp(logvar/2)·ε, ε drawn exactly as
            diffusers' `DiagonalGaussianDistribution.sample(generator)` draws it.
    Returns:
        x0 (B, H/2 · W/2, 4C) and the token grid (H/2, W/2).
    """
    mu, logvar = moments.chunk(2, dim=1)
    z = mu
    if generator is not None:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
    x0 = pack(normalize(z, mean, std))
    return x0, (z.shape[-2] // 2, z.shape[-1] // 2)


def img_shapes(batch: int, height: int, width: int) -> list[list[tuple[int, int, int]]]:
    """The transformer's `img_shapes` for B images on an h×w token grid, in the pipeline's nested form."""
    return [[(1, height, width)]] * batch
