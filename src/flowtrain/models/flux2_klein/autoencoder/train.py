"""`flowtrain autoencoder`: train an `AutoencoderKLFlux2` on prepared images, fit its latent statistics, save it.

    raw shards → (3, R, R) in [-1, 1] → encode → z ~ q(z|x) → decode → rec(x̂, x) + β(step)·KL/(3·R·R)
    → AdamW (+ clip, LR schedule) → … → fit BatchNorm latent stats → `{output_dir}/vae` (save_pretrained)

Tracking is `flowtrain train`'s (`tracking:` section): `{output_dir}/logs/metrics.jsonl` always, an MLflow run in
`{output_dir}/mlflow.db` by default, graphs in `{output_dir}/graphs/`; the resolved config is
`{output_dir}/config.yaml`. The only checkpoint is the final `vae/` folder: autoencoder runs are short, and the
folder is what the next stage (a Klein pipeline's `vae/`) loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from flowtrain.models.flux2_klein.autoencoder.config import AEModelConfig, AutoencoderConfig, dump_autoencoder_config
from flowtrain.models.flux2_klein.autoencoder.data import RawImageDataset
from flowtrain.models.flux2_klein.autoencoder.stats import fit_latent_stats
from flowtrain.models.paths import subfolder_if_exists
from flowtrain.track import finish_tracking, open_tracking
from flowtrain.train.optim import build_lr_scheduler, build_optimizer

log = logging.getLogger(__name__)


@dataclass
class AutoencoderResult:
    output_dir: Path
    vae_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # logged total loss by step
    final: dict[str, float] = field(default_factory=dict)  # last logged row (loss, rec, kl, beta)
    stats: dict[str, Any] = field(default_factory=dict)  # latent stats summary (when fitted)
    seconds: float = 0.0


def build_vae(cfg: AEModelConfig) -> torch.nn.Module:
    """A randomly initialised `AutoencoderKLFlux2` (or the `pretrained` one) in float32."""
    from diffusers import AutoencoderKLFlux2

    if cfg.pretrained is not None:
        sub = subfolder_if_exists(cfg.pretrained, "vae")
        return AutoencoderKLFlux2.from_pretrained(
            cfg.pretrained, subfolder=sub, dtype=torch.float32, use_safetensors=True
        )
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


def kl_beta(step: int, weight: float, warmup_steps: int) -> float:
    """β at optimizer step `step` (0-based): linear from weight/warmup to weight over `warmup_steps`, then flat."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, (step + 1) / warmup_steps)


def autoencoder_loss(
    recon: torch.Tensor, pixels: torch.Tensor, posterior: Any, beta: float, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, rec, kl_per_value). recon/pixels (B, 3, H, W); KL summed over latent elements, divided by 3·H·W."""
    diff = recon.float() - pixels
    rec = diff.abs().mean() if kind == "l1" else diff.square().mean()
    kl = posterior.kl().float().mean() / pixels[0].numel()
    return rec + beta * kl, rec, kl


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled index batches; every batch full (the tail of each epoch's permutation is dropped)."""
    per_epoch = max(1, n // batch_size)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            yield perm[i * batch_size : (i + 1) * batch_size].tolist()


def train_autoencoder(cfg: AutoencoderConfig, *, progress: bool = True) -> AutoencoderResult:
    """Train, fit latent stats, save `{output_dir}/vae`. Deterministic for a fixed `train.seed` on one device."""
    if cfg.data.raw_dir is None:
        raise ValueError("data.raw_dir is not set: point it at the output folder of `flowtrain prepare`")
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_autoencoder_config(cfg), encoding="utf-8")
    device = torch.device(cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.train.seed)
    vae = build_vae(cfg.model).to(device)
    dataset = RawImageDataset(cfg.data.raw_dir, cfg.data.resolution, cache_decoded=cfg.data.cache_decoded)
    n_params = sum(p.numel() for p in vae.parameters())
    log.info("autoencoder: %.3fM parameters, %d images at %dpx", n_params / 1e6, len(dataset), cfg.data.resolution)

    result = AutoencoderResult(output_dir=out, vae_dir=out / "vae", step=0)
    tracker = open_tracking(cfg, out)
    try:
        _optimise(cfg, vae, dataset, tracker, result, progress)
        if cfg.stats.fit:
            _fit_stats(cfg, vae, dataset, result, progress)
            tracker.log_metrics(result.step, {"eval/reconstruction_l1": result.stats["reconstruction_l1"]})
        vae.eval()
        vae.to("cpu").save_pretrained(result.vae_dir)
    except BaseException:
        tracker.close("FAILED")
        raise
    finish_tracking(tracker, out, result.vae_dir, log_weights=cfg.tracking.log_weights)
    result.seconds = time.perf_counter() - t0
    log.info("saved %s", result.vae_dir)
    return result


def _optimise(
    cfg: AutoencoderConfig, vae: torch.nn.Module, dataset: Any, tracker: Any, result: AutoencoderResult, progress: bool
) -> None:
    """The optimisation loop; logs every `train.log_every` steps and fills result.losses / result.final."""
    device = next(vae.parameters()).device
    vae.train()
    named = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]  # names: optimizer.lr_scale regexes
    params = [p for _, p in named]
    optimizer = build_optimizer(named, cfg.optimizer, cfg.train.learning_rate)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.train.max_steps)
    index_batches = _batches(
        len(dataset), min(cfg.train.batch_size, len(dataset)), torch.Generator().manual_seed(cfg.train.seed)
    )
    # Index batches are drawn in this process (so the order does not depend on num_workers); workers decode.
    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_sampler=index_batches, num_workers=workers, persistent_workers=workers > 0)
    batches = iter(loader)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    bf16 = cfg.train.mixed_precision == "bf16"
    bar = tqdm(total=cfg.train.max_steps, desc="autoencoder", unit="step", disable=not progress, dynamic_ncols=True)
    acc = {"loss": 0.0, "rec": 0.0, "kl": 0.0}
    n_acc, t_last = 0, time.perf_counter()
    for step in range(cfg.train.max_steps):
        pixels = next(batches).to(device)
        beta = kl_beta(step, cfg.loss.kl_weight, cfg.loss.kl_warmup_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            posterior = vae.encode(pixels).latent_dist
            recon = vae.decode(posterior.sample(generator=noise_gen)).sample
        loss, rec, kl = autoencoder_loss(recon, pixels, posterior, beta, cfg.loss.reconstruction)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm) if cfg.train.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for k, v in (("loss", loss), ("rec", rec), ("kl", kl)):
            acc[k] += v.item()
        n_acc += 1
        bar.update(1)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            now = time.perf_counter()
            row = {k: v / n_acc for k, v in acc.items()}
            row.update(
                beta=beta,
                lr=scheduler.get_last_lr()[0],
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                s_per_step=(now - t_last) / n_acc,
            )
            tracker.log_metrics(done, row)
            if hasattr(scheduler, "observe"):  # lr_scheduler plateau, fed the logged loss as in `flowtrain train`
                scheduler.observe(row["loss"])
            result.losses[done], result.final = row["loss"], row
            bar.set_postfix(rec=f"{row['rec']:.4f}", kl=f"{row['kl']:.3f}")
            acc, n_acc, t_last = dict.fromkeys(acc, 0.0), 0, now
        result.step = done
    bar.close()


def _fit_stats(
    cfg: AutoencoderConfig, vae: torch.nn.Module, dataset: Any, result: AutoencoderResult, progress: bool
) -> None:
    """Set vae.bn's running stats from the data; summary into result.stats and `{output_dir}/latent_stats.json`."""
    stats = fit_latent_stats(
        vae,
        dataset,
        batch_size=cfg.stats.batch_size,
        max_images=cfg.stats.max_images,
        device=next(vae.parameters()).device,
        progress=progress,
    )
    std = torch.sqrt(stats.var + cfg.model.batch_norm_eps)
    result.stats = {
        "images": stats.count,
        "reconstruction_l1": stats.reconstruction_l1,
        "latent_mean": stats.mean.tolist(),
        "latent_std": std.tolist(),
    }
    (Path(cfg.output_dir) / "latent_stats.json").write_text(json.dumps(result.stats, indent=2))
    log.info("latent stats over %d images; reconstruction L1 %.4f", stats.count, stats.reconstruction_l1)
