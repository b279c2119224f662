"""Speed options of the training loop, kept out of the loop itself.

- `optimizer_kwargs`: fused optimizer kernels where torch has them for every parameter's device (CPU included
  since torch 2.4: on a 2-core CPU a fused AdamW step of a 72M-parameter model is ~6× faster than `foreach`),
  else `foreach`.
- `compile_transformer`: `torch.compile` of the transformer, regionally (each repeated block compiled in place)
  by default: one compiled graph serves every block of a kind, compile time stays a few blocks' worth, and
  parameter names (checkpoints, LoRA export) do not change the way an `OptimizedModule` wrapper would change them.

The DataLoader and its prefetch thread live in `flowtrain.data.loader`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


def fused_available(params: Iterable[torch.Tensor]) -> bool:
    """True when torch has fused optimizer kernels for every parameter (floating point, on a supported device)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def optimizer_kwargs(params: Iterable[torch.Tensor] = (), implementation: str = "auto") -> dict[str, bool]:
    """Keyword arguments selecting a torch optimizer's implementation (Adam, AdamW, SGD all take them).

    `auto`: fused when available for all `params`, else foreach. Fused and foreach compute the same update up to
    floating-point rounding (not bitwise).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"optimizer.implementation: {implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "fused" if fused_available(list(params)) else "foreach"
    if implementation == "fused":
        return {"fused": True}
    return {"foreach": implementation == "foreach"}


def hot_optimizer(optimizer: Any, accelerator: Any) -> Any:
    """The optimizer the loop calls `step()` and `zero_grad(set_to_none=True)` on every step: `optimizer` (as
    returned by `accelerator.prepare`), or the torch optimizer inside it where accelerate's wrapper adds nothing.

    accelerate's `AcceleratedOptimizer.step` looks up an optional package twice per call (~0.1 ms of Python), and its
    `zero_grad` builds `inspect.signature` of the inner `zero_grad` on every call; otherwise both only act for a
    GradScaler, XLA, or accelerate's own gradient accumulation, which flowtrain does not use. Without a scaler, on
    plain / DDP setups, the wrapped torch optimizer is used directly; every other case (fp16, DeepSpeed, FSDP, XLA,
    ...) keeps accelerate's wrapper.
    """
    from accelerate.optimizer import AcceleratedOptimizer

    if type(optimizer) is AcceleratedOptimizer and _plain(accelerator):
        return optimizer.optimizer
    return optimizer


def hot_backward(accelerator: Any) -> Callable[[torch.Tensor], None]:
    """What the loop calls `backward` of each micro-batch's loss with: `accelerator.backward`, or `Tensor.backward`
    where accelerate's adds nothing. On plain / DDP setups without a GradScaler it divides the loss by its own
    gradient accumulation steps, which flowtrain leaves at 1 (the loop divides itself), and calls `loss.backward()`:
    x / 1 == x, so the gradients are the same bits without that op and its autograd node.
    """
    if _plain(accelerator) and accelerator.gradient_accumulation_steps == 1:
        return torch.Tensor.backward
    return accelerator.backward


def hot_clip(accelerator: Any) -> Callable[[list[torch.Tensor], float], torch.Tensor | float | None]:
    """What the loop clips gradients with: `accelerator.clip_grad_norm_`, or torch's `clip_grad_norm_` where
    accelerate's adds nothing. On plain / DDP setups without a GradScaler it unscales nothing, sorts the parameters
    by DTensor mesh (an isinstance per parameter, every step: a LoRA has hundreds) into one group, and returns the
    2-norm of that group's norm, which is the norm itself, bit for bit (sqrt(n²) == n for a float n ≥ 0).
    """
    if _plain(accelerator):
        return torch.nn.utils.clip_grad_norm_
    return accelerator.clip_grad_norm_


def hot_autocast(accelerator: Any) -> Callable[[], Any]:
    """What the loop enters around each forward: `accelerator.autocast`, or `contextlib.nullcontext` where mixed
    precision is off. accelerate returns a `nullcontext` itself then, but only after building an `AcceleratorState`
    and its own generator context on every call (~10 µs a step); with fp16 / bf16 its autocast is kept."""
    if not accelerator.native_amp:
        return contextlib.nullcontext
    return accelerator.autocast


def _plain(accelerator: Any) -> bool:
    """No GradScaler, and one process or DDP (no DeepSpeed, FSDP, XLA, Megatron...)."""
    from accelerate.utils import DistributedType

    plain = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}
    return accelerator.scaler is None and accelerator.distributed_type in plain


# ---- torch.compile ---------------------------------------------------------------------------------------------
def compile_transformer(model: torch.nn.Module, *, backend: str = "inductor", regional: bool = True) -> list[str]:
    """Compile `model` in place; returns the names of the compiled modules ("" for the whole model).

    Regional: every submodule whose class is listed in the model's `_repeated_blocks` (diffusers' convention;
    e.g. a transformer's double- and single-stream blocks) is compiled with `Module.compile`. Without such
    blocks, or with `regional=False`, the whole model's forward is compiled. Shapes are static
    (`dynamic=False`): a fixed resolution bucket compiles once and never recompiles across steps.
    """
    repeated = set(getattr(model, "_repeated_blocks", None) or ())
    names = []
    if regional and repeated:
        for name, module in model.named_modules():
            if type(module).__name__ in repeated:
                module.compile(backend=backend, dynamic=False)
                names.append(name)
    if not names:
        model.compile(backend=backend, dynamic=False)
        names = [""]
    log.info("torch.compile (%s, backend=%s) of %d module(s)", "regional" if names != [""] else "whole model",
             backend, len(names))  # fmt: skip
    return names
