"""Qwen-Image's side of `flowtrain autoencoder` (the `TrainsAutoencoder` capability): an `AutoencoderKLQwenImage`
built from an autoencoder config's `model:` section, and its `latents_mean` / `latents_std` fitted after training.
The VAE is a causal 3-D one (the layout it shares with Wan's: `models/causal_vae.py`): images go through it as
one-frame clips, so its autoencoder configs set `data.frames: 1` ((3, 1, R, R) batches)."""

from __future__ import annotations

from typing import Any

import torch

from flowtrain.models.causal_vae import finish, fit_latent_stats, layout, pixel_multiple

__all__ = ["build_vae", "finish", "fit_latent_stats", "pixel_multiple"]


def build_vae(model: Any) -> torch.nn.Module:
    """A randomly initialised `AutoencoderKLQwenImage` (float32), or `model.pretrained`'s."""
    from diffusers import AutoencoderKLQwenImage

    if model.pretrained is not None:
        from flowtrain.models.common import load_pretrained_vae

        return load_pretrained_vae(AutoencoderKLQwenImage, model.pretrained)
    base, mult, temporal = layout(model)
    return AutoencoderKLQwenImage(
        base_dim=base,
        z_dim=model.latent_channels,
        dim_mult=mult,
        num_res_blocks=model.layers_per_block,
        attn_scales=[],
        temperal_downsample=temporal,
        dropout=0.0,
        latents_mean=[0.0] * model.latent_channels,
        latents_std=[1.0] * model.latent_channels,
    )
