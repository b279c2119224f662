"""Sampling the training noise level σ ∈ (0, 1).

Schemes (the SD3 paper's names; diffusers `training_utils.compute_density_for_timestep_sampling` implements the
same densities but draws from the global RNG, while we need an explicit generator for exact resume):
  uniform       σ ~ U(0, 1)
  logit_normal  σ = sigmoid(N(mean, std))
  mode          u ~ U(0,1), σ = 1 - u - s·(cos²(πu/2) - 1 + u)
then an optional shift σ' = s·σ / (1 + (s - 1)·σ) (s > 1 moves mass towards noise).

A resolution-dependent shift (`timesteps.shift_mode: resolution`) is the model family's: each family's sampler
shifts its schedule by the image-token count in its own way (`ModelFamily.resolution_shift` gives the
equivalent s for the formula above).
"""

from __future__ import annotations

import math

import torch


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = shift·σ / (1 + (shift - 1)·σ); identity for shift == 1."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def restrict_sigmas(sigma: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """σ on (0, 1) → lo + (hi - lo)·σ on (lo, hi): the same density squeezed onto a sub-range, each draw keeping its
    rank (for a model that denoises only part of the noise range, e.g. one expert of a two-expert model)."""
    return lo + (hi - lo) * sigma


def sample_sigmas(
    batch_size: int,
    generator: torch.Generator,
    scheme: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
) -> torch.Tensor:
    """Draw (batch_size,) float32 noise levels in (0, 1) on the CPU from `generator`."""
    if scheme == "uniform":
        sigma = torch.rand(batch_size, generator=generator)
    elif scheme == "logit_normal":
        u = torch.randn(batch_size, generator=generator)
        # ·1 and +0 change no bit (sigmoid(±0) alike): skipped for the standard logit-normal, drawn every step
        sigma = torch.sigmoid(u if (logit_std, logit_mean) == (1.0, 0.0) else u * logit_std + logit_mean)
    elif scheme == "mode":
        u = torch.rand(batch_size, generator=generator)
        sigma = 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    else:
        raise ValueError(f"unknown timestep scheme {scheme!r}; expected uniform, logit_normal or mode")
    return shift_sigmas(sigma, shift)
