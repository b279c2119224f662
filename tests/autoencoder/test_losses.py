"""The autoencoder's loss terms against hand computations: free bits, hinge / non-saturating values, the adaptive
GAN weight, and R1 against the gradient of a function whose gradient is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from flowtrain.autoencoder import losses as L


def _posterior() -> DiagonalGaussianDistribution:
    """One image, 2 latent channels, 1×2 positions, σ = 1 everywhere (log σ² = 0), so KL = μ²/2 per value.
    channel 0: μ = (1, 0) → KL (0.5, 0), mean 0.25;   channel 1: μ = (2, 2) → KL (2, 2), mean 2."""
    mean = torch.tensor([[[[1.0, 0.0]], [[2.0, 2.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    logvar = torch.zeros_like(mean)
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)), mean


def test_free_bits_against_a_hand_computation():
    posterior, mean = _posterior()
    elem = L.kl_elements(posterior)
    assert elem.tolist() == [[[[0.5, 0.0]], [[2.0, 2.0]]]]
    # λ = 0: plain KL, Σ over values = 0.5 + 0 + 2 + 2 = 4.5 nats per image (what diffusers' posterior.kl() says)
    assert L.kl_free_bits(elem, 0.0).item() == pytest.approx(4.5)
    assert posterior.kl().item() == pytest.approx(4.5)
    # λ = 1: channel 0 counts max(1, 0.25) = 1, channel 1 max(1, 2) = 2; × 2 positions = 6
    kl = L.kl_free_bits(elem, 1.0)
    assert kl.item() == pytest.approx(6.0)
    kl.backward()
    # channel 0 is under its free bits: no gradient; channel 1 gets d(Σ μ²/2)/dμ = μ
    assert mean.grad[0, 0].tolist() == [[0.0, 0.0]]
    assert mean.grad[0, 1].tolist() == [[2.0, 2.0]]
    # kl_loss divides by the number of pixel values and reports the plain KL next to it
    pixels = torch.zeros(1, 3, 4, 4)
    used, plain = L.kl_loss(_posterior()[0], pixels, 1.0)
    assert used.item() == pytest.approx(6.0 / 48) and plain.item() == pytest.approx(4.5 / 48)
    used0, plain0 = L.kl_loss(_posterior()[0], pixels, 0.0)
    assert used0 is plain0 and used0.item() == pytest.approx(4.5 / 48)


def test_kl_beta_warms_up_linearly():
    assert [L.kl_beta(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert L.kl_beta(0, 0.3, 0) == 0.3


def test_hinge_and_non_saturating_loss_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = (0, 0.5, 2) → mean 5/6;  relu(1 + fake) = (0, 1, 2.5) → mean 7/6;  ½ (5/6 + 7/6) = 1
    assert L.d_loss_hinge(real, fake).item() == pytest.approx(1.0)
    assert L.g_loss_hinge(fake).item() == pytest.approx(0.5 / 3)  # −mean(fake) = −(−0.5 / 3)
    # a discriminator that is right by more than the margin costs nothing
    assert L.d_loss_hinge(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -4.0])).item() == 0.0

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    d_ns = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert L.d_loss_non_saturating(real, fake).item() == pytest.approx(d_ns, rel=1e-6)
    g_ns = -sum(math.log(1 / (1 + math.exp(-f))) for f in fake.tolist()) / 3  # −E log σ(D(x̂))
    assert L.g_loss_non_saturating(fake).item() == pytest.approx(g_ns, rel=1e-6)


def test_adaptive_weight_against_a_hand_computation():
    w = torch.tensor([1.0, -2.0], requires_grad=True)  # the "last layer"
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    rec, g = (a * w).sum(), (b * w).sum()  # ∂rec/∂w = a (‖a‖ = 5), ∂G/∂w = b (‖b‖ = 1)
    weight = L.adaptive_weight(rec, g, w)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad and w.grad is None  # detached, and nothing accumulated into w.grad
    # both losses can still be back-propagated afterwards (the graph was retained)
    (rec + g).backward()
    assert torch.allclose(w.grad, a + b)
    # a generator gradient of zero: 5 / 1e-4 = 5e4, clamped to max_weight
    w2 = torch.tensor([1.0, -2.0], requires_grad=True)
    clamped = L.adaptive_weight((a * w2).sum(), (0 * w2).sum(), w2, max_weight=1e4)
    assert clamped.item() == pytest.approx(1e4)


def test_r1_penalty_against_the_closed_form_gradient():
    """D(x) = Σ_i c_i·x_i² per image: ∇ₓD = 2·c·x, so R1 = mean_b Σ_i 4·c_i²·x_i², and ∂R1/∂c_i = mean_b 8·c_i·x_i²."""
    torch.manual_seed(0)
    c = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.randn(5, 3, 4, 4)

    def disc(v: torch.Tensor) -> torch.Tensor:
        return (c * v.square()).sum(dim=(1, 2, 3))

    r1 = L.r1_penalty(disc, x)
    expected = (4 * c.detach().square() * x.square()).sum(dim=(1, 2, 3)).mean()
    assert r1.item() == pytest.approx(expected.item(), rel=1e-5)
    r1.backward()  # differentiable in the discriminator's weights (create_graph)
    assert torch.allclose(c.grad, (8 * c.detach() * x.square()).mean(dim=0), rtol=1e-5, atol=1e-6)
    assert not x.requires_grad  # the caller's real images are left as they were


def test_kl_of_video_latents_sums_every_axis():
    """A 5-D posterior (B, C, F, H, W), as a video VAE gives: the KL sums frames too (diffusers' kl() would not)."""
    torch.manual_seed(0)
    params = torch.randn(2, 4, 3, 2, 2)  # mean ‖ logvar over 2 channels, 3 frames, 2×2
    posterior = DiagonalGaussianDistribution(params)
    pixels = torch.zeros(2, 3, 3, 4, 4)
    mean, logvar = params[:, :2], params[:, 2:]
    by_hand = (0.5 * (mean.square() + logvar.exp() - 1 - logvar)).sum() / 2 / pixels[0].numel()
    used, plain = L.kl_loss(posterior, pixels, 0.0)
    assert used.item() == pytest.approx(by_hand.item(), rel=1e-6) and plain is used
    used_fb, plain_fb = L.kl_loss(posterior, pixels, 100.0)  # every channel under λ: λ·C·F·H·W per image
    assert used_fb.item() == pytest.approx(100.0 * 2 * 3 * 2 * 2 / pixels[0].numel())
    assert plain_fb.item() == pytest.approx(by_hand.item(), rel=1e-6)
