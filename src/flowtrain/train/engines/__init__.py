"""Engine-neutral calls the run, the loop and checkpoints make; each engine's specifics live in its own module.

With one process or DDP every call here does what flowtrain always did (so those runs are unchanged bitwise);
under DeepSpeed (`engines.deepspeed`) they hand over to the engine. FSDP2 (`engines.fsdp`) is called directly where
its steps differ (sharded checkpoints, gathered exports, the EMA on shards).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from flowtrain.train.engines import deepspeed as ds

log = logging.getLogger(__name__)


def unwrap(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """`accelerator.unwrap_model(model)`. In a single process accelerate wraps nothing, so the model is returned as
    it is: accelerate's unwrap imports DeepSpeed whenever it is installed, only for an isinstance test, and that
    import (which imports MLflow too) cost 1.5 s before the first step of every run (docs/training.md, "Start-up")."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.NO:
        return model
    return accelerator.unwrap_model(model)


def process_group_kwargs() -> dict[str, Any]:
    """Extra kwargs for the process group (the backend); empty for one process and DDP."""
    return ds.process_group_kwargs()


def configure(accelerator: Any, cfg: Any) -> None:
    """Before `accelerator.prepare`: tell the engine what the config decides (batch, clipping)."""
    if ds.active(accelerator):
        ds.configure(accelerator, batch_size=cfg.train.batch_size, max_grad_norm=cfg.train.max_grad_norm)


def nonfinite_policy(accelerator: Any, policy: str) -> str:
    """`train.nonfinite` as this engine can honour it. DeepSpeed steps inside the last micro-batch's backward,
    before the loop sees the loss and gradient norm, so a non-finite step cannot be skipped: `skip` becomes `stop`
    (the run stops before saving, so the last checkpoint stays good)."""
    if ds.active(accelerator) and policy == "skip":
        if accelerator.is_main_process:
            log.warning(
                "train.nonfinite=skip: under DeepSpeed the update is applied inside backward and cannot be skipped; "
                "the run stops at the first non-finite step instead (train.nonfinite=stop)"
            )
        return "stop"
    return policy


def micro_batch(accelerator: Any, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's forward and backward: gradients are reduced (and, under DeepSpeed, the engine
    steps) only on the `last` micro-batch of an optimizer step."""
    if ds.active(accelerator):
        return ds.accumulating(accelerator, last)
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def full_parameters(
    accelerator: Any, model: torch.nn.Module, *, trainable_only: bool = False
) -> contextlib.AbstractContextManager:
    """Within the block the unwrapped model holds whole parameters on every process (a collective when they are
    sharded: every process must enter it)."""
    if ds.active(accelerator):
        return ds.full_parameters(accelerator, model, trainable_only=trainable_only)
    return contextlib.nullcontext()


def whole_model(accelerator: Any, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Within the block the main process can run the unwrapped model's forward alone (validation sampling); a
    collective when parameters are sharded: every process must enter it."""
    if ds.active(accelerator):
        return ds.whole_model(accelerator, model)
    return contextlib.nullcontext()


def engine_checkpoint(accelerator: Any) -> bool:
    """The engine saves weights and optimizer state itself, one shard per process (no trainable.safetensors /
    optimizer.pt)."""
    return ds.active(accelerator)


def save_shards(accelerator: Any, model: Any, folder: Path, *, lora: bool) -> None:
    """Every process writes its shard of the engine's state into `folder` (only when `engine_checkpoint`)."""
    ds.save_shards(accelerator, model, folder, lora=lora)


def load_shards(accelerator: Any, model: Any, checkpoint: Path, *, lora: bool) -> None:
    """Every process reads its shard back from `checkpoint` (only when `engine_checkpoint`)."""
    if not ds.has_shards(checkpoint):
        raise ValueError(
            f"{checkpoint} was not written by a DeepSpeed run (no {ds.SUBDIR}/ folder); resume it with the engine "
            "that wrote it"
        )
    ds.load_shards(accelerator, model, checkpoint, lora=lora)
