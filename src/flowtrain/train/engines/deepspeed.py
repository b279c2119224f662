"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate: what flowtrain's loop needs that differs from DDP.

accelerate runs the DeepSpeed engine for us (`accelerator.prepare` builds it, `accelerator.backward` calls
`engine.backward` and, on the last micro-batch of an optimizer step, `engine.step`); this module fills in the rest:

- Process group. accelerate picks no backend for DeepSpeed when there is no GPU, so on CPU the group is started
  with gloo (DeepSpeed's CPU accelerator falls back to gloo itself when Intel's oneCCL bindings are absent).
- Engine config. flowtrain owns the batch size, gradient accumulation (the loop divides each micro-batch's loss
  by `ga` and tells accelerate which micro-batch ends the step) and clipping (`train.max_grad_norm`, which the
  engine applies inside `engine.step`). The LR schedule stays flowtrain's: it sets `lr` in the optimizer's
  param groups, which DeepSpeed's ZeRO optimizer shares.
- Checkpoints. Each process writes its own shard with `engine.save_checkpoint` into `deepspeed/` inside
  flowtrain's atomic checkpoint folder (model states + one optimizer partition per rank); resume reads them back
  with `engine.load_checkpoint`. `deepspeed/zero_to_fp32.py` (DeepSpeed's) turns the shards into one fp32 state
  dict offline; `consolidated_state_dict` does the same in Python.
- Full weights. Under ZeRO-3 no process holds a whole parameter; `full_parameters` gathers them (a collective:
  every process enters it) for the LoRA file, the final export, EMA and validation sampling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SUBDIR = "deepspeed"  # inside checkpoint-{step}/
TAG = "state"  # DeepSpeed's checkpoint tag: deepspeed/state/...; deepspeed/latest names it


def requested() -> bool:
    """The launcher asked for DeepSpeed (`accelerate launch` with distributed_type DEEPSPEED sets this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def active(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Any) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def process_group_kwargs() -> dict[str, Any]:
    """kwargs for the process group (accelerate's `PartialState`): gloo for DeepSpeed without a GPU (accelerate
    would start none and run every process as a world of one), nothing otherwise."""
    if requested() and not torch.cuda.is_available():
        return {"backend": "gloo"}
    return {}


def configure(accelerator: Any, *, batch_size: int, max_grad_norm: float | None) -> None:
    """Write flowtrain's batch size and clipping into the engine config, before `accelerator.prepare`.

    The engine's own gradient accumulation stays at 1: the loop already scales each micro-batch's loss by 1/ga and
    marks the last micro-batch (`accumulating`), so the engine must not scale again.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = batch_size * accelerator.num_processes
    config["gradient_clipping"] = float(max_grad_norm or 0.0)  # 0: no clipping


@contextlib.contextmanager
def accumulating(accelerator: Any, last: bool) -> Iterator[None]:
    """One micro-batch's backward: the engine reduces and steps only when `last`. accelerate reads this flag in
    `backward` (its `accumulate()` helper would also count steps and rescale the loss, which the loop does itself)."""
    state = accelerator.gradient_state
    state._set_sync_gradients(last)
    try:
        yield
    finally:
        state._set_sync_gradients(True)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def full_parameters(accelerator: Any, model: torch.nn.Module, *, trainable_only: bool = False) -> Iterator[None]:
    """Within the block every process holds the whole of the model's parameters (or only the trainable ones).
    A collective under ZeRO-3: every process must enter it. Changes made inside are not written back."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    unwrapped = accelerator.unwrap_model(model)
    params = _trainable(unwrapped) if trainable_only else list(unwrapped.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextlib.contextmanager
def whole_model(accelerator: Any, model: Any) -> Iterator[None]:
    """Within the block the unwrapped model is an ordinary module holding all its weights on every process, so one
    process can run forwards alone (validation sampling): under ZeRO-3 the weights are gathered (a collective) and
    the engine's per-layer fetch hooks, which would all-gather again inside each forward, are lifted meanwhile.
    Models loaded inside (validation's text encoder) load whole on the process that loads them: transformers would
    otherwise build them partitioned under ZeRO-3 (`zero.Init`, a collective the other processes never join).
    Costs the whole model's memory on every process for the duration."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
    from transformers.integrations import unset_hf_deepspeed_config

    with unwrap_model_for_generation(_engine(accelerator, model)):
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # what accelerate had set up


def _engine(accelerator: Any, model: Any) -> Any:
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if engine is None:
        raise RuntimeError("DeepSpeed engine not prepared yet")
    return engine.engine


def save_shards(accelerator: Any, model: Any, folder: Path, *, lora: bool) -> None:
    """Every process: its shard of the engine state (weights, optimizer partition) into `folder/deepspeed/`.

    A LoRA run leaves the frozen base out (it is the model's own file, read again on resume)."""
    _engine(accelerator, model).save_checkpoint(str(folder / SUBDIR), tag=TAG, exclude_frozen_parameters=lora)


def has_shards(checkpoint: Path) -> bool:
    return (checkpoint / SUBDIR / TAG).is_dir()


def load_shards(accelerator: Any, model: Any, checkpoint: Path, *, lora: bool) -> None:
    """Every process: read back what `save_shards` wrote (same number of processes as the save; DeepSpeed's
    universal checkpoint would be needed for another world size)."""
    saved = len(list((checkpoint / SUBDIR / TAG).glob("*optim_states.pt")))
    if saved != accelerator.num_processes:
        raise ValueError(
            f"{checkpoint} holds DeepSpeed optimizer shards of {saved} processes, this run has "
            f"{accelerator.num_processes}: resume a DeepSpeed checkpoint with as many processes as saved it"
        )
    path, _ = _engine(accelerator, model).load_checkpoint(
        str(checkpoint / SUBDIR), tag=TAG, load_module_strict=not lora, load_lr_scheduler_states=False
    )
    if path is None:
        raise ValueError(f"DeepSpeed could not load its state from {checkpoint / SUBDIR}")


def consolidated_state_dict(checkpoint: Path, *, lora: bool) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint's shards merged into one state dict (DeepSpeed's zero_to_fp32), by
    parameter name; with `lora` only the trainable (adapter) tensors. No processes needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / SUBDIR), tag=TAG, exclude_frozen_parameters=lora)
    return {k: v.detach().contiguous() for k, v in state.items()}
