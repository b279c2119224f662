"""The rectified-flow path every model family trains on: the ONE sign convention of flowtrain.

σ = 0 is data, σ = 1 is noise:

    x_σ = (1 - σ) · x0 + σ · ε          (interpolate)
    v   = dx_σ/dσ = ε - x0              (velocity_target)

The transformer predicts v; the sampler integrates from σ = 1 down to 0 with x ← x + (σ_next - σ) · v.
"""

from __future__ import annotations

import torch


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, ..., 1) broadcastable against `like`."""
    return sigma.reshape(sigma.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 - σ)·x0 + σ·noise.

    Args:
        x0: clean latents, (B, ...).
        noise: standard normal, same shape as x0.
        sigma: (B,) in [0, 1].
    Returns:
        (B, ...) noisy latents.
    """
    s = _expand(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target v = noise - x0 (the σ-derivative of `interpolate`), same shape as x0."""
    return noise - x0
