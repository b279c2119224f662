"""The autoencoder's loss terms as small pure functions (no module state; shapes in the docstrings).

Pixels are (B, 3, H, W) (or (B, 3, F, H, W) for video) in [-1, 1]; a posterior is diffusers'
`DiagonalGaussianDistribution` (`.mean`, `.var`, `.logvar`, each (B, C, ...) latents).

The GAN terms follow the well-known VQGAN / LDM recipe (facts, not their code): a hinge or non-saturating
discriminator loss, a generator loss of -D(x̂) (hinge) or softplus(-D(x̂)) (non-saturating), and an adaptive
generator weight ‖∇_w L_rec‖ / (‖∇_w L_G‖ + δ) at the decoder's last layer w, which keeps the adversarial gradient
on the scale of the reconstruction gradient whatever the discriminator's current logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def kl_beta(step: int, weight: float, warmup_steps: int) -> float:
    """β at optimizer step `step` (0-based): linear from weight/warmup to weight over `warmup_steps`, then flat."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, (step + 1) / warmup_steps)


def reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L1 or squared error over every value; recon / pixels (B, 3, ...) → scalar (float32)."""
    diff = recon.float() - pixels
    return diff.abs().mean() if kind == "l1" else diff.square().mean()


def kl_elements(posterior: Any) -> torch.Tensor:
    """Per-element KL(q(z|x) ‖ N(0, I)) in nats: 0.5·(μ² + σ² − 1 − log σ²), (B, C, ...) float32."""
    mean, var, logvar = posterior.mean.float(), posterior.var.float(), posterior.logvar.float()
    return 0.5 * (mean.square() + var - 1.0 - logvar)


def kl_free_bits(kl_elem: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL with free bits, per image, in nats: Σ_c max(λ, k̄_c) · |positions|.

    kl_elem (B, C, *S) per-element KL; k̄_c (C,) is its mean over the batch and the positions S of channel c;
    λ = `free_bits` nats per latent value. A channel whose average KL is below λ costs λ and gets no gradient from
    the KL (it may carry up to λ nats per value for free); λ = 0 gives the plain KL, Σ_{c,S} k / B.
    """
    per_channel = kl_elem.transpose(0, 1).reshape(kl_elem.shape[1], -1).mean(dim=1)  # (C,)
    positions = kl_elem[0, 0].numel()
    return per_channel.clamp_min(free_bits).sum() * positions


def kl_loss(posterior: Any, pixels: torch.Tensor, free_bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL the loss uses, plain KL), both per image and divided by the number of pixel values (3·H·W, LDM's
    `kl_weight` scale). Without free bits the two are the same tensor, for 4-D latents computed as diffusers'
    `posterior.kl()` computes it (so earlier runs' numerics stay bitwise); 5-D (video) latents sum every axis."""
    n = pixels[0].numel()
    if free_bits <= 0 and posterior.mean.ndim == 4:  # diffusers' kl() sums dims 1-3 only: images, not video
        kl = posterior.kl().float().mean() / n
        return kl, kl
    elem = kl_elements(posterior)
    plain = elem.sum() / elem.shape[0] / n
    if free_bits <= 0:
        return plain, plain
    return kl_free_bits(elem, free_bits) / n, plain.detach()


# ---- GAN ------------------------------------------------------------------------------------------------------------


def d_loss_hinge(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ½·(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]); logits of any shape → scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def d_loss_non_saturating(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (logistic) discriminator loss ½·(E[softplus(−D(x))] + E[softplus(D(x̂))])."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def g_loss_hinge(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss with a hinge discriminator: −E[D(x̂)]."""
    return -logits_fake.mean()


def g_loss_non_saturating(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss E[softplus(−D(x̂))] = −E[log σ(D(x̂))]."""
    return F.softplus(-logits_fake).mean()


D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": d_loss_hinge,
    "non_saturating": d_loss_non_saturating,
}
G_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": g_loss_hinge,
    "non_saturating": g_loss_non_saturating,
}


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """‖∂rec/∂w‖ / (‖∂G/∂w‖ + eps), clamped to [0, max_weight], detached; w = the decoder's last weight tensor.

    Both gradients are taken with `retain_graph=True` (the losses are back-propagated afterwards as usual) and do
    not accumulate into `w.grad`.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = g_rec.norm() / (g_adv.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def r1_penalty(discriminator: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty E_x[‖∇_x D(x)‖²] on real images x (B, ...) → scalar, differentiable in D's weights.

    The caller scales it (γ/2 in Mescheder et al.'s notation). ∇_x D is of the summed logits, so a patch
    discriminator's per-patch logits all contribute.
    """
    x = real.detach().requires_grad_(True)
    logits = discriminator(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.square().reshape(grad.shape[0], -1).sum(dim=1).mean()
