"""FLUX.2's resolution-dependent shift: equal to diffusers' empirical μ and the scheduler's time shift, and applied
by the training step under `timesteps.shift_mode: resolution`."""

from __future__ import annotations

import math

import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.flow import sample_sigmas, shift_sigmas
from flowtrain.models import get_family
from flowtrain.models.flux2_klein.shift import empirical_mu, resolution_shift


def test_empirical_mu_matches_diffusers_and_the_scheduler_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for tokens in (64, 1024, 4096, 4300, 4301, 16384):
        for steps in (4, 28, 50):
            assert empirical_mu(tokens, steps) == compute_empirical_mu(tokens, steps)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    sigma = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for tokens in (256, 1024, 4096):
        mu = compute_empirical_mu(tokens, 50)
        expected = sched.time_shift(mu, 1.0, sigma)
        assert torch.allclose(shift_sigmas(sigma, resolution_shift(tokens, 50)), expected, atol=1e-12)
    assert resolution_shift(1024) == pytest.approx(5.4847, abs=1e-3)
    assert resolution_shift(4096) == pytest.approx(7.5636, abs=1e-3)


def _batch(b: int = 4, latent: int = 16, seq: int = 8, width: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"latent_moments": torch.randn(b, 8, latent, latent, generator=g), "text_embeds": torch.randn(b, seq, width)}


def _sigma(timesteps: dict, model: dict | None = None) -> torch.Tensor:
    from flowtrain.train.step import make_inputs

    m = {"family": "flux2_klein", "pretrained": "x", "dtype": "float32", **(model or {})}
    cfg = FlowtrainConfig.model_validate({"model": m, "timesteps": timesteps})
    norm = {"bn_mean": torch.zeros(16), "bn_std": torch.ones(16)}
    gen = torch.Generator().manual_seed(3)
    return make_inputs(_batch(), cfg, get_family("flux2_klein"), norm, None, gen, torch.device("cpu")).sigma


def test_resolution_shift_in_the_training_step():
    """shift_mode resolution shifts the same draws as shift_mode fixed with s = exp(μ(tokens, reference steps))."""
    plain = _sigma({"scheme": "uniform"})  # 16×16 latent → 8×8 = 64 tokens
    res = _sigma({"scheme": "uniform", "shift_mode": "resolution"}, {"shift_reference_steps": 28})
    assert torch.allclose(res, shift_sigmas(plain, math.exp(empirical_mu(64, 28))))
    assert not torch.allclose(res, plain)
    assert torch.equal(
        sample_sigmas(4, torch.Generator().manual_seed(0)), sample_sigmas(4, torch.Generator().manual_seed(0))
    )
