"""One training step of the autoencoder, as two halves that touch disjoint weights:

    autoencoder half   x → q(z|x) → z ~ q → x̂ ;  L_AE = rec + w_p·perceptual + β·KL + w_g·λ_adapt·G(D(x̂))
                       (the discriminator's weights are frozen while D(x̂) is taken: its gradient reaches x̂ only)
    discriminator half L_D(D(x), D(x̂.detach())) + γ/2·R1(x)   (x̂ detached: nothing reaches the autoencoder)

so the discriminator receives gradients only in its own half, and the autoencoder only in its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from flowtrain.autoencoder import losses as L


@dataclass
class AEOutput:
    """What the autoencoder half returns: the loss to back-propagate, its logged terms, and x̂ for the D half."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    recon: torch.Tensor


def last_decoder_layer(vae: torch.nn.Module) -> torch.Tensor:
    """The weight the adaptive GAN weight is measured at: the decoder's output convolution (diffusers' VAEs all
    name it `decoder.conv_out`)."""
    conv = getattr(getattr(vae, "decoder", None), "conv_out", None)
    if conv is None or not isinstance(getattr(conv, "weight", None), torch.Tensor):
        raise ValueError(f"{type(vae).__name__} has no decoder.conv_out: set gan.adaptive_weight: false")
    return conv.weight


@contextlib.contextmanager
def frozen(module: torch.nn.Module | None):
    """Within the block `module`'s parameters do not require grad (so nothing accumulates in their .grad)."""
    if module is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def autoencoder_half(
    vae: torch.nn.Module,
    pixels: torch.Tensor,
    cfg: Any,
    *,
    beta: float,
    gan_on: bool,
    noise: torch.Generator,
    discriminator: torch.nn.Module | None = None,
    perceptual: torch.nn.Module | None = None,
    autocast: Any = contextlib.nullcontext,
) -> AEOutput:
    """The autoencoder's loss on a batch of pixels (B, 3, ...) in [-1, 1] (see the module doc); `cfg` the whole
    autoencoder config. Terms: rec, kl (what the loss uses), kl_raw (without free bits), and when on: perceptual,
    g (generator loss), g_weight (the adaptive weight)."""
    with autocast():
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=noise)).sample
    rec = L.reconstruction_loss(recon, pixels, cfg.loss.reconstruction)
    kl, kl_raw = L.kl_loss(posterior, pixels, cfg.loss.free_bits)
    terms = {"rec": rec, "kl": kl}
    if cfg.loss.free_bits > 0:
        terms["kl_raw"] = kl_raw
    nll = rec
    if perceptual is not None and cfg.perceptual.weight > 0:
        terms["perceptual"] = perceptual(recon.float(), pixels)
        nll = rec + cfg.perceptual.weight * terms["perceptual"]
    if not gan_on:
        return AEOutput(nll + beta * kl, terms, recon)
    with frozen(discriminator):
        g = L.G_LOSSES[cfg.gan.loss](discriminator(recon.float()))
    terms["g"] = g
    if cfg.gan.only:
        return AEOutput(cfg.gan.weight * g, terms, recon)
    weight = (
        L.adaptive_weight(nll, g, last_decoder_layer(vae), max_weight=cfg.gan.max_adaptive_weight)
        if cfg.gan.adaptive_weight
        else torch.ones((), device=g.device)
    )
    terms["g_weight"] = weight
    return AEOutput(nll + beta * kl + cfg.gan.weight * weight * g, terms, recon)


def discriminator_half(
    discriminator: torch.nn.Module, pixels: torch.Tensor, recon: torch.Tensor, cfg: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's loss on real `pixels` and reconstructions `recon` (detached here), + γ/2·R1 when on.
    Terms: d, logits_real, logits_fake (means), r1."""
    real, fake = pixels.float(), recon.detach().float()
    logits_real, logits_fake = discriminator(real), discriminator(fake)
    d = L.D_LOSSES[cfg.gan.loss](logits_real, logits_fake)
    terms = {"d": d, "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
    loss = d
    if cfg.gan.r1_weight > 0:
        terms["r1"] = L.r1_penalty(discriminator, real)
        loss = d + 0.5 * cfg.gan.r1_weight * terms["r1"]
    return loss, terms
