"""Fitting the VAE's BatchNorm latent statistics the way FLUX.2 Klein uses them.

Klein normalises latents with the *running* stats of `vae.bn` (never updated by the pipeline):
    x = (patchify(z) - running_mean) / sqrt(running_var + batch_norm_eps)
where z is the posterior mean (B, C, H, W) and patchify is the 2×2 space-to-channel of
`flowtrain.models.flux2_klein.latents.patchify` → (B, 4C, H/2, W/2). Setting running_mean / running_var to the
per-channel mean / (population) variance of patchify(z) over the data makes the transformer's x0 ≈ N(0, 1) per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from flowtrain.models.flux2_klein.latents import patchify


@dataclass
class LatentStats:
    mean: torch.Tensor  # (4C,) float64
    var: torch.Tensor  # (4C,) float64, population variance
    count: int  # images used
    reconstruction_l1: float  # mean |decode(mean) - x| over those images, in [-1, 1] pixel units


@torch.no_grad()
def fit_latent_stats(
    vae: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> LatentStats:
    """Run the encoder over `dataset` ((3, H, W) tensors in [-1, 1]), set `vae.bn` running stats, return them.

    Sums are accumulated in float64, so the result does not depend on the batch size beyond rounding.
    The decoded posterior mean's L1 error comes for free here (same pass) and is reported as a quality check.
    """
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    was_training = vae.training
    vae.eval()
    total = torch.zeros((), dtype=torch.float64)
    s1 = s2 = None
    n_pix = 0
    l1 = 0.0
    bar = tqdm(total=len(dataset), desc="latent stats", unit="img", disable=not progress, dynamic_ncols=True)
    for pixels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pixels = pixels.to(device)
        mean = vae.encode(pixels).latent_dist.mean
        recon = vae.decode(mean).sample
        l1 += (recon.float() - pixels).abs().mean(dim=(1, 2, 3)).sum().item()
        patched = patchify(mean.float()).double()  # (B, 4C, h, w)
        flat = patched.transpose(0, 1).reshape(patched.shape[1], -1)
        s1 = flat.sum(1) if s1 is None else s1 + flat.sum(1)
        s2 = (flat * flat).sum(1) if s2 is None else s2 + (flat * flat).sum(1)
        n_pix += flat.shape[1]
        total += pixels.shape[0]
        bar.update(pixels.shape[0])
    bar.close()
    mu = s1.cpu() / n_pix
    var = (s2.cpu() / n_pix - mu * mu).clamp_min(0.0)
    bn = vae.bn
    if bn.running_mean.shape != mu.shape:
        raise ValueError(f"vae.bn has {bn.running_mean.numel()} channels, patchified latents have {mu.numel()}")
    bn.running_mean.copy_(mu.to(bn.running_mean))
    bn.running_var.copy_(var.to(bn.running_var))
    vae.train(was_training)
    count = int(total.item())
    return LatentStats(mean=mu, var=var, count=count, reconstruction_l1=l1 / max(count, 1))


def finish(vae: torch.nn.Module, dataset: Dataset, cfg: Any, *, device: Any, progress: bool = True) -> dict[str, Any]:
    """The family's `finish_autoencoder`: fit `vae.bn`'s running stats (when `cfg.stats.fit`); a JSON-able summary."""
    if not cfg.stats.fit:
        return {}
    stats = fit_latent_stats(
        vae, dataset, batch_size=cfg.stats.batch_size, max_images=cfg.stats.max_images, device=device, progress=progress
    )
    std = torch.sqrt(stats.var + vae.config.batch_norm_eps)
    return {
        "images": stats.count,
        "reconstruction_l1": stats.reconstruction_l1,
        "latent_mean": stats.mean.tolist(),
        "latent_std": std.tolist(),
    }
