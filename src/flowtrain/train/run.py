"""Building a training run: everything the loop needs, made from the config (and a checkpoint to resume from).

`build_run` does the work in an order that matters: the seed is set before the model (LoRA init) exists, the
caches are checked against the model before anything else is built, and the restored RNG streams are put back
last, so nothing built after them can consume them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from flowtrain.config import FlowtrainConfig, config_to_flat_dict, save_config
from flowtrain.data.bucket_sampler import BucketSampler, rows_by_bucket
from flowtrain.data.cache import CacheDataset, ResumableSampler
from flowtrain.data.loader import batch_iterator, build_loader, close_batches, use_prefetch_thread
from flowtrain.data.manifest import warnings_once
from flowtrain.data.prior import WithClassRows, check_class_cache, class_sampler
from flowtrain.losses import loss_from_config
from flowtrain.models import ModelFamily, get_family
from flowtrain.track import check_backends, open_tracking, start_tracking
from flowtrain.train import checkpoint as ckpt
from flowtrain.train import engines
from flowtrain.train.ema import EMA, ema_for_run
from flowtrain.train.engines import fsdp
from flowtrain.train.offload import install_block_swap
from flowtrain.train.optim import build_lr_scheduler, build_optimizer
from flowtrain.train.perf import hot_autocast, hot_backward, hot_clip, hot_optimizer
from flowtrain.train.resume import apply_changed_schedule, check_resume, resume_position, transformer_identity
from flowtrain.train.state import TrainState
from flowtrain.train.trainable import build_transformer, load_teacher, load_trainable_state
from flowtrain.train.validation import Validator

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One training run, built: the model and its optimizer (as accelerate prepared them), the data, the loss,
    and where the run starts."""

    cfg: FlowtrainConfig
    out: Path
    accelerator: Any
    family: ModelFamily
    model: torch.nn.Module  # accelerate-prepared (DDP-wrapped when distributed)
    lora_cfg: Any  # peft LoraConfig, or None for a full fine-tune
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: Any
    lr_scheduler: Any
    hot_optimizer: Any  # what each step calls step() / zero_grad() on (`perf.hot_optimizer`)
    backward: Any  # called with each micro-batch's loss (`perf.hot_backward`)
    clip_grad_norm: Any  # (params, max_norm) → the global grad norm before clipping (`perf.hot_clip`)
    autocast: Any  # () → the context each forward runs in (`perf.hot_autocast`)
    dataset: CacheDataset
    sampler: ResumableSampler | BucketSampler
    batches: Any  # iterator of batches (possibly behind a prefetch thread)
    norm: dict[str, torch.Tensor]  # the cache's latent statistics
    empty: dict[str, torch.Tensor] | None  # the empty prompt's conditioning, for caption dropout
    loss_fn: Any
    validator: Validator
    tracker: Any
    ema: EMA | None
    start_step: int
    transformer_id: dict[str, str]  # the trained transformer's identity (checkpoints record it for resume)
    restored: dict[str, Any] | None  # the checkpoint resumed from (checkpoint.load_checkpoint), if any
    restored_state: TrainState | None
    stage: Any = None  # the pipeline stage this run is (`train.stages.StageContext`), if any

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def build_run(cfg: FlowtrainConfig, resume: str | None, cleanup: contextlib.ExitStack, stage: Any = None) -> Run:
    """Build the run from `cfg`, resumed from `resume` ('latest' or a checkpoint path) if given. `cleanup` gets
    the callbacks that must run however the run ends (the batch prefetch thread). `stage`: a pipeline stage
    (`train.stages.StageContext`): earlier stages' weights and its freezing go in before the optimizer is made."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import parse_flag_from_env, set_seed

    if cfg.dataset.cache_dir is None:
        raise ValueError("dataset.cache_dir is not set: pass --precomputed_data_dir or set it in the config")
    check_backends(cfg.tracking.report_to)  # a missing wandb / tensorboard fails now, not after loading the model
    # The process group is made here, first, with the collective timeout and the engine's backend: the call
    # Accelerator() would make (it then shares this state). Its InitProcessGroupKwargs handler would drop a timeout
    # equal to its own default.
    PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
        timeout=timedelta(minutes=cfg.train.collective_timeout_minutes),
        **engines.process_group_kwargs(),
    )
    if cfg.train.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        # accelerate runs fp16 as plain fp32 on CPU (no autocast, no GradScaler), so a float16 base would meet fp32
        # activations and fail in its first matmul. Checked before `Accelerator(...)`, which fixes the process's
        # mixed precision for good: a retry with bf16 in the same process must still work.
        raise ValueError(
            "train.mixed_precision=fp16 (also what `auto` picks for model.dtype=float16) needs a GPU; this run is on "
            "CPU. Use model.dtype=bfloat16 with train.mixed_precision bf16 or auto, or model.dtype=float32."
        )
    fsdp.prepare_accelerator_state()  # an FSDP launch on CPU processes gets FSDP, not silently DDP
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    early_tracker = start_tracking(cfg, is_main=accelerator.is_main_process)  # MLflow imports while the model loads
    if early_tracker is not None:
        cleanup.callback(early_tracker.discard)  # building the run may fail before open_tracking
    set_seed(cfg.train.seed)  # model init (LoRA A matrices) identical on every rank and every run

    # The caches are checked against the model's files before the transformer loads (minutes for a large one),
    # and once more against the loaded transformer's input widths.
    family, allow = get_family(cfg.model.family), cfg.dataset.allow_other_weights
    caches = [CacheDataset(cfg.dataset.cache_dir)]
    if cfg.dataset.class_cache_dir:  # DreamBooth: as many class rows appended to every batch
        caches.append(CacheDataset(cfg.dataset.class_cache_dir))
        check_class_cache(caches[0].manifest, caches[1].manifest, cfg.dataset.class_cache_dir)
    with warnings_once():
        for cache in caches:
            family.check_cache(cfg.model, cache.manifest, allow_other_weights=allow)
        transformer, lora_cfg = build_transformer(cfg, family, None if stage is None else stage.prepare_base)
        for cache in caches:
            family.check_cache(cfg.model, cache.manifest, transformer, allow_other_weights=allow)
    if stage is not None:
        stage.prepare_model(transformer)
    dataset, class_dataset = caches[0], (caches[1] if len(caches) > 1 else None)

    transformer_id = transformer_identity(cfg.model)  # what resume compares, by content (train.resume)
    optimizer = build_optimizer(transformer.named_parameters(), cfg.optimizer, cfg.train.learning_rate)
    # The scheduler is stepped by us once per optimizer step, so it is not handed to accelerate (which would
    # step it once per process).
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.train.max_steps)
    engines.configure(accelerator, cfg)
    # Block swap places the model itself (the swapped weights must never pass through the device): not accelerate.
    swap = install_block_swap(transformer, cfg.train.blocks_to_swap, accelerator) if cfg.train.blocks_to_swap else None
    placement = None if swap is None else [False, None]  # None: accelerate's default, unchanged without block swap
    model, optimizer = accelerator.prepare(transformer, optimizer, device_placement=placement)
    # Taken after prepare: FSDP replaces the parameters by sharded ones (DDP keeps them).
    params = [p for p in engines.unwrap(accelerator, model).parameters() if p.requires_grad]
    global_batch = cfg.train.batch_size * world

    start_step, epoch, batch_pos, shuffle_seed, restored, state = 0, 0, 0, cfg.train.seed, None, None
    resume_path = ckpt.resolve_resume(out, resume)
    if resume_path is not None:
        restored = ckpt.load_checkpoint(resume_path, rank=rank, world_size=world)
        state = TrainState.from_json(restored["state"])
        check_resume(state, cfg, dataset.manifest.fingerprint["id"], transformer_id, resume_path)
        if engines.engine_checkpoint(accelerator):  # DeepSpeed: the engine reads its own shards
            engines.load_shards(accelerator, model, resume_path, lora=lora_cfg is not None)
        elif restored["sharded"]:  # FSDP: every process reads its own shards
            restored["ema"] = fsdp.load_shards(resume_path, engines.unwrap(accelerator, model), optimizer)
        elif restored["trainable"] is None or restored["optimizer"] is None:
            raise ValueError(
                f"{resume_path} holds a sharding engine's checkpoint (no trainable.safetensors / optimizer.pt): "
                "resume it with the launch config (engine) that wrote it"
            )
        else:
            fsdp.check_unsharded_resume(accelerator, resume_path)
            load_trainable_state(engines.unwrap(accelerator, model), restored["trainable"])
            optimizer.load_state_dict(restored["optimizer"])
        lr_scheduler.load_state_dict(restored["lr_scheduler"])
        if restored["scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(restored["scaler"])
        apply_changed_schedule(state, cfg, optimizer, lr_scheduler)
        start_step = state.step
        epoch, batch_pos, shuffle_seed = resume_position(state, global_batch, len(dataset))
        if accelerator.is_main_process:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, start_step, epoch, batch_pos)
    elif resume == "latest" and accelerator.is_main_process:
        log.info("no checkpoint in %s yet: starting from scratch", out)
    if stage is not None and resume_path is None:  # a resumed stage has its own optimizer state
        stage.prepare_optimizer(optimizer)
    with engines.full_parameters(accelerator, model, trainable_only=True):  # ZeRO-3: the EMA starts from whole weights
        ema = ema_for_run(cfg, engines.unwrap(accelerator, model), restored)  # None unless ema.enabled

    position = {"seed": shuffle_seed, "shuffle": cfg.dataset.shuffle, "rank": rank, "world_size": world,
                "start_epoch": epoch, "start_batch": batch_pos}  # fmt: skip
    buckets = rows_by_bucket(dataset.manifest)  # None: square (or one bucket), read as it always was
    if buckets is not None:  # aspect-ratio buckets or clip lengths: each batch from one (data.bucket_sampler)
        if class_dataset is not None:
            raise ValueError(
                f"{cfg.dataset.cache_dir} holds latents of several shapes (aspect-ratio buckets, or images next to "
                "video clips); dataset.class_cache_dir (prior preservation) needs an instance cache of one shape: "
                "precompute it without --buckets (or with dataset.video.images: false)"
            )
        sampler = BucketSampler(buckets, cfg.train.batch_size, **position)
    else:
        sampler = ResumableSampler(
            len(dataset),
            cfg.train.batch_size,
            **position,
            **dataset.shuffle_blocks(cfg.dataset.shuffle_window),  # row groups read once an epoch (see data.cache)
        )
    d = cfg.dataset

    def loader_for(data: CacheDataset, rows: ResumableSampler) -> Any:
        collate = data.collate_fixed_length() if cfg.train.compile else data.collate  # compiled: one shape
        return build_loader(
            data, rows, batch_size=cfg.train.batch_size, collate_fn=collate, device=accelerator.device,
            num_workers=d.num_workers, pin_memory=d.pin_memory, prefetch_factor=d.prefetch_factor,
        )  # fmt: skip

    loader = loader_for(dataset, sampler)
    if class_dataset is not None:
        loader = WithClassRows(loader, loader_for(class_dataset, class_sampler(sampler, len(class_dataset))))
    prefetch = use_prefetch_thread(d.prefetch, d.num_workers, accelerator.device)
    batches = batch_iterator(loader, prefetch=prefetch, depth=d.prefetch_factor)
    cleanup.callback(close_batches, batches)  # also when a step raises (e.g. out of memory); closing twice is fine

    norm = dataset.latent_norm
    empty = family.conditioning(dataset.empty_batch(), cfg.model) if cfg.train.caption_dropout > 0 else None
    teacher = load_teacher(cfg, family, accelerator.device) if cfg.loss.teacher else None
    loss_fn = loss_from_config(cfg, family=family, teacher=teacher)
    validator = Validator(cfg, family, out, resolution=dataset.manifest.resolution)
    if stage is not None:  # a pipeline stage's sample names carry the stage and the epoch
        validator.name_prefix = stage.sample_prefix(sampler, start_step, cfg.train.gradient_accumulation_steps)
    tracker = open_tracking(cfg, out, resume_step=start_step if restored else None, is_main=accelerator.is_main_process,
                            started=early_tracker)  # fmt: skip
    cleanup.callback(tracker.close, "FAILED")  # a run that raises ends FAILED now (no-op after a normal finish)
    if restored is not None:  # last, so nothing above can consume the restored streams
        ckpt.restore_rng_state(restored["rng_stem"])
    if accelerator.is_main_process:
        n_params = sum(p.numel() for p in params)
        log.info("training %s (%s, %.3fM trainable) for %d steps", cfg.model.family, cfg.train_mode, n_params / 1e6,
                 cfg.train.max_steps)  # fmt: skip
        log.debug("config: %s", config_to_flat_dict(cfg))
    return Run(
        cfg=cfg, out=out, accelerator=accelerator, family=family, model=model, lora_cfg=lora_cfg, params=params,
        optimizer=optimizer, lr_scheduler=lr_scheduler, hot_optimizer=hot_optimizer(optimizer, accelerator),
        backward=hot_backward(accelerator), clip_grad_norm=hot_clip(accelerator), autocast=hot_autocast(accelerator),
        dataset=dataset, sampler=sampler, batches=batches, norm=norm, empty=empty, loss_fn=loss_fn,
        validator=validator, tracker=tracker, ema=ema, start_step=start_step, transformer_id=transformer_id,
        restored=restored,
        restored_state=state, stage=stage,
    )  # fmt: skip
