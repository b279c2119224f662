"""The causal 3-D VAE layout that `AutoencoderKLWan` and `AutoencoderKLQwenImage` share, for `flowtrain
autoencoder`: the generic `model:` keys mapped onto it, and the per-channel latent statistics fitted after training.

Mapping of the generic keys:
    block_out_channels [c0, c1, ...]  base_dim = c0, dim_mult = [c / c0 ...]; 2^(len-1)× spatial down-sampling
    layers_per_block                  num_res_blocks
    latent_channels                   z_dim
The last two down-samplings are also temporal (the real VAEs' [False, True, True]), so time is compressed 4× and
clips are 4k+1 frames; an image is a one-frame clip (3, 1, H, W).

Both families normalise latents with the per-channel `latents_mean` / `latents_std` of the VAE config
((z - mean) / std); `finish` sets them to the posterior means' per-channel mean and (population) standard
deviation over the training data, so the transformer's x0 is about N(0, 1) per channel.
"""

from __future__ import annotations

from typing import Any

import torch

TEMPORAL_DOWNSAMPLINGS = 2  # 4× in time: the VAE encodes the first frame, then 4 frames per latent frame


def layout(model: Any) -> tuple[int, list[int], list[bool]]:
    ch = list(model.block_out_channels)
    levels = len(ch) - 1
    if levels < TEMPORAL_DOWNSAMPLINGS:
        raise ValueError(
            f"model.block_out_channels={ch}: AutoencoderKLWan needs at least {TEMPORAL_DOWNSAMPLINGS + 1} levels "
            "(its last two down-samplings also halve time)"
        )
    base = ch[0]
    if any(c % base for c in ch):
        raise ValueError(f"model.block_out_channels={ch}: every entry must be a multiple of the first (Wan's dim_mult)")
    temporal = [False] * (levels - TEMPORAL_DOWNSAMPLINGS) + [True] * TEMPORAL_DOWNSAMPLINGS
    return base, [c // base for c in ch], temporal


def pixel_multiple(model: Any) -> int:
    """Spatial down-sampling × the transformer's 2×2 patch."""
    return 2 ** (len(model.block_out_channels) - 1) * 2


@torch.no_grad()
def fit_latent_stats(
    vae: torch.nn.Module, dataset: Any, *, batch_size: int = 32, device: Any = "cpu", progress: bool = True
) -> dict[str, Any]:
    """Per-channel mean / std of the posterior means over `dataset` ((3, F, H, W) or (3, H, W) in [-1, 1]),
    written into `vae.config` (`latents_mean`, `latents_std`); also the decoded mean's L1 error. float64 sums."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    was_training = vae.training
    vae.eval()
    s1 = s2 = None
    n, count, l1 = 0, 0, 0.0
    bar = tqdm(total=len(dataset), desc="latent stats", unit="clip", disable=not progress, dynamic_ncols=True)
    for pixels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pixels = pixels.to(device)
        mean = vae.encode(pixels).latent_dist.mean  # (B, C, F', h, w)
        recon = vae.decode(mean).sample
        l1 += (recon.float() - pixels).abs().flatten(1).mean(1).sum().item()
        flat = mean.double().transpose(0, 1).reshape(mean.shape[1], -1)
        s1 = flat.sum(1) if s1 is None else s1 + flat.sum(1)
        s2 = (flat * flat).sum(1) if s2 is None else s2 + (flat * flat).sum(1)
        n += flat.shape[1]
        count += pixels.shape[0]
        bar.update(pixels.shape[0])
    bar.close()
    mu = s1.cpu() / n
    std = (s2.cpu() / n - mu * mu).clamp_min(1e-12).sqrt()
    vae.register_to_config(latents_mean=[float(v) for v in mu], latents_std=[float(v) for v in std])
    vae.train(was_training)
    return {
        "latents_mean": vae.config.latents_mean,
        "latents_std": vae.config.latents_std,
        "clips": count,
        "reconstruction_l1": l1 / max(count, 1),
    }


def finish(vae: torch.nn.Module, dataset: Any, cfg: Any, *, device: Any, progress: bool = True) -> dict[str, Any]:
    """The family's `finish_autoencoder`: fit `latents_mean` / `latents_std` when `cfg.stats.fit`."""
    if not cfg.stats.fit:
        return {}
    return fit_latent_stats(vae, dataset, batch_size=cfg.stats.batch_size, device=device, progress=progress)
