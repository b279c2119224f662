"""`flowtrain train`: the one explicit training loop.

config → cache dataset → DataLoader → (x0, σ, ε) → adapter.predict → loss → backward (accumulate) → clip →
optimizer/scheduler step → metrics → checkpoint. Model specifics stay in the adapter; everything random in a
step comes from a generator seeded by (seed, step, micro, rank), so resume is exact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowtrain.config import FlowtrainConfig, config_to_flat_dict, save_config
from flowtrain.data.cache import CacheDataset, ResumableSampler, collate
from flowtrain.losses import loss_from_config
from flowtrain.models import get_adapter
from flowtrain.track import check_backends, finish_tracking, open_tracking
from flowtrain.track.stats import TrainMeter
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.control import NonFiniteGuard, SaveClock, StopSignals, agree, nonfinite_flag
from flowtrain.train.ema import ema_for_run
from flowtrain.train.errors import CheckpointWriteError
from flowtrain.train.optim import build_lr_scheduler, build_optimizer
from flowtrain.train.perf import batch_iterator, build_loader, close_batches, optimizer_step_fn, use_prefetch_thread
from flowtrain.train.resume import apply_changed_schedule, check_resume, essentials, resume_position
from flowtrain.train.setup import build_transformer, determinism, load_trainable_state, trainable_state
from flowtrain.train.step import make_inputs, step_loss, step_seed
from flowtrain.train.validation import Validator

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # logged mean loss by step (this process's view)
    transformer: torch.nn.Module | None = None  # unwrapped, trained
    interrupted: str | None = None  # the signal (e.g. "SIGTERM") that stopped the run after a checkpoint, if any


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
    """Run training to `cfg.train.max_steps`, resuming from `resume` ('latest' or a checkpoint path) if given.

    A first SIGTERM / SIGINT finishes the current step, writes a checkpoint and returns with `interrupted` set (the
    CLI exits with EXIT_INTERRUPTED); a second one aborts at once. Raises `NonFiniteLossError` /
    `CheckpointWriteError` (see `flowtrain.train.errors`) when the run cannot go on; the last checkpoint is intact.
    """
    with StopSignals() as stop, determinism(cfg.train.deterministic), contextlib.ExitStack() as cleanup:
        return _train(cfg, resume, progress, stop, cleanup)


def _train(
    cfg: FlowtrainConfig, resume: str | None, progress: bool, stop: StopSignals, cleanup: contextlib.ExitStack
) -> TrainResult:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    if cfg.dataset.cache_dir is None:
        raise ValueError("dataset.cache_dir is not set: pass --precomputed_data_dir or set it in the config")
    check_backends(cfg.tracking.report_to)  # a missing wandb / tensorboard fails now, not after loading the model
    if cfg.train.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        # accelerate runs fp16 as plain fp32 on CPU (no autocast, no GradScaler), so a float16 base would meet fp32
        # activations and fail in its first matmul. Checked before `Accelerator(...)`, which fixes the process's
        # mixed precision for good: a retry with bf16 in the same process must still work.
        raise ValueError(
            "train.mixed_precision=fp16 (also what `auto` picks for model.dtype=float16) needs a GPU; this run is on "
            "CPU. Use model.dtype=bfloat16 with train.mixed_precision bf16 or auto, or model.dtype=float32."
        )
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
    optimizer = build_optimizer(transformer.named_parameters(), cfg.optimizer, cfg.train.learning_rate)
    # The scheduler is stepped by us once per optimizer step, so it is not handed to accelerate (which would
    # step it once per process).
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.train.max_steps)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    step_optimizer = optimizer_step_fn(optimizer, accelerator)
    device = accelerator.device
    global_batch = cfg.train.batch_size * world

    start_step, epoch, batch_pos, shuffle_seed, restored = 0, 0, 0, cfg.train.seed, None
    resume_path = ckpt.resolve_resume(out, resume)
    if resume_path is not None:
        restored = ckpt.load_checkpoint(resume_path, rank=rank)
        state = restored["state"]
        check_resume(state, cfg, dataset.manifest["fingerprint"], resume_path)
        load_trainable_state(accelerator.unwrap_model(model), restored["trainable"])
        optimizer.load_state_dict(restored["optimizer"])
        lr_scheduler.load_state_dict(restored["lr_scheduler"])
        if restored["scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(restored["scaler"])
        apply_changed_schedule(state, cfg, optimizer, lr_scheduler)
        start_step = state["step"]
        epoch, batch_pos, shuffle_seed = resume_position(state, global_batch, len(dataset))
        if is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, start_step, epoch, batch_pos)
    elif resume == "latest" and is_main:
        log.info("no checkpoint in %s yet: starting from scratch", out)
    ema = ema_for_run(cfg, accelerator.unwrap_model(model), restored)  # None unless ema.enabled

    sampler = ResumableSampler(
        len(dataset),
        cfg.train.batch_size,
        seed=shuffle_seed,
        shuffle=cfg.dataset.shuffle,
        rank=rank,
        world_size=world,
        start_epoch=epoch,
        start_batch=batch_pos,
        **dataset.shuffle_blocks(cfg.dataset.shuffle_window),  # row groups read once an epoch (see data.cache)
    )
    d = cfg.dataset
    loader = build_loader(
        dataset,
        sampler,
        batch_size=cfg.train.batch_size,
        collate_fn=collate,
        device=device,
        num_workers=d.num_workers,
        pin_memory=d.pin_memory,
        prefetch_factor=d.prefetch_factor,
    )
    if cfg.dataset.class_cache_dir:  # DreamBooth: append as many class rows to every batch
        from flowtrain.data.prior import with_class_rows

        loader = with_class_rows(loader, cfg.dataset.class_cache_dir, sampler, dataset.manifest)
    prefetch = use_prefetch_thread(d.prefetch, d.num_workers, device)
    batches = batch_iterator(loader, prefetch=prefetch, depth=d.prefetch_factor)
    cleanup.callback(close_batches, batches)  # also when a step raises (e.g. out of memory); closing twice is fine
    latent_stats = (
        torch.tensor(dataset.manifest["latent_bn_mean"]),
        torch.tensor(dataset.manifest["latent_bn_std"]),
    )
    empty = dataset.empty_prompt_embeds() if cfg.train.caption_dropout > 0 else None
    loss_fn = loss_from_config(cfg, adapter=adapter, device=device)
    validator = Validator(cfg, adapter, out, resolution=dataset.manifest["fingerprint"].get("resolution"))
    tracker = open_tracking(cfg, out, resume_step=start_step if restored else None, is_main=is_main)
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
    # The logged loss is a mean over the steps since the last log; a checkpoint carries the partial sum, so a
    # resumed run logs exactly what an uninterrupted one would even when log_every and the save steps differ.
    loop_state = (restored or {}).get("loop") or {}
    meter = TrainMeter(device, samples_per_step=cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world)
    loss_acc = torch.tensor(loop_state.get("loss_acc", 0.0), device=device)
    steps_acc = loop_state.get("steps_acc", 0)
    counters = restored["state"].get("nonfinite", {}) if restored else {}
    guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_nonfinite_in_a_row, **counters)
    clock = SaveClock(cfg.checkpoint.every_minutes)
    # fp16: a GradScaler skips overflowing updates itself (and must see every step), so only the loss is checked.
    check_grads = accelerator.scaler is None
    halt: Exception | None = None
    ema_weights = ema.swap_factory(accelerator.unwrap_model(model)) if ema is not None else None
    with meter.paused():  # the base model's images, when validation.at_start
        validator.maybe_run(start_step, accelerator, model, tracker, start=True, weights=ema_weights)
    for step in range(start_step, cfg.train.max_steps):
        if not model.training:  # validation restores the mode itself; a full .train() walk costs ~0.5 ms a step
            model.train()
        step_acc, rows = torch.zeros((), device=device), []
        for micro in range(ga):
            batch = meter.next_batch(batches)
            consumed += 1
            rows += batch["index"].tolist()
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, micro, rank))
            inputs = make_inputs(batch, cfg, adapter, latent_stats, empty, gen, device)
            sync = contextlib.nullcontext() if micro == ga - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss, logs = step_loss(model, adapter, inputs, loss_fn)
                # Outside autocast (torch's advice; same numerics): leaving it frees autocast's cache of low-precision
                # weight copies, which would otherwise live through backward (~2 bytes a parameter, full fine-tune).
                accelerator.backward(loss / ga)
            step_acc += loss.detach() / ga
            meter.add(inputs.sigma, logs)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm) if cfg.train.max_grad_norm else None
        done = step + 1
        # One host sync per step, agreed by all processes: skip this update? stop? time for a save?
        bad, stop_now, time_due = agree(
            accelerator,
            [nonfinite_flag(step_acc, grad_norm if check_grads else None), stop.requested is not None, clock.due()],
        )
        halt = guard.update(bad, done, rows, lambda: _latest_name(out))
        if halt is not None:
            optimizer.zero_grad(set_to_none=True)
            break
        if not bad or not check_grads:
            step_optimizer()
        lr_scheduler.step()  # a skipped step still advances the schedule: lr stays a function of the step
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(done)
        if not bad:
            loss_acc, steps_acc = loss_acc + step_acc, steps_acc + 1
        meter.end_step(ok=not bad)
        bar.update(1)

        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            # The loss is accumulated on device between logged steps.
            mean = loss_acc / steps_acc if steps_acc else torch.full((), float("nan"), device=device)
            row = meter.row(
                mean,
                grad_norm,
                reduce=lambda t: accelerator.reduce(t, reduction="mean"),
                lr=lr_scheduler.get_last_lr()[0],
                epoch=sampler.position_after(consumed)[0],
            )
            row["nonfinite_skipped"] = guard.total
            result.losses[done] = row["loss"]
            if hasattr(lr_scheduler, "observe"):  # lr_scheduler plateau: on the (process-averaged) logged loss
                lr_scheduler.observe(row["loss"])
            tracker.log_metrics(done, row)
            bar.set_postfix_str(meter.postfix(row))
            loss_acc, steps_acc = torch.zeros((), device=device), 0

        every = cfg.checkpoint.every_steps
        if (every and done % every == 0) or time_due or stop_now or done == cfg.train.max_steps:
            ep, bp = sampler.position_after(consumed)
            try:
                _save(
                    accelerator, cfg, model, optimizer, lr_scheduler, adapter, lora_cfg, done, ep, bp, dataset, out,
                    guard=guard, loop={"loss_acc": loss_acc.item(), "steps_acc": steps_acc}, ema=ema,
                )  # fmt: skip
            except CheckpointWriteError as e:
                halt = e
                break
            clock.saved()
        result.step = done
        if stop_now:
            result.interrupted = stop.name or "signal"
            if is_main:
                log.warning(
                    "stopped by %s at step %d; checkpoint-%d written. Continue with --resume_from_checkpoint latest",
                    result.interrupted,
                    done,
                    done,
                )
            break
        with meter.paused():  # sampling time is not step time
            validator.maybe_run(done, accelerator, model, tracker, weights=ema_weights)
    bar.close()
    close_batches(batches)
    if halt is not None:
        tracker.close("FAILED")
        accelerator.end_training()
        raise halt

    unwrapped = accelerator.unwrap_model(model)
    weights = None
    if is_main and not result.interrupted:
        with ema.swapped_in(unwrapped) if ema is not None else contextlib.nullcontext():  # EMA weights, if on
            weights = _export(cfg, adapter, unwrapped, lora_cfg, out)
    # graphs/ + final artifacts; an interrupted run is KILLED in MLflow until a resume continues it
    finish_tracking(
        tracker,
        out,
        weights,
        log_weights=cfg.tracking.log_weights,
        graphs=cfg.tracking.graphs,
        status="KILLED" if result.interrupted else "FINISHED",
    )
    accelerator.wait_for_everyone()
    result.transformer = unwrapped
    accelerator.end_training()
    return result


def _latest_name(out: Path) -> str | None:
    ckpts = ckpt.list_checkpoints(out)
    return str(ckpts[-1][1]) if ckpts else None


def _agree_failed(accelerator: Any) -> Any:
    """`sync` for write_checkpoint: an all-reduce that doubles as the barrier between its phases."""
    if accelerator.num_processes == 1:
        return lambda failed: failed
    return lambda failed: agree(accelerator, [failed])[0]


def _save(
    accelerator, cfg, model, optimizer, lr_scheduler, adapter, lora_cfg, step, epoch, batch, dataset, out, guard, loop,
    ema=None,
):  # fmt: skip
    unwrapped = accelerator.unwrap_model(model)
    state = {
        "data": {"epoch": epoch, "batch": batch, "seed": cfg.train.seed},
        "essentials": essentials(cfg, dataset.manifest["fingerprint"]),
        "train": {"learning_rate": cfg.train.learning_rate, "max_steps": cfg.train.max_steps},
        "world_size": accelerator.num_processes,
        "global_batch": cfg.train.batch_size * accelerator.num_processes,
        "nonfinite": guard.state(),
    }
    extra = None
    if lora_cfg is not None:  # the checkpoint's LoRA file holds the EMA weights when EMA is on (like the export)

        def extra(d: Path) -> None:
            with ema.swapped_in(unwrapped) if ema is not None else contextlib.nullcontext():
                adapter.save_lora(d, unwrapped, lora_cfg)

    ckpt.write_checkpoint(
        out,
        step,
        trainable=trainable_state(unwrapped),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        state=state,
        rank=accelerator.process_index,
        is_main=accelerator.is_main_process,
        sync=_agree_failed(accelerator),
        extra_files=extra,
        scaler=accelerator.scaler,
        rank_state=loop,
        ema=ema.state_dict() if ema is not None else None,
    )
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(out, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)


def _export(cfg: FlowtrainConfig, adapter: Any, transformer: torch.nn.Module, lora_cfg: Any, out: Path) -> Path:
    """Final artefacts: the LoRA file (diffusers format) or a `transformer/` diffusers folder. Written under a
    temporary name and moved into place, so a kill mid-export never leaves a truncated file under the final name
    (the final checkpoint is complete by then; resuming from it exports again)."""
    tmp = out / ".export.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if lora_cfg is not None:
        name = adapter.save_lora(tmp, transformer, lora_cfg).name
    else:
        name = "transformer"
        transformer.save_pretrained(tmp / name)
    path = out / name
    if path.is_dir():  # a folder cannot be replaced atomically: move the old one aside first
        old = out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        (tmp / name).rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp / name, path)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s", path)
    return path
