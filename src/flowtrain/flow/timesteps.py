"""Sampling the training noise level σ ∈ (0, 1).

Schemes (the SD3 paper's names; diffusers `training_utils.compute_density_for_timestep_sampling` implements the
same densities but draws from the global RNG, while we need an explicit generator for exact resume):
  uniform       σ ~ U(0, 1)
  logit_normal  σ = sigmoid(N(mean, std))
  mode          u ~ U(0,1), σ = 1 - u - s·(cos²(πu/2) - 1 + u)
then an optional shift σ' = s·σ / (1 + (s - 1)·σ) (s > 1 moves mass towards noise).

Resolution-dependent shift (`timesteps.shift_mode: resolution`): FLUX.2's sampler shifts its σ schedule with
diffusers' exponential time shift σ' = e^μ / (e^μ + (1/σ - 1)), which is exactly the shift above with s = e^μ.
μ comes from `compute_empirical_mu(image_seq_len, num_steps)` of diffusers' Flux2 / Flux2-Klein pipelines, a fit
that depends on the number of packed image tokens *and* the inference step count. Training has no step count, so
we take μ at a configured `reference_steps` (default 50, the Klein base pipeline's default): training then sees
σ with the same shift the sampler will use at that resolution. Above 4300 tokens diffusers' μ ignores the step
count (μ = 0.00016927·N + 0.45666666). E.g. 512² px (1024 tokens) → μ ≈ 1.70, s ≈ 5.5; 1024² (4096 tokens) →
μ ≈ 2.02, s ≈ 7.6.
"""

from __future__ import annotations

import math

import torch


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = shift·σ / (1 + (shift - 1)·σ); identity for shift == 1."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """μ of FLUX.2's dynamic shift, identical to diffusers' `compute_empirical_mu` (pipeline_flux2[_klein].py).

    image_seq_len: packed image tokens (H/16 · W/16 for Klein); num_steps: inference steps.
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def resolution_shift(image_seq_len: int, reference_steps: int = 50) -> float:
    """The fixed-shift factor s = e^μ equivalent to FLUX.2's time shift at this token count (see module doc)."""
    return math.exp(flux2_empirical_mu(image_seq_len, reference_steps))


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
        sigma = torch.sigmoid(torch.randn(batch_size, generator=generator) * logit_std + logit_mean)
    elif scheme == "mode":
        u = torch.rand(batch_size, generator=generator)
        sigma = 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    else:
        raise ValueError(f"unknown timestep scheme {scheme!r}; expected uniform, logit_normal or mode")
    return shift_sigmas(sigma, shift)
