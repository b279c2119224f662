"""A patch discriminator: a few strided 4×4 convolutions that give one real/fake logit per image patch.

The layout is pix2pix's "N-layer" PatchGAN, which VQGAN / LDM train their autoencoders against:
    conv4×4/2 → LeakyReLU(0.2) → [conv4×4/2 → norm → LeakyReLU] × (layers − 1) → conv4×4/1 → norm → LeakyReLU
    → conv4×4/1 → 1 channel
(B, 3, H, W) → (B, 1, h, w) logits; each sees a receptive field of 16-70 px (more layers: larger patches).

Ours normalises with GroupNorm where they use BatchNorm: with no batch statistics the discriminator's state changes
only in its own optimizer step (the generator's forward through it touches nothing), and the R1 penalty is a sum of
per-image terms, as its definition assumes.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class PatchDiscriminator(nn.Module):
    """pix2pix-style N-layer patch discriminator (see the module doc). `channels`: width of the first layer,
    doubled per layer up to 8×; `layers`: stride-2 stages (each halves the side; the input side must be at least
    3·2^layers so the two stride-1 convolutions still leave one patch)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        self.layers, self.min_side = layers, 3 * 2**layers
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(width, out, 4, stride, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(
                f"gan.discriminator: {x.shape[-2]}×{x.shape[-1]} px images are too small for "
                f"{self.layers} layers (need ≥ {self.min_side} px); lower gan.discriminator_layers"
            )
        return self.net(x)


def _init(m: nn.Module) -> None:
    """N(0, 0.02) convolutions and N(1, 0.02) norm scales, the DCGAN initialisation these discriminators use."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
