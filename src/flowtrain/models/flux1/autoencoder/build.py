"""The FLUX.1 VAE (`AutoencoderKL`, no quant convs) for `flowtrain autoencoder`, and its latent normalisation fit.

FLUX.1 feeds its transformer x0 = (z − shift_factor) · scaling_factor, with z the posterior mean and two scalars in
the VAE's config. After training, `finish` sets them from the data: shift = mean of z over every value, scaling =
1 / its (population) standard deviation, so x0 has zero mean and unit variance over the training images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from flowtrain.models.common import load_pretrained_vae


def build_vae(cfg: Any) -> torch.nn.Module:
    """A randomly initialised `AutoencoderKL` of the `model:` section's architecture (or `pretrained`), float32."""
    from diffusers import AutoencoderKL

    if cfg.pretrained is not None:
        return load_pretrained_vae(AutoencoderKL, cfg.pretrained)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention,
        use_quant_conv=False,  # as FLUX.1's VAE
        use_post_quant_conv=False,
    )


def pixel_multiple(cfg: Any) -> int:
    """2^(blocks − 1) VAE down-sampling × FLUX.1's 2×2 latent packing."""
    return 2 ** len(cfg.block_out_channels)


@torch.no_grad()
def finish(vae: torch.nn.Module, dataset: Any, cfg: Any, *, device: Any, progress: bool = True) -> dict[str, Any]:
    """Fit `shift_factor` / `scaling_factor` into the VAE's config (when `cfg.stats.fit`); a JSON-able summary."""
    if not cfg.stats.fit:
        return {}
    if cfg.stats.max_images is not None and cfg.stats.max_images < len(dataset):
        dataset = Subset(dataset, range(cfg.stats.max_images))
    was_training = vae.training
    vae.eval()
    s1 = s2 = torch.zeros((), dtype=torch.float64)
    count, values, l1 = 0, 0, 0.0
    bar = tqdm(total=len(dataset), desc="latent stats", unit="img", disable=not progress, dynamic_ncols=True)
    for pixels in DataLoader(dataset, batch_size=cfg.stats.batch_size, shuffle=False):
        pixels = pixels.to(device)
        mean = vae.encode(pixels).latent_dist.mean
        l1 += (vae.decode(mean).sample.float() - pixels).abs().mean(dim=(1, 2, 3)).sum().item()
        z = mean.double().cpu()
        s1, s2, values = s1 + z.sum(), s2 + z.square().sum(), values + z.numel()
        count += pixels.shape[0]
        bar.update(pixels.shape[0])
    bar.close()
    vae.train(was_training)
    shift = (s1 / values).item()
    std = max((s2 / values).item() - shift * shift, 0.0) ** 0.5
    scaling = 1.0 / max(std, 1e-12)
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    return {"images": count, "reconstruction_l1": l1 / max(count, 1), "shift_factor": shift, "scaling_factor": scaling}
