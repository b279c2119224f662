"""`flowtrain autoencoder`: train a model family's VAE on prepared images, fit its latent statistics, save it.

    raw shards → (3, R, R) in [-1, 1] → encode → z ~ q(z|x) → decode → x̂
    → rec + w_p·perceptual + β(step)·KL [+ w_g·λ·G(D(x̂))]  → AdamW (+ clip, LR schedule) → EMA
    [→ patch discriminator step: L_D (+ R1)]  (step.py: the two halves touch disjoint weights)
    → … → family's latent-statistics fit → `{output_dir}/vae` (save_pretrained)

Run folder (`output_dir`): config.yaml, logs/metrics.jsonl (+ MLflow, per `tracking:`), graphs/ (loss.png,
autoencoder_losses.png: one panel per term), samples/step-XXXXXX.png (input | recon(mode) | recon(sample)),
checkpoint-N/ (exact resume: weights, optimizer, scheduler, EMA, discriminator + its optimizer, RNG streams and the
data position), vae/ (the EMA weights when `ema.enabled`; the trained ones then in vae_trained/), latent_stats.json.

Exact resume: the data order is a function of `train.seed` and the step (index batches are replayed, nothing is
decoded), the posterior-sample generator's state is saved, so a resumed run logs the same losses and ends with the
same weights, bitwise, as one never interrupted (tests/autoencoder/test_resume.py, under kill -9).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from flowtrain.autoencoder.config import AutoencoderConfig, dump_autoencoder_config
from flowtrain.autoencoder.data import RawImageDataset
from flowtrain.autoencoder.losses import kl_beta
from flowtrain.autoencoder.step import autoencoder_half, discriminator_half
from flowtrain.track import finish_tracking, open_tracking
from flowtrain.train.checkpoint import (
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    restore_rng_state,
    write_checkpoint,
)
from flowtrain.train.ema import EMA
from flowtrain.train.optim import build_lr_scheduler, build_optimizer

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "rec", "kl", "kl_raw", "perceptual", "g", "g_weight", "d", "r1", "logits_real", "logits_fake")


@dataclass
class AutoencoderResult:
    """What `train_autoencoder` returns (stable: the pipelines' autoencoder stage reads it)."""

    output_dir: Path
    vae_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # logged total loss by step (this process's run)
    final: dict[str, float] = field(default_factory=dict)  # last logged row (loss, rec, kl, beta, g, d, ...)
    stats: dict[str, Any] = field(default_factory=dict)  # the family's latent-statistics summary (when fitted)
    seconds: float = 0.0
    resumed_from: Path | None = None


@dataclass
class _Run:
    """Everything the loop updates, in one place (what a checkpoint saves)."""

    vae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    noise: torch.Generator
    ema: EMA | None = None
    disc: torch.nn.Module | None = None
    d_optimizer: torch.optim.Optimizer | None = None
    perceptual: torch.nn.Module | None = None


def train_autoencoder(
    config: AutoencoderConfig, *, run_dir: str | Path | None = None, resume: str | Path | None = None,
    progress: bool = True,
) -> AutoencoderResult:  # fmt: skip
    """Train the autoencoder `config` describes; the one public entry point (its signature stays stable).

    config   a validated `AutoencoderConfig` (`load_autoencoder_config(path, overrides)`).
    run_dir  the run folder; None: `config.output_dir`. Everything the run writes goes under it.
    resume   None (fresh run), "latest" (the newest complete checkpoint in run_dir; a fresh run when there is none)
             or a checkpoint folder. The resumed run continues exactly (same data order, noise and losses).
    progress a progress bar with the one-line loss summary (rec, KL, G, D, perceptual, s/batch).

    Returns an `AutoencoderResult` (`vae_dir`: the saved diffusers VAE folder). Deterministic for a fixed
    `train.seed` on one device.
    """
    cfg = config if run_dir is None else config.model_copy(update={"output_dir": str(run_dir)})
    if cfg.data.raw_dir is None:
        raise ValueError("data.raw_dir is not set: point it at the output folder of `flowtrain prepare`")
    from flowtrain.models import autoencoder_family

    family = autoencoder_family(cfg.family)
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_resume(out, str(resume)) if resume is not None else None
    restored = load_checkpoint(ckpt) if ckpt is not None else None
    if restored is not None:
        _check_resume(restored["state"], cfg, ckpt)
    (out / "config.yaml").write_text(dump_autoencoder_config(cfg), encoding="utf-8")
    device = torch.device(cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.train.seed)
    vae = family.build_autoencoder(cfg.model).to(device)
    dataset = RawImageDataset(cfg.data.raw_dir, cfg.data.resolution, cache_decoded=cfg.data.cache_decoded)
    n_params = sum(p.numel() for p in vae.parameters())
    log.info("autoencoder (%s): %.3fM parameters, %d images at %dpx", cfg.family, n_params / 1e6, len(dataset),
             cfg.data.resolution)  # fmt: skip

    result = AutoencoderResult(output_dir=out, vae_dir=out / "vae", step=0, resumed_from=ckpt)
    run = _build(cfg, vae, device)
    start, window = 0, None
    if restored is not None:
        start, window = _restore(run, restored, device)
        restore_rng_state(restored["rng_stem"])  # after every module is built: building draws from it
        log.info("resumed from %s at step %d", ckpt, start)
    result.step = start
    # Asked to resume but no checkpoint yet: a fresh start, whose log replaces what a killed first attempt wrote.
    tracker = open_tracking(cfg, out, resume_step=start if resume is not None else None)
    try:
        _optimise(cfg, run, dataset, tracker, result, progress, start, window)
        _save_samples(cfg, run, dataset, result.step, final=True)
        final_vae = _final_weights(cfg, run, out)
        result.stats = family.finish_autoencoder(final_vae, dataset, cfg, device=device, progress=progress)
        if result.stats:
            (out / "latent_stats.json").write_text(json.dumps(result.stats, indent=2))
            if "reconstruction_l1" in result.stats:
                tracker.log_metrics(result.step, {"eval/reconstruction_l1": result.stats["reconstruction_l1"]})
        final_vae.eval()
        final_vae.to("cpu").save_pretrained(result.vae_dir)
        _plot_losses(out)
    except BaseException:
        tracker.close("FAILED")
        raise
    finish_tracking(tracker, out, result.vae_dir, log_weights=cfg.tracking.log_weights)
    result.seconds = time.perf_counter() - t0
    log.info("saved %s", result.vae_dir)
    return result


def _build(cfg: AutoencoderConfig, vae: torch.nn.Module, device: torch.device) -> _Run:
    """Optimizer, schedule, noise stream, and (when on) EMA, discriminator + its optimizer, perceptual backbone.
    Built in a fixed order after the VAE, so a fresh and a resumed run draw the same initial weights."""
    named = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]  # names: optimizer.lr_scale regexes
    optimizer = build_optimizer(named, cfg.optimizer, cfg.train.learning_rate)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.train.max_steps)
    noise = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    run = _Run(vae=vae, optimizer=optimizer, scheduler=scheduler, noise=noise)
    if cfg.gan.enabled:
        from flowtrain.autoencoder.discriminator import PatchDiscriminator

        run.disc = PatchDiscriminator(channels=cfg.gan.discriminator_channels, layers=cfg.gan.discriminator_layers).to(
            device
        )
        # Adam as in VQGAN / LDM (betas 0.5, 0.9): the discriminator's own, simpler optimizer on purpose.
        run.d_optimizer = torch.optim.Adam(
            run.disc.parameters(), lr=cfg.gan.learning_rate or cfg.train.learning_rate, betas=cfg.gan.betas
        )
    if cfg.perceptual.weight > 0:
        from flowtrain.autoencoder.perceptual import PerceptualDistance

        run.perceptual = PerceptualDistance(cfg.perceptual.model, cfg.perceptual.layers, cfg.perceptual.resolution)
        run.perceptual.to(device)
    if cfg.ema.enabled:
        run.ema = EMA.from_config(cfg.ema, vae)
    return run


def _batches(n: int, batch_size: int, seed: int):
    """Endless shuffled index batches; every batch full (the tail of each epoch's permutation is dropped).
    A pure function of (n, batch_size, seed): a resumed run skips the batches already done (indices only)."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            yield perm[i * batch_size : (i + 1) * batch_size].tolist()


def _optimise(
    cfg: AutoencoderConfig,
    run: _Run,
    dataset: Any,
    tracker: Any,
    result: AutoencoderResult,
    progress: bool,
    start: int,
    window: dict[str, Any] | None,
) -> None:
    """The training loop from optimizer step `start`; logs every `train.log_every` steps, checkpoints every
    `checkpointing.every_steps`, samples every `samples.every_steps`; fills result.losses / result.final."""
    vae, device = run.vae, next(run.vae.parameters()).device
    vae.train()
    params = [p for p in vae.parameters() if p.requires_grad]
    batch_size = min(cfg.train.batch_size, len(dataset))
    # Index batches are drawn in this process (so the order does not depend on num_workers); workers decode.
    index_batches = itertools.islice(_batches(len(dataset), batch_size, cfg.train.seed), start, None)
    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_sampler=index_batches, num_workers=workers, persistent_workers=workers > 0)
    batches = iter(loader)
    bf16 = cfg.train.mixed_precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    bar = tqdm(total=cfg.train.max_steps, initial=start, desc="autoencoder", unit="step", disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    acc: dict[str, float] = dict((window or {}).get("acc", {}))
    n_acc = int((window or {}).get("n", 0))
    t_last = time.perf_counter()
    for step in range(start, cfg.train.max_steps):
        pixels = next(batches).to(device)
        beta = kl_beta(step, cfg.loss.kl_weight, cfg.loss.kl_warmup_steps)
        gan_on = run.disc is not None and step >= cfg.gan.start_step
        out = autoencoder_half(vae, pixels, cfg, beta=beta, gan_on=gan_on, noise=run.noise,
                               discriminator=run.disc, perceptual=run.perceptual, autocast=autocast)  # fmt: skip
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm) if cfg.train.max_grad_norm else None
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        terms = {"loss": out.loss, **out.terms}
        if gan_on:
            d_loss, d_terms = discriminator_half(run.disc, pixels, out.recon, cfg)
            d_loss.backward()
            run.d_optimizer.step()
            run.d_optimizer.zero_grad(set_to_none=True)
            terms.update(d_terms)
        if run.ema is not None:
            run.ema.update(step + 1)
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v.item()
        n_acc += 1
        bar.update(1)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            now = time.perf_counter()
            row = {k: v / n_acc for k, v in acc.items()}
            row.update(
                beta=beta,
                lr=run.scheduler.get_last_lr()[0],
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                s_per_step=(now - t_last) / n_acc,
            )
            tracker.log_metrics(done, row)
            if hasattr(run.scheduler, "observe"):  # lr_scheduler plateau, fed the logged loss as in `flowtrain train`
                run.scheduler.observe(row["loss"])
            result.losses[done], result.final = row["loss"], row
            bar.set_postfix_str(console_line(row), refresh=False)
            acc, n_acc, t_last = {}, 0, now
        result.step = done
        every = cfg.samples.every_steps
        if every and done % every == 0 and done < cfg.train.max_steps:
            _save_samples(cfg, run, dataset, done)
        every = cfg.checkpointing.every_steps
        if every and done % every == 0 and done < cfg.train.max_steps:
            _checkpoint(cfg, run, done, {"acc": acc, "n": n_acc})
    bar.close()


def console_line(row: dict[str, Any]) -> str:
    """The one-line summary: reconstruction, KL, G, D, perceptual (those the run has) and seconds per batch."""
    parts = [f"rec {row['rec']:.4f}", f"KL {row['kl']:.3g}"]
    for key, name in (("g", "G"), ("d", "D"), ("perceptual", "perc")):
        if key in row:
            parts.append(f"{name} {row[key]:.4f}")
    parts.append(f"{row['s_per_step']:.3f} s/batch")
    return "  ".join(parts)


# ---- checkpoints ----------------------------------------------------------------------------------------------------


def essentials(cfg: AutoencoderConfig) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming it."""
    return {
        "family": cfg.family,
        "model": cfg.model.model_dump(mode="json"),
        "resolution": cfg.data.resolution,
        "gan": cfg.gan.enabled,
        "ema": cfg.ema.enabled,
        "seed": cfg.train.seed,
        "batch_size": cfg.train.batch_size,
    }


def _check_resume(state: dict[str, Any], cfg: AutoencoderConfig, path: Path) -> None:
    old, new = state.get("essentials", {}), essentials(cfg)
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if diff:
        lines = "\n".join(f"  {k}: checkpoint {a!r} ≠ config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"cannot resume from {path}: the run's essential settings changed:\n{lines}\n"
            "Start a new output_dir, or restore these settings."
        )


def _checkpoint(cfg: AutoencoderConfig, run: _Run, step: int, window: dict[str, Any]) -> None:
    """checkpoint-{step}/ through the transformer's atomic writer (train/checkpoint.py); the discriminator, its
    optimizer and the noise stream go in as extra files."""

    def extra(tmp: Path) -> None:
        save_file({"noise": run.noise.get_state()}, str(tmp / "generators.safetensors"))
        if run.disc is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in run.disc.state_dict().items()},
                      str(tmp / "discriminator.safetensors"))  # fmt: skip
            torch.save(run.d_optimizer.state_dict(), tmp / "d_optimizer.pt")

    out = Path(cfg.output_dir)
    write_checkpoint(
        out,
        step,
        trainable=dict(run.vae.state_dict()),
        optimizer=run.optimizer,
        lr_scheduler=run.scheduler,
        state={"essentials": essentials(cfg), "window": window},
        extra_files=extra,
        ema=run.ema.state_dict() if run.ema is not None else None,
    )
    prune_checkpoints(out, cfg.checkpointing.keep_last)


def _restore(run: _Run, restored: dict[str, Any], device: torch.device) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint into the built run; returns (step, the partly accumulated log window)."""
    path = Path(restored["rng_stem"]).parent
    run.vae.load_state_dict({k: v.to(device) for k, v in restored["trainable"].items()})
    run.optimizer.load_state_dict(restored["optimizer"])
    run.scheduler.load_state_dict(restored["lr_scheduler"])
    run.noise.set_state(load_file(str(path / "generators.safetensors"))["noise"])
    if run.ema is not None:
        run.ema.load_state_dict(restored["ema"])
    if run.disc is not None:
        run.disc.load_state_dict(load_file(str(path / "discriminator.safetensors"), device=str(device)))
        run.d_optimizer.load_state_dict(torch.load(path / "d_optimizer.pt", weights_only=True))
    state = restored["state"]
    return int(state["step"]), state.get("window") or {}


def _final_weights(cfg: AutoencoderConfig, run: _Run, out: Path) -> torch.nn.Module:
    """The VAE to save as vae/: the EMA weights when the run keeps an EMA (the trained ones go to vae_trained/)."""
    if run.ema is None:
        return run.vae
    import copy

    run.vae.eval()
    copy.deepcopy(run.vae).to("cpu").save_pretrained(out / "vae_trained")
    with run.ema.swapped_in(run.vae):
        averaged = copy.deepcopy(run.vae)
    return averaged


# ---- samples and graphs ---------------------------------------------------------------------------------------------


def _save_samples(cfg: AutoencoderConfig, run: _Run, dataset: Any, step: int, *, final: bool = False) -> None:
    """samples/step-{step}.png from the first `samples.count` images (every N steps, and once at the end)."""
    if not cfg.samples.every_steps:
        return
    from flowtrain.autoencoder.samples import reconstruction_grid

    device = next(run.vae.parameters()).device
    pixels = torch.stack([dataset[i] for i in range(min(cfg.samples.count, len(dataset)))]).to(device)
    path = Path(cfg.output_dir) / "samples" / f"step-{step:06d}.png"
    reconstruction_grid(run.vae, pixels, path, seed=cfg.train.seed, scale=cfg.samples.scale)


def _plot_losses(out: Path) -> None:
    from flowtrain.autoencoder.plots import plot_losses

    try:
        plot_losses(out)
    except Exception as e:  # graphs are a convenience; never fail a finished training over them
        log.warning("could not write the autoencoder loss graphs: %s", e)
