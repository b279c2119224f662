import math

import pytest
import torch

from flowtrain.flow import interpolate, sample_sigmas, shift_sigmas, velocity_target


def test_interpolate_endpoints_and_derivative():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    assert torch.equal(interpolate(x0, eps, torch.zeros(3)), x0)  # σ = 0 is data
    assert torch.equal(interpolate(x0, eps, torch.ones(3)), eps)  # σ = 1 is noise
    # The target is the σ-derivative of the path: check by central finite difference in float64.
    s, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 1e-6
    x0d, epsd = x0.double(), eps.double()
    fd = (interpolate(x0d, epsd, s + h) - interpolate(x0d, epsd, s - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0d, epsd), atol=1e-8, rtol=0)


def test_shift_matches_formula_and_identity():
    s = torch.linspace(0, 1, 11)
    assert torch.equal(shift_sigmas(s, 1.0), s)
    torch.testing.assert_close(shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))
    assert shift_sigmas(torch.tensor([0.5]), 3.0).item() > 0.5  # shift > 1 moves mass towards noise


@pytest.mark.parametrize(
    ("scheme", "kwargs", "mean", "std"),
    [
        ("uniform", {}, 0.5, 1 / math.sqrt(12)),
        ("logit_normal", {}, 0.5, 0.2083),  # E[sigmoid(N(0,1))] = 0.5 by symmetry; std from numerics
        ("logit_normal", {"logit_mean": 1.0}, 0.6970, None),
    ],
)
def test_sigma_distributions(scheme, kwargs, mean, std):
    s = sample_sigmas(200_000, torch.Generator().manual_seed(0), scheme, **kwargs)
    assert s.min() > 0 and s.max() < 1
    assert abs(s.mean().item() - mean) < 3e-3
    if std is not None:
        assert abs(s.std().item() - std) < 3e-3


def test_sigma_sampling_is_a_function_of_the_generator():
    a = sample_sigmas(8, torch.Generator().manual_seed(5), "logit_normal")
    b = sample_sigmas(8, torch.Generator().manual_seed(5), "logit_normal")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown timestep scheme"):
        sample_sigmas(2, torch.Generator(), "cosine")


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_sigmas_are_sigmoid_of_scaled_normal_draws(mean, std):
    """The standard case skips ·1 and +0, which change no bit: the draws are exactly sigmoid(mean + std·z)."""
    z = torch.randn(64, generator=torch.Generator().manual_seed(3))
    s = sample_sigmas(64, torch.Generator().manual_seed(3), "logit_normal", logit_mean=mean, logit_std=std)
    assert torch.equal(s, torch.sigmoid(z * std + mean))
