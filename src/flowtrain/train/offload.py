"""Memory savers for the transformer's repeated blocks: activation checkpointing levels and block swap.

Both work on the same list: the model's repeated blocks (`transformer_blocks`) in execution order, found the way
regional compile finds them (`_repeated_blocks`, diffusers' convention: double- then single-stream blocks).

**Checkpointing levels** (`train.gradient_checkpointing`): `true` is diffusers' own `enable_gradient_checkpointing`
(every block), unchanged. The other levels keep diffusers' loop and hand it a checkpoint function that checkpoints
only the chosen blocks and calls the others directly, with the same positional arguments: the transformer's
forward is not duplicated here, and the recomputation is torch's non-reentrant checkpoint (RNG state restored), so
losses and gradients are bitwise those of no checkpointing.

**Block swap** (`train.blocks_to_swap: N`): the frozen weights of the last N blocks live on the CPU (pinned on
CUDA); each block's weights are copied to the device just before its forward and again before its backward, while
the next block's copy runs on a side stream. Choices, and why:

- Only *frozen* parameters are swapped. The CPU copy of a frozen weight never changes, so taking a block off the
  device is dropping the device copy: no device-to-host copy, ever. Trainable parameters (LoRA A/B) stay on the
  device, where the optimizer, its state and the gradients are: moving them would mean moving gradients and
  optimizer state too. So block swap is for LoRA; a full fine-tune is refused.
- Residency is switched with `param.data = ...`; the device copy is never written in place, so whatever still
  refers to it stays correct.
- A swapped block is always checkpointed (`enable_checkpointing(..., swapped=N)`, whatever the level). Autograd
  saves what a block's backward needs, including views of its weights (`weight.t()` for a matmul), so a block
  whose activations were saved would keep its device copy alive until its backward: dropping it would free
  nothing. A checkpointed block saves only its inputs, and its recomputation, which re-saves the weights, runs
  inside its backward, after the reload. The cost is one more forward of each swapped block per step.
- Swapped: the *last* N blocks. The first blocks run while the first swapped one streams in, and the last block
  run forward is the first one backward needs, so it stays resident across the turn.
- Before backward: a hook on each block output's gradient (fired when that gradient is ready, before the block's
  own backward nodes run) loads the block, prefetches the previous swapped block and drops the next one, whose
  backward is finished (autograd runs nodes in reverse creation order). The recomputation runs inside the block's
  backward, after that hook: the weights are there.
- Device copies are made on a side stream and waited for with an event; `record_stream` tells the caching
  allocator they are used on the compute stream, so their memory is not reused before the compute is done.
- On CPU (device == cpu) the moves are no-ops but every hook and all bookkeeping run, which is what the CPU tests
  check (numerics bitwise unchanged; the load / drop order).
- Not with torch.compile (the hooks change parameters between calls; compiled blocks would guard-fail or break
  graphs), FSDP or DeepSpeed (they own where parameters live) or multi-GPU DDP (its wrapper wants every parameter
  on one device type): refused with an error saying so.

At most two swapped blocks are on the device at any time: the one running and the one being prefetched. So N
swapped blocks lower the peak by N - 2 blocks' weights: the price of overlapping each copy with compute.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

_EVERY = re.compile(r"every:(\d+)")
_CHECKPOINTING_FORMS = (
    'false, true (every block), "every:K" (every K-th block, K >= 1) or "single" (the single-stream blocks)'
)


# ---- which blocks ----------------------------------------------------------------------------------------------
def transformer_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's repeated blocks (classes listed in `_repeated_blocks`) as (name, module), in execution order.

    Module registration order is execution order for every family's transformer (double-stream blocks, then
    single-stream ones). Raises ValueError when the model declares no repeated blocks.
    """
    repeated = set(getattr(model, "_repeated_blocks", None) or ())
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in repeated]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} declares no repeated transformer blocks (`_repeated_blocks`): block swap and "
            "gradient checkpointing levels need them"
        )
    return blocks


# ---- checkpointing levels --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpointing:
    """A parsed `train.gradient_checkpointing`: `kind` none | all | every | single; `every` the K of every:K."""

    kind: str
    every: int = 1


def parse_checkpointing(value: Any) -> Checkpointing:
    """`train.gradient_checkpointing` → Checkpointing; ValueError naming the accepted forms otherwise."""
    if value is False or value is None:
        return Checkpointing("none")
    if value is True:
        return Checkpointing("all")
    if isinstance(value, str):
        if value == "single":
            return Checkpointing("single")
        m = _EVERY.fullmatch(value.strip())
        if m and int(m.group(1)) >= 1:
            return Checkpointing("every", int(m.group(1)))
    raise ValueError(f"train.gradient_checkpointing: {value!r} is not one of {_CHECKPOINTING_FORMS}")


def checkpointed_blocks(blocks: list[tuple[str, torch.nn.Module]], level: Checkpointing) -> list[str]:
    """Names of the blocks `level` checkpoints. `every:K`: blocks 0, K, 2K, ... in execution order; `single`: the
    single-stream blocks (class name contains "Single"); ValueError when a level selects none of them."""
    if level.kind == "none":
        return []
    if level.kind == "all":
        return [n for n, _ in blocks]
    if level.kind == "every":
        return [n for i, (n, _) in enumerate(blocks) if i % level.every == 0]
    chosen = [n for n, m in blocks if "Single" in type(m).__name__]
    if not chosen:
        kinds = sorted({type(m).__name__ for _, m in blocks})
        raise ValueError(
            f'train.gradient_checkpointing="single": this transformer has no single-stream blocks (its blocks: '
            f'{kinds}); use true or "every:K"'
        )
    return chosen


def enable_checkpointing(model: torch.nn.Module, value: Any, swapped: int = 0) -> list[str]:
    """Turn on `train.gradient_checkpointing` = `value` on a diffusers transformer, plus the last `swapped` blocks
    (`train.blocks_to_swap`: a swapped block is always checkpointed, see BlockSwap); returns the checkpointed blocks'
    names in execution order. `true` is exactly diffusers' default (every block)."""
    level = parse_checkpointing(value)
    blocks = transformer_blocks(model)
    if level.kind == "all":
        model.enable_gradient_checkpointing()
        return [n for n, _ in blocks]
    chosen = set(checkpointed_blocks(blocks, level)) | {n for n, _ in blocks[len(blocks) - swapped :] if swapped}
    if not chosen:
        return []
    ids = {id(m) for n, m in blocks if n in chosen}

    # diffusers calls this for *every* block of its loop when checkpointing is on; the blocks not chosen run
    # plainly with the same arguments (what its loop would pass them with checkpointing off, positionally).
    def selective(block: torch.nn.Module, *args: Any) -> Any:
        if id(block) in ids:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=selective)
    log.info("gradient checkpointing %r%s: %d of %d blocks", value, f" + {swapped} swapped" if swapped else "",
             len(chosen), len(blocks))  # fmt: skip
    return [n for n, _ in blocks if n in chosen]


# ---- block swap ------------------------------------------------------------------------------------------------
def check_swap_config(blocks_to_swap: int, train_mode: str, compile: bool) -> None:
    """Config-time refusals of train.blocks_to_swap (the engine is checked when the run starts)."""
    if train_mode != "lora":
        raise ValueError(
            f"train.blocks_to_swap={blocks_to_swap} needs train_mode=lora: only frozen weights are swapped (a full "
            "fine-tune would move gradients and optimizer state each step); set train.blocks_to_swap: 0"
        )
    if compile:
        raise ValueError(
            f"train.blocks_to_swap={blocks_to_swap} cannot run with train.compile: the swap changes the blocks' "
            "parameters between calls, which compiled blocks cannot follow; turn one of them off"
        )


def check_swap_engine(accelerator: Any) -> None:
    """Refuse block swap under FSDP / DeepSpeed, which decide themselves where parameters live, and under multi-GPU
    DDP, whose wrapper requires every parameter on one device type. One process, or DDP on CPU, is fine."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"train.blocks_to_swap cannot run under {kind.value}: the engine shards and places the parameters "
            "itself (use its own CPU offload instead); set train.blocks_to_swap: 0"
        )
    if kind not in (DistributedType.NO, DistributedType.MULTI_CPU):
        raise ValueError(
            f"train.blocks_to_swap cannot run with {kind.value} (DistributedDataParallel needs all parameters on one "
            "device type; block swap keeps some on the CPU): train on one process, or set train.blocks_to_swap: 0"
        )


def _in_backward() -> bool:
    """True inside an autograd backward pass (a checkpointed block's recomputation runs there). torch has no public
    way to ask; its graph-task id is -1 outside backward."""
    return torch._C._current_graph_task_id() != -1


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class BlockSwap:
    """Keeps the frozen weights of the last `n` of `blocks` on the CPU, moving them in per forward / backward.

    Build it on the model before `accelerator.prepare`, with `device_placement=False` for the model: it puts
    everything else on `device` itself, so the swapped weights never pass through the device. `trace`, if given,
    receives ("load" | "ready" | "drop" | "forward" | "backward", block index) events (tests check the order):
    "load" when a copy starts, "ready" when the parameters point at it and the compute stream waits for it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        n: int,
        device: torch.device | str,
        trace: list[tuple[str, int]] | None = None,
    ) -> None:
        blocks = transformer_blocks(model)
        if not 0 < n <= len(blocks):
            raise ValueError(
                f"train.blocks_to_swap={n}: this transformer has {len(blocks)} blocks; give 0 (off) to {len(blocks)}"
            )
        if n <= 2:
            log.warning(
                "train.blocks_to_swap=%d saves no peak device memory: two swapped blocks are on the device at once "
                "(the one running and the next, copied meanwhile); N swapped blocks save N - 2 blocks' weights", n
            )  # fmt: skip
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.trace = trace
        self.order = [m for _, m in blocks[len(blocks) - n :]]  # swapped blocks, execution order
        self.index = {id(m): i for i, m in enumerate(self.order)}
        # per swapped block: (parameter, its CPU copy) for every frozen parameter
        self.masters: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        swapped = set()
        for block in self.order:
            pairs = []
            for p in block.parameters():
                if p.requires_grad:
                    continue  # trainable (LoRA): stays on the device with its gradient and optimizer state
                cpu = p.data.to("cpu")
                if self.cuda:
                    cpu = cpu.pin_memory()  # pinned: host-to-device copies run asynchronously on the side stream
                p.data = cpu
                pairs.append((p, cpu))
                swapped.add(id(p))
            self.masters.append(pairs)
        # everything else (unswapped blocks, embedders, LoRA weights, buffers) lives on the device
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in swapped:
                t.data = t.data.to(self.device)
        self.block_bytes = [_nbytes(c for _, c in pairs) for pairs in self.masters]
        self.fixed_bytes = _nbytes(t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in swapped)
        self.resident: dict[int, list[torch.Tensor]] = {}  # block index -> its device copies, once waited for
        self.pending: dict[int, tuple[list[torch.Tensor], Any]] = {}  # copies in flight and their event
        self.peak_bytes = self.resident_bytes
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.handles = [model.register_forward_pre_hook(self._model_pre)]
        for block in self.order:
            self.handles.append(block.register_forward_pre_hook(self._pre))
            self.handles.append(block.register_forward_hook(self._post))
        log.info("block swap: %d of %d blocks on the CPU (%.1f MiB of frozen weights)", n, len(blocks),
                 sum(self.block_bytes) / 2**20)  # fmt: skip

    # -- bookkeeping
    @property
    def resident_bytes(self) -> int:
        """Weight bytes on the device now: everything not swapped plus the swapped blocks loaded or in flight."""
        on = set(self.resident) | set(self.pending)
        return self.fixed_bytes + sum(self.block_bytes[i] for i in on)

    def _note(self, event: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((event, i))

    # -- moves
    def _prefetch(self, i: int) -> None:
        """Start copying block i's weights to the device (side stream) unless they are there or on their way."""
        if i < 0 or i >= len(self.order) or i in self.resident or i in self.pending:
            return
        self._note("load", i)
        if self.stream is None:
            copies, event = [cpu.to(self.device) for _, cpu in self.masters[i]], None  # same device: no copy
        else:
            with torch.cuda.stream(self.stream):
                copies = [cpu.to(self.device, non_blocking=True) for _, cpu in self.masters[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
        self.pending[i] = (copies, event)
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    def _ensure(self, i: int) -> None:
        """Block i's weights on the device and usable by the compute stream from here on."""
        self._prefetch(i)
        if i in self.pending:
            copies, event = self.pending.pop(i)
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for c in copies:
                    c.record_stream(current)  # not reused by the allocator before the compute that reads it ran
            for (p, _), c in zip(self.masters[i], copies, strict=True):
                p.data = c
            self.resident[i] = copies
            self._note("ready", i)

    def _drop(self, i: int) -> None:
        """Block i back to its CPU copies (frozen weights: nothing to copy back)."""
        if i not in self.resident:
            return
        self._note("drop", i)
        for p, cpu in self.masters[i]:
            p.data = cpu
        del self.resident[i]

    # -- hooks
    def _model_pre(self, module: torch.nn.Module, args: Any) -> None:
        # A new forward: whatever the last backward left resident goes, except the first swapped block, which the
        # forward needs first (it starts streaming in now if it is not there).
        for i in list(self.resident):
            if i != 0:
                self._drop(i)
        self._prefetch(0)

    def _pre(self, block: torch.nn.Module, args: Any) -> None:
        i = self.index[id(block)]
        if _in_backward():
            return  # a checkpointed block recomputed inside backward: its backward hook loaded it already
        self._ensure(i)
        self._note("forward", i)
        self._prefetch(i + 1)

    def _post(self, block: torch.nn.Module, args: Any, output: Any) -> None:
        i = self.index[id(block)]
        if _in_backward():
            return  # recomputation inside backward: the block stays until the previous one's backward begins
        outs = [t for t in (output if isinstance(output, tuple) else (output,)) if isinstance(t, torch.Tensor)]
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in outs)
        if grads:
            hook = self._backward_hook(i)
            for t in outs:
                if t.requires_grad:
                    t.register_hook(hook)
        if not (grads and i == len(self.order) - 1):  # the last one is the first backward needs: it stays
            self._drop(i)

    def _backward_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        done = []  # a block with several outputs gets several calls: act on the first

        def hook(grad: torch.Tensor) -> None:
            if done:
                return
            done.append(True)
            self._ensure(i)
            self._note("backward", i)
            self._drop(i + 1)  # its backward is finished: autograd runs nodes in reverse creation order
            self._prefetch(i - 1)

        return hook


def install_block_swap(model: torch.nn.Module, n: int, accelerator: Any) -> BlockSwap:
    """`train.blocks_to_swap`: a BlockSwap on `model` for `accelerator.device` (after the engine checks)."""
    check_swap_engine(accelerator)
    return BlockSwap(model, n, accelerator.device)
