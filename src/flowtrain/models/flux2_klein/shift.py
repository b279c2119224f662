"""FLUX.2's resolution-dependent timestep shift.

FLUX.2's sampler shifts its σ schedule with diffusers' exponential time shift σ' = e^μ / (e^μ + (1/σ - 1)), which is
exactly the fixed shift σ' = sσ / (1 + (s-1)σ) with s = e^μ. μ comes from `compute_empirical_mu(image_seq_len,
num_steps)` of diffusers' Flux2 / Flux2-Klein pipelines, a fit that depends on the number of packed image tokens
*and* the inference step count. Training has no step count, so μ is taken at `model.shift_reference_steps`
(default 50, the Klein base pipeline's default): training then sees σ with the same shift the sampler will use at
that resolution. Above 4300 tokens μ ignores the step count (μ = 0.00016927·N + 0.45666666). E.g. 512² px (1024
tokens) → μ ≈ 1.70, s ≈ 5.5; 1024² (4096 tokens) → μ ≈ 2.02, s ≈ 7.6.
"""

from __future__ import annotations

import math


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
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
    return math.exp(empirical_mu(image_seq_len, reference_steps))
