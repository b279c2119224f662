"""The FLUX.2 Klein VAE (`AutoencoderKLFlux2`) for `flowtrain autoencoder`: what the generic trainer asks the family."""

from __future__ import annotations

from typing import Any

import torch

from flowtrain.models.common import load_pretrained_vae


def build_vae(cfg: Any) -> torch.nn.Module:
    """A randomly initialised `AutoencoderKLFlux2` of the `model:` section's architecture (or `pretrained`), float32."""
    from diffusers import AutoencoderKLFlux2

    if cfg.pretrained is not None:
        return load_pretrained_vae(AutoencoderKLFlux2, cfg.pretrained)
    n = len(cfg.block_out_channels)
    return AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention,
        batch_norm_eps=cfg.batch_norm_eps,
        patch_size=(2, 2),
    )


def pixel_multiple(cfg: Any) -> int:
    """2^(blocks − 1) VAE down-sampling × FLUX.2's 2×2 latent patchify."""
    return 2 ** len(cfg.block_out_channels)
