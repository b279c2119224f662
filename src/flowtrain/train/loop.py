"""`flowtrain train`: the one explicit training loop.

config → cache dataset → DataLoader → (x0, σ, ε) → adapter.predict → loss → backward (accumulate) → clip →
optimizer/scheduler step → metrics → checkpoint. Model specifics stay in the adapter; everything random in a
step comes from a generator seeded by (seed, step, micro, rank), so resume is exact.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from flowtrain.config import FlowtrainConfig, config_to_flat_dict, save_config
from flowtrain.data.cache import CacheDataset, ResumableSampler, collate
from flowtrain.losses import build_loss
from flowtrain.models import get_adapter
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.metrics import JsonlMetrics
from flowtrain.train.optim import build_lr_scheduler, build_optimizer
from flowtrain.train.setup import build_transformer, load_trainable_state, trainable_state
from flowtrain.train.step import make_inputs, step_loss, step_seed

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # logged mean loss by step (this process's view)
    transformer: torch.nn.Module | None = None  # unwrapped, trained


def essentials(cfg: FlowtrainConfig, fingerprint: dict) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming it."""
    return {
        "family": cfg.model.family,
        "pretrained": cfg.model.pretrained,
        "dit": cfg.model.dit,
        "train_mode": cfg.train_mode,
        "lora": [cfg.lora.rank, cfg.lora.effective_alpha, cfg.lora.targets] if cfg.train_mode == "lora" else None,
        "cache_fingerprint": fingerprint.get("id"),
    }


def check_cache(cfg: FlowtrainConfig, manifest: dict, transformer: torch.nn.Module) -> None:
    """The cache must have been made for this model: encoder layers, sequence length, and tensor widths."""
    fp, where = manifest["fingerprint"], Path(cfg.dataset.cache_dir) / "manifest.json"
    if fp["family"] != cfg.model.family:
        raise ValueError(f"{where}: cache is for model family {fp['family']!r}, config says {cfg.model.family!r}")
    if (
        list(fp["text_encoder_layers"]) != list(cfg.model.text_encoder_layers)
        or fp["max_sequence_length"] != cfg.model.max_sequence_length
    ):
        raise ValueError(
            f"{where}: cache was made with text_encoder_layers={fp['text_encoder_layers']}, max_sequence_length="
            f"{fp['max_sequence_length']}; the config has {cfg.model.text_encoder_layers}, "
            f"{cfg.model.max_sequence_length}. Re-run precompute with the config's settings or change the config."
        )
    text_dim, latent_ch = manifest["text_shape"][-1], manifest["latent_shape"][0] // 2 * 4
    tc = transformer.config
    if tc.joint_attention_dim != text_dim or tc.in_channels != latent_ch:
        raise ValueError(
            f"{where}: cached text width {text_dim} / latent channels {latent_ch} do not fit the transformer "
            f"(joint_attention_dim={tc.joint_attention_dim}, in_channels={tc.in_channels}): wrong model for this cache"
        )
    if fp["model"] != cfg.model.pretrained:
        log.warning("cache was made from %r, training uses %r", fp["model"], cfg.model.pretrained)


def train(cfg: FlowtrainConfig, *, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Run training to `cfg.train.max_steps`, resuming from `resume` ('latest' or a checkpoint path) if given."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cfg.dataset.cache_dir is None:
        raise ValueError("dataset.cache_dir is not set: pass --precomputed_data_dir or set it in the config")
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    set_seed(cfg.train.seed)  # model init (LoRA A matrices) identical on every rank and every run

    dataset = CacheDataset(cfg.dataset.cache_dir)
    adapter = get_adapter(cfg.model.family)
    transformer, lora_cfg = build_transformer(cfg, adapter)
    check_cache(cfg, dataset.manifest, transformer)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optimizer, cfg.train.learning_rate)
    # The scheduler is stepped by us once per optimizer step, so it is not handed to accelerate (which would
    # step it once per process).
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.train.max_steps)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    device = accelerator.device

    start_step, epoch, batch_pos, restored = 0, 0, 0, None
    resume_path = ckpt.resolve_resume(out, resume)
    if resume_path is not None:
        restored = ckpt.load_checkpoint(resume_path, rank=rank)
        _check_resume(restored["state"], cfg, dataset.manifest["fingerprint"], resume_path)
        load_trainable_state(accelerator.unwrap_model(model), restored["trainable"])
        optimizer.load_state_dict(restored["optimizer"])
        lr_scheduler.load_state_dict(restored["lr_scheduler"])
        for group in optimizer.param_groups:  # lr may be changed on resume; the schedule then follows it
            group["initial_lr"] = cfg.train.learning_rate
        start_step = restored["state"]["step"]
        epoch, batch_pos = restored["state"]["data"]["epoch"], restored["state"]["data"]["batch"]
        if is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, start_step, epoch, batch_pos)
    elif resume == "latest" and is_main:
        log.info("no checkpoint in %s yet: starting from scratch", out)

    sampler = ResumableSampler(
        len(dataset),
        cfg.train.batch_size,
        seed=cfg.train.seed,
        shuffle=cfg.dataset.shuffle,
        rank=rank,
        world_size=world,
        start_epoch=epoch,
        start_batch=batch_pos,
    )
    workers = cfg.dataset.num_workers
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=cfg.dataset.pin_memory and device.type == "cuda",
        prefetch_factor=cfg.dataset.prefetch_factor if workers else None,
        persistent_workers=workers > 0,
    )
    batches = iter(loader)
    latent_stats = (
        torch.tensor(dataset.manifest["latent_bn_mean"]),
        torch.tensor(dataset.manifest["latent_bn_std"]),
    )
    empty = dataset.empty_prompt_embeds() if cfg.train.caption_dropout > 0 else None
    loss_fn = build_loss(cfg.loss.name, **_loss_kwargs(cfg))
    metrics = (
        JsonlMetrics(out / "logs" / "metrics.jsonl", resume_step=start_step if restored else None) if is_main else None
    )
    if restored is not None:  # last, so nothing above can consume the restored streams
        ckpt.restore_rng_state(restored["rng_stem"])
    if is_main:
        n_params = sum(p.numel() for p in params)
        log.info(
            "training %s (%s, %.3fM trainable) for %d steps",
            cfg.model.family,
            cfg.train_mode,
            n_params / 1e6,
            cfg.train.max_steps,
        )
        log.debug("config: %s", config_to_flat_dict(cfg))

    result = TrainResult(output_dir=out, step=start_step)
    ga, consumed = cfg.train.gradient_accumulation_steps, 0
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (progress and is_main),
        dynamic_ncols=True,
    )
    t_last, loss_acc, steps_acc = time.perf_counter(), torch.zeros((), device=device), 0
    for step in range(start_step, cfg.train.max_steps):
        model.train()
        for micro in range(ga):
            batch = next(batches)
            consumed += 1
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, micro, rank))
            inputs = make_inputs(batch, cfg, adapter, latent_stats, empty, gen, device)
            sync = contextlib.nullcontext() if micro == ga - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss, _ = step_loss(model, adapter, inputs, loss_fn)
                accelerator.backward(loss / ga)
            loss_acc += loss.detach() / ga
        grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm) if cfg.train.max_grad_norm else None
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done, steps_acc = step + 1, steps_acc + 1
        bar.update(1)

        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            # One host sync per logged step: the loss is accumulated on device in between.
            mean_loss = accelerator.reduce(loss_acc / steps_acc, reduction="mean").item()
            now = time.perf_counter()
            s_per_step = (now - t_last) / steps_acc
            row = {
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "s_per_step": s_per_step,
                "samples_per_s": cfg.train.batch_size * ga * world / s_per_step,
                "epoch": sampler.position_after(consumed)[0],
            }
            result.losses[done] = mean_loss
            if metrics is not None:
                metrics.log(done, row)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{row['lr']:.2e}")
            t_last, loss_acc, steps_acc = now, torch.zeros((), device=device), 0

        every = cfg.checkpoint.every_steps
        if (every and done % every == 0) or done == cfg.train.max_steps:
            ep, bp = sampler.position_after(consumed)
            _save(accelerator, cfg, model, optimizer, lr_scheduler, adapter, lora_cfg, done, ep, bp, dataset, out)
        result.step = done
    bar.close()
    if metrics is not None:
        metrics.close()

    unwrapped = accelerator.unwrap_model(model)
    if is_main:
        _export(cfg, adapter, unwrapped, lora_cfg, out)
    accelerator.wait_for_everyone()
    result.transformer = unwrapped
    accelerator.end_training()
    return result


def _loss_kwargs(cfg: FlowtrainConfig) -> dict[str, Any]:
    if cfg.loss.name == "flow_matching":
        return {
            "base": cfg.loss.base,
            "weighting": cfg.loss.weighting,
            "huber_delta": cfg.loss.huber_delta,
            **cfg.loss.kwargs,
        }
    return dict(cfg.loss.kwargs)


def _check_resume(state: dict, cfg: FlowtrainConfig, fingerprint: dict, path: Path) -> None:
    old, new = state["essentials"], essentials(cfg, fingerprint)
    old = {k: (list(v) if isinstance(v, tuple) else v) for k, v in old.items()}
    new = {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.items()}
    diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
    if diff:
        lines = "\n".join(f"  {k}: checkpoint {a!r} ≠ config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"cannot resume from {path}: the run's essential settings changed:\n{lines}\n"
            "Start a new output_dir, or restore these settings."
        )
    for key in ("learning_rate", "max_steps"):
        if state["train"].get(key) != getattr(cfg.train, key):
            log.info("resume: train.%s changed %s → %s", key, state["train"].get(key), getattr(cfg.train, key))


def _save(accelerator, cfg, model, optimizer, lr_scheduler, adapter, lora_cfg, step, epoch, batch, dataset, out):
    unwrapped = accelerator.unwrap_model(model)
    state = {
        "data": {"epoch": epoch, "batch": batch, "seed": cfg.train.seed},
        "essentials": essentials(cfg, dataset.manifest["fingerprint"]),
        "train": {"learning_rate": cfg.train.learning_rate, "max_steps": cfg.train.max_steps},
        "world_size": accelerator.num_processes,
    }
    extra = (lambda d: adapter.save_lora(d, unwrapped, lora_cfg)) if lora_cfg is not None else None
    ckpt.write_checkpoint(
        out,
        step,
        trainable=trainable_state(unwrapped),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        state=state,
        rank=accelerator.process_index,
        is_main=accelerator.is_main_process,
        barrier=accelerator.wait_for_everyone,
        extra_files=extra,
    )
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(out, cfg.checkpoint.keep_last)


def _export(cfg: FlowtrainConfig, adapter: Any, transformer: torch.nn.Module, lora_cfg: Any, out: Path) -> None:
    """Final artefacts: the LoRA file (diffusers format) or a `transformer/` diffusers folder."""
    if lora_cfg is not None:
        path = adapter.save_lora(out, transformer, lora_cfg)
    else:
        path = out / "transformer"
        transformer.save_pretrained(path)
    log.info("saved %s", path)
