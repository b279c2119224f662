"""Wan latents and text: pure functions, each equal to a piece of diffusers' `WanPipeline`.

VAE latent      (B, 16, F', H/8, W/8) with F' = (F - 1)/4 + 1   AutoencoderKLWan, causal in time: an image is F = 1
normalised      (z - latents_mean) * (1 / latents_std), per channel (the VAE config's lists; the pipeline decodes
                with `latents / (1 / std) + mean`)
tokens          (B, F'·H'·W', 16), one token per latent voxel, channel-last. The transformer patchifies (1, 2, 2)
                itself, so the trainer's tokens are the latent grid flattened: the loss (a mean over every element)
                is the same number as over the 5-D latent, and the generic loop keeps its (B, N, C) view.
text            UMT5 last_hidden_state cut to each prompt's true length, zero-padded back to max_sequence_length
                (`WanPipeline._get_t5_prompt_embeds`); the transformer sees the padded (B, L, D) with no mask.
"""

from __future__ import annotations

import torch


def _stats(values: torch.Tensor | list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values).reshape(1, -1, 1, 1, 1).to(like.device, like.dtype)


def normalize(z: torch.Tensor, mean: torch.Tensor | list[float], std: torch.Tensor | list[float]) -> torch.Tensor:
    """(z - mean) / std per channel of a (B, C, F, H, W) latent, written as the Wan pipelines write it (times
    1/std), so results agree to the last bit."""
    return (z - _stats(mean, z)) * (1.0 / _stats(std, z))


def denormalize(x: torch.Tensor, mean: torch.Tensor | list[float], std: torch.Tensor | list[float]) -> torch.Tensor:
    """Inverse of `normalize`, in `WanPipeline.__call__`'s order of operations before decoding."""
    return x / (1.0 / _stats(std, x)) + _stats(mean, x)


def to_tokens(latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, C, F, H, W) → tokens (B, F·H·W, C) and the grid (F, H, W)."""
    b, c, f, h, w = latents.shape
    return latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c), (f, h, w)


def from_tokens(tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Tokens (B, F·H·W, C) on the grid (F, H, W) → (B, C, F, H, W); inverse of `to_tokens`."""
    f, h, w = grid
    b, _, c = tokens.shape
    return tokens.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def training_latents(
    moments: torch.Tensor,
    mean: torch.Tensor | list[float],
    std: torch.Tensor | list[float],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cached VAE moments → the normalised x0 tokens the transformer is trained on.

    Args:
        moments: (B, 2C, F', H', W') posterior mean ‖ logvar, as cached.
        mean, std: (C,) the VAE config's `latents_mean` / `latents_std`.
        generator: None → the posterior mean (mode, `retrieve_latents(..., sample_mode="argmax")`); else one draw
            mean + exp(logvar/2)·ε, ε drawn as diffusers' `DiagonalGaussianDistribution.sample(generator)` draws it.
    Returns:
        x0 (B, F'·H'·W', C) and the latent grid (F', H', W').
    """
    mu, logvar = moments.chunk(2, dim=1)
    z = mu
    if generator is not None:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
    return to_tokens(normalize(z, mean, std))


def pad_text(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """(B, L, D) rows (the real positions marked by a (B, L) bool `mask`, None: all real) → (B, length, D) with
    every position past a row's true length zero, as `_get_t5_prompt_embeds` pads. Rows longer than `length` are
    an error (the cache was made with a longer max_sequence_length)."""
    b, n, d = embeds.shape
    if n > length:
        raise ValueError(f"text rows of {n} tokens exceed max_sequence_length={length}")
    if mask is not None:
        embeds = embeds * mask.to(device=embeds.device, dtype=torch.bool).unsqueeze(-1)
    out = embeds.new_zeros(b, length, d)
    out[:, :n] = embeds
    return out


def expert_sigma_range(expert: str, boundary_ratio: float) -> tuple[float, float]:
    """The σ range [lo, hi) one Wan 2.2 expert denoises. `WanPipeline` switches at t = boundary_ratio ·
    num_train_timesteps with t = σ · num_train_timesteps: `transformer` (high noise) runs t ≥ boundary, so
    σ ∈ [boundary_ratio, 1]; `transformer_2` (low noise) the rest, σ ∈ [0, boundary_ratio)."""
    if expert == "high_noise":
        return boundary_ratio, 1.0
    if expert == "low_noise":
        return 0.0, boundary_ratio
    raise ValueError(f"unknown Wan expert {expert!r}; expected high_noise or low_noise")
