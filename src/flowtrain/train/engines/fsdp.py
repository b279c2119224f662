"""FSDP2 (accelerate `fsdp_version: 2`): what changes when no process holds the whole transformer.

With FSDP2 every trainable parameter is a DTensor: each process keeps dim-0 rows of it (its shard) and the
transformer is all-gathered block by block in forward and backward. The rest of flowtrain stays engine-neutral
and asks this module through a few functions:

- `prepare_accelerator_state()`: accelerate 1.15 turns FSDP on only for accelerator devices. Launched on CPU with
  an FSDP config it silently falls back to plain DDP (MULTI_CPU), so the CPU/gloo runs (tests, CI) would not test
  FSDP at all. This makes the launcher's FSDP request take effect on CPU too; GPUs are untouched.
- `sharded(accelerator)`: FSDP is on.
- `save_shards` / `load_shards`: checkpoints through torch.distributed.checkpoint: every process writes its own
  shards of the trainable weights, the optimizer state and the EMA (`__{rank}_0.distcp`, plus `.metadata` from
  rank 0) into the checkpoint folder; no process gathers the model. Loading reads them back in place (DCP can
  reshard, so a different number of processes also reads them).
- `full_weights`: the gathered weights (a collective on every process; the values land on the main process only,
  on the CPU) in a form the families' `save_lora` / `save_full` write as they are, for the exported LoRA file /
  diffusers folder and the LoRA file inside a checkpoint.
- `copy_into_shards`: EMA weights are swapped in by copying into the parameters' local storage, since FSDP's
  all-gather reads that storage, not whatever `param.data` points to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def prepare_accelerator_state() -> None:
    """Call before `Accelerator(...)`. When the launcher asked for FSDP (ACCELERATE_USE_FSDP) on CPU processes,
    make accelerate build an FSDP state instead of silently falling back to DDP.

    accelerate decides the engine in `AcceleratorState.__init__` from the process state's type: FSDP is applied
    over MULTI_GPU (and other accelerators) only, never over MULTI_CPU. The process group is already set up over
    gloo by then; relabelling the process state's type lets accelerate take its FSDP branch, which then records
    FSDP as the type for good. torch's FSDP2 itself runs on CPU tensors over gloo.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env

    if not (parse_flag_from_env("ACCELERATE_USE_FSDP") and parse_flag_from_env("ACCELERATE_USE_CPU")):
        return
    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("FSDP_VERSION", "1") == "2":
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def sharded(accelerator: Any) -> bool:
    """FSDP is on: parameters are DTensor shards, and gathering them is a collective."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_shard(t: torch.Tensor) -> bool:
    """A DTensor (an FSDP parameter or a tensor made from one)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_parts(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor's local shard (a view: writing to it writes the DTensor); other tensors as they are."""
    return [t.to_local() if is_shard(t) else t for t in tensors]


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor: a DTensor's full value (a collective when it is not replicated yet), else `t` itself."""
    return t.full_tensor() if t is not None and is_shard(t) else t


def _options(*, loading: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen base weights are not checkpointed: they come from the model files (as in single-process checkpoints).
    # Loading just the trainable ones is therefore not strict; that every one of them is in the checkpoint is
    # checked by `dcp.load`, which fails on a requested key the checkpoint lacks.
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def save_shards(folder: Path, model: torch.nn.Module, optimizer: Any, ema: dict[str, torch.Tensor] | None) -> None:
    """Write this process's shards of the trainable weights, the optimizer state and the EMA into `folder`
    (torch.distributed.checkpoint; a collective: every process calls it with the same folder)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, _torch_optimizer(optimizer), options=_options())
    state: dict[str, Any] = {"model": weights, "optimizer": optim}
    if ema is not None:
        state["ema"] = ema
    dcp.save(state, checkpoint_id=str(folder))


def check_unsharded_resume(accelerator: Any, folder: Path) -> None:
    """A checkpoint written without FSDP (whole tensors, an optimizer state keyed by position) is not read into
    FSDP shards: say so instead of failing inside the copy."""
    if sharded(accelerator):
        raise ValueError(
            f"cannot resume {folder} under FSDP: it was written without FSDP (trainable.safetensors / optimizer.pt). "
            "Resume it with the launch it was written with, or start a new output_dir."
        )


def load_shards(folder: Path, model: torch.nn.Module, optimizer: Any) -> dict[str, torch.Tensor] | None:
    """Read a `save_shards` checkpoint into the model and optimizer in place (a collective). Returns the EMA
    tensors by parameter name (shards, like the parameters), or None when the checkpoint has no EMA."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opt = _torch_optimizer(optimizer)
    # get_state_dict gives the target layout (an optimizer without state yet gets it from a step at lr 0).
    weights, optim = get_state_dict(model, opt, options=_options())
    state: dict[str, Any] = {"model": weights, "optimizer": optim}
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    if any(k.startswith("ema.") for k in saved):
        state["ema"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options(loading=True))  # fmt: skip
    return state.get("ema")


def read_shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A sharded checkpoint consolidated into whole tensors on this one process (no process group needed):
    {"model": trainable weights, "optimizer": {"state", "param_groups"}, "ema": EMA weights (when kept)}, each
    keyed by parameter name. For inspecting or converting a checkpoint offline; holds it all in memory."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), f"{tmp}/whole.pt")
        return torch.load(f"{tmp}/whole.pt", weights_only=True)


def gather_weights(model: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict, on the CPU of the main process; other processes get an empty dict. A
    collective: every process calls it. `trainable_only`: just the trainable tensors (a LoRA: never the base)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=opts)


@contextlib.contextmanager
def state_dict_view(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Within the block `model.state_dict()` returns `state`: diffusers' `save_pretrained` and peft's
    `get_peft_model_state_dict` (what the families' writers call) then write gathered tensors, not shards."""
    model.state_dict = lambda *args, **kwargs: state  # an instance attribute, shadowing the method
    try:
        yield model
    finally:
        del model.state_dict


@contextlib.contextmanager
def full_weights(accelerator: Any, model: torch.nn.Module, *, trainable_only: bool) -> Iterator[torch.nn.Module]:
    """`model` as the families' writers can save it on the main process. Unsharded: the model itself (nothing
    is gathered). FSDP: every process must enter (`gather_weights` is a collective)."""
    if not sharded(accelerator):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    full = gather_weights(model, trainable_only=trainable_only)
    fsdp_cls = type(model)
    # fully_shard made the model an instance of a generated `FSDP<Model>` class; diffusers records the class name
    # in config.json (`_class_name`), so the writers see the model's own class for the block.
    model.__class__ = next(c for c in fsdp_cls.__mro__ if not issubclass(c, FSDPModule))
    try:
        with state_dict_view(model, full):
            yield model
    finally:
        model.__class__ = fsdp_cls


@torch.no_grad()
def copy_into_shards(params: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy `values` into the parameters' own storage (what FSDP all-gathers) and return the previous values."""
    previous = [p.detach().clone() for p in params]
    for p, v in zip(params, values, strict=True):
        p.detach().copy_(v)
    return previous
