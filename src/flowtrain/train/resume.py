"""Resuming a run: what must not change, what may, and where in the data to go on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flowtrain.config import FlowtrainConfig
from flowtrain.train.state import TrainState

log = logging.getLogger(__name__)


def transformer_identity(model: Any) -> dict[str, str]:
    """What identifies the transformer a run trains, by content (a digest of its config and weights files, as the
    cache check identifies encoders): the pipeline's own, or `model.dit`'s. A moved or symlinked model folder is the
    same model; other weights at the same path are not. The path when no local files can be read."""
    from flowtrain.models.common import component_identity, weights_digest

    if model.dit is None:
        found = component_identity(model.pretrained, ["transformer"], model.revision)
        return found or {"path": model.pretrained}
    dit = Path(model.dit)
    if dit.is_file():
        return {"dit": weights_digest(dit)}
    folder = dit / "transformer" if (dit / "transformer" / "config.json").exists() else dit
    return component_identity(str(folder.parent), [folder.name]) or {"path": model.dit}


def essentials(cfg: FlowtrainConfig, cache_id: str, transformer_id: dict[str, str]) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming it."""
    return {
        "family": cfg.model.family,
        "transformer": transformer_id,
        "train_mode": cfg.train_mode,
        # the kind only when it is not plain LoRA, so checkpoints written before lora.kind existed still resume
        "lora": [cfg.lora.rank, cfg.lora.effective_alpha, cfg.lora.targets]
        + ([cfg.lora.kind] if cfg.lora.kind != "lora" else [])
        if cfg.train_mode == "lora"
        else None,
        "cache_fingerprint": cache_id,
    }


def check_resume(
    state: TrainState, cfg: FlowtrainConfig, cache_id: str, transformer_id: dict[str, str], path: Path
) -> None:
    old, new = state.essentials, essentials(cfg, cache_id, transformer_id)
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
        if getattr(state, key) != getattr(cfg.train, key):
            log.info("resume: train.%s changed %s → %s", key, getattr(state, key), getattr(cfg.train, key))
    if state.data.seed != cfg.train.seed:
        log.info(
            "resume: train.seed changed %s → %s; the data order keeps the checkpoint's shuffle seed",
            state.data.seed,
            cfg.train.seed,
        )


def apply_changed_schedule(state: TrainState, cfg: FlowtrainConfig, optimizer: Any, lr_scheduler: Any) -> None:
    """A changed learning rate or max_steps takes effect from the resumed step on.

    The scheduler's state_dict restores the old `base_lrs` (and the optimizer the old lr), so a new
    train.learning_rate must be written into both; the schedule's shape comes from the new config already.
    """
    if state.learning_rate == cfg.train.learning_rate and state.max_steps == cfg.train.max_steps:
        return  # untouched: the restored state is already exact
    # optimizer.lr_scale groups keep their multiplier (`lr_scale`, see train.optim) relative to the new lr.
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    lr_scheduler.base_lrs = [cfg.train.learning_rate * f for f in scales]
    lrs = [
        base * fn(lr_scheduler.last_epoch)
        for base, fn in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True)
    ]
    for group, base, lr in zip(optimizer.param_groups, lr_scheduler.base_lrs, lrs, strict=True):
        group["initial_lr"], group["lr"] = base, lr
    lr_scheduler._last_lr = lrs


def resume_position(state: TrainState, global_batch: int, num_rows: int) -> tuple[int, int, int]:
    """(epoch, batch, shuffle seed) to continue from. With another global batch size (batch_size × processes) the
    position is carried over in samples, rounded down: a few samples may repeat, none is skipped."""
    epoch, batch, seed = state.data.epoch, state.data.batch, state.data.seed
    old_global = state.global_batch or global_batch
    if old_global != global_batch:
        sample = batch * old_global
        batch = sample // global_batch
        if batch >= num_rows // global_batch:
            epoch, batch = epoch + 1, 0
        log.info("resume: global batch %d → %d; going on at epoch %d, batch %d", old_global, global_batch, epoch, batch)
    return epoch, batch, seed
