"""Wan's side of `flowtrain autoencoder` (the `TrainsAutoencoder` capability): which `AutoencoderKLWan` to build
from an autoencoder config's `model:` section, and the latent statistics to fit after training.

Mapping of the generic keys onto `AutoencoderKLWan`:
    block_out_channels [c0, c1, ...]  base_dim = c0, dim_mult = [c / c0 ...]; 2^(len-1)× spatial down-sampling
    layers_per_block                  num_res_blocks
    latent_channels                   z_dim
The last two down-samplings are also temporal (Wan's layout: [False, True, True] for the real 8× VAE), so time is
always compressed 4× and clips are 4k+1 frames; `scale_factor_spatial` is written into the config, so `WanPipeline`
(which reads `vae.config.scale_factor_spatial`) and precompute see the VAE's real factor.

Wan normalises latents with the per-channel `latents_mean` / `latents_std` of the VAE config
((z - mean) / std); `finish` sets them to the posterior means' per-channel mean and (population) standard
deviation over the training clips, so the transformer's x0 is about N(0, 1) per channel.
"""

from __future__ import annotations

from typing import Any

import torch

from flowtrain.models.causal_vae import TEMPORAL_DOWNSAMPLINGS, finish, fit_latent_stats, layout, pixel_multiple

__all__ = ["build_vae", "finish", "fit_latent_stats", "pixel_multiple"]


def build_vae(model: Any) -> torch.nn.Module:
    """A randomly initialised `AutoencoderKLWan` (float32), or `model.pretrained`'s."""
    from diffusers import AutoencoderKLWan

    if model.pretrained is not None:
        from flowtrain.models.common import load_pretrained_vae

        return load_pretrained_vae(AutoencoderKLWan, model.pretrained)
    base, mult, temporal = layout(model)
    return AutoencoderKLWan(
        base_dim=base,
        z_dim=model.latent_channels,
        dim_mult=mult,
        num_res_blocks=model.layers_per_block,
        attn_scales=[],
        temperal_downsample=temporal,
        dropout=0.0,
        latents_mean=[0.0] * model.latent_channels,
        latents_std=[1.0] * model.latent_channels,
        scale_factor_spatial=2 ** (len(mult) - 1),
        scale_factor_temporal=2**TEMPORAL_DOWNSAMPLINGS,
    )
