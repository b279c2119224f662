"""σ sampling: the densities' moments for a fixed seed, diffusers equivalence, and the caption dropout draw of the
training step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.flow import sample_sigmas

N = 200_000


def _moments_by_quadrature(f, n: int = 200_001) -> tuple[float, float]:
    """Mean and variance of f(u), u ~ U(0, 1), by the midpoint rule."""
    u = (np.arange(n) + 0.5) / n
    v = f(u)
    return float(v.mean()), float(v.var())


def _logit_normal_moments(mean: float, std: float) -> tuple[float, float]:
    z = np.linspace(-10, 10, 400_001)
    pdf = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    s = 1 / (1 + np.exp(-(mean + std * z)))
    m = np.trapezoid(s * pdf, z)
    return float(m), float(np.trapezoid((s - m) ** 2 * pdf, z))


CASES = {
    "uniform": (dict(scheme="uniform"), (0.5, 1 / 12)),
    "logit_normal": (dict(scheme="logit_normal"), _logit_normal_moments(0.0, 1.0)),
    "logit_normal_shifted_mean": (
        dict(scheme="logit_normal", logit_mean=0.5, logit_std=0.7),
        _logit_normal_moments(0.5, 0.7),
    ),
    "mode": (
        dict(scheme="mode", mode_scale=1.29),
        _moments_by_quadrature(lambda u: 1 - u - 1.29 * (np.cos(np.pi * u / 2) ** 2 - 1 + u)),
    ),
    "uniform_shift3": (dict(scheme="uniform", shift=3.0), _moments_by_quadrature(lambda u: 3 * u / (1 + 2 * u))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sigma_moments(name):
    kwargs, (mean, var) = CASES[name]
    sigma = sample_sigmas(N, torch.Generator().manual_seed(1234), **kwargs).double()
    assert sigma.shape == (N,)
    assert sigma.min() > 0 and sigma.max() < 1
    # 5 standard errors of the sample mean / variance (the estimate for a fixed seed is reproducible, the bound loose)
    se_mean = math.sqrt(var / N)
    assert abs(sigma.mean().item() - mean) < 5 * se_mean, (sigma.mean().item(), mean)
    assert abs(sigma.var().item() - var) < 5 * var * math.sqrt(2 / N) * 2, (sigma.var().item(), var)


def test_schemes_differ_and_are_reproducible():
    a = sample_sigmas(64, torch.Generator().manual_seed(0), "mode")
    b = sample_sigmas(64, torch.Generator().manual_seed(0), "mode")
    c = sample_sigmas(64, torch.Generator().manual_seed(0), "logit_normal")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_same_densities_as_diffusers(scheme):
    """diffusers' compute_density_for_timestep_sampling draws from the global RNG; with the same seed the same
    numbers come out of our explicit generator."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    torch.manual_seed(7)
    ref = compute_density_for_timestep_sampling(scheme, 1000, logit_mean=0.3, logit_std=0.8, mode_scale=1.1)
    ours = sample_sigmas(1000, torch.Generator().manual_seed(7), scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.1)
    assert torch.allclose(ours, ref.float(), atol=1e-6)


def _batch(b: int = 4, latent: int = 16, seq: int = 8, width: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "latent_moments": torch.randn(b, 8, latent, latent, generator=g),
        "text_embeds": torch.randn(b, seq, width, generator=g) + 5.0,  # far from the "empty" embedding below
        "index": torch.arange(b),
    }


def _cfg(**sections) -> FlowtrainConfig:
    model = {"family": "flux2_klein", "pretrained": "x", "dtype": "float32"}
    return FlowtrainConfig.model_validate({"model": model, **sections})


def _inputs(cfg: FlowtrainConfig, batch: dict, seed: int = 3, empty: torch.Tensor | None = None):
    from flowtrain.models import get_family
    from flowtrain.train.step import make_inputs

    norm = {"bn_mean": torch.zeros(16), "bn_std": torch.ones(16)}
    cond = None if empty is None else {"text_embeds": empty.unsqueeze(0)}
    return make_inputs(batch, cfg, get_family("flux2_klein"), norm, cond, torch.Generator().manual_seed(seed), "cpu")


def test_caption_dropout_uses_the_empty_embedding():
    batch, empty = _batch(b=4000, latent=2, seq=3, width=2), torch.zeros(3, 2)
    text = batch["text_embeds"]
    none = _inputs(_cfg(train={"caption_dropout": 0.0}), batch, empty=empty)
    assert torch.equal(none.cond["text_embeds"], text)
    all_ = _inputs(_cfg(train={"caption_dropout": 1.0}), batch, empty=empty)
    assert torch.equal(all_.cond["text_embeds"], empty.expand_as(text))
    half = _inputs(_cfg(train={"caption_dropout": 0.3}), batch, empty=empty).cond["text_embeds"]
    dropped = (half == 0).all(dim=(1, 2))
    kept = (half == text).all(dim=(1, 2))
    assert bool((dropped | kept).all())  # whole rows are replaced, never parts
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    # dropout draws come after σ and noise: the other draws are unchanged by it
    assert torch.equal(none.sigma, all_.sigma) and torch.equal(none.noise, all_.noise)
    with pytest.raises(ValueError, match="empty-prompt"):
        _inputs(_cfg(train={"caption_dropout": 0.5}), batch, empty=None)


def test_timestep_config_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="mode_scale"):
        _cfg(timesteps={"mode_scale": 2.0})
    with pytest.raises(ValidationError, match="shift_mode"):
        _cfg(timesteps={"shift_mode": "auto"})
    with pytest.raises(ValidationError, match="logit_std"):
        _cfg(timesteps={"logit_std": 0})
