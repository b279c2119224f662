"""Speed options of the training loop, kept out of the loop itself.

- `optimizer_kwargs`: fused optimizer kernels where torch has them for every parameter's device (CPU included
  since torch 2.4: on a 2-core CPU a fused AdamW step of a 72M-parameter model is ~6× faster than `foreach`),
  else `foreach`.
- `compile_transformer`: `torch.compile` of the transformer, regionally (each repeated block compiled in place)
  by default: one compiled graph serves every block of a kind, compile time stays a few blocks' worth, and
  parameter names (checkpoints, LoRA export) do not change the way an `OptimizedModule` wrapper would change them.
- `build_loader` / `BatchPrefetcher`: the DataLoader with pinned memory (CUDA) and worker prefetch, and, without
  workers, a background thread that reads the next batches while the step runs (Parquet decoding and tensor
  copies release the GIL).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


def optimizer_step_fn(optimizer: Any, accelerator: Any) -> Any:
    """The callable to step `optimizer` (as returned by `accelerator.prepare`) with.

    accelerate's `AcceleratedOptimizer.step` looks up an optional package twice per call (~0.1 ms of Python) and
    otherwise only acts for a GradScaler, XLA, or accelerate's own gradient accumulation, which flowtrain does not
    use. Without a scaler, on plain / DDP setups, the wrapped torch optimizer is stepped directly; every other
    case (fp16, DeepSpeed, FSDP, XLA, ...) keeps accelerate's step.
    """
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType

    plain = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}
    if type(optimizer) is AcceleratedOptimizer and accelerator.scaler is None and accelerator.distributed_type in plain:
        return optimizer.optimizer.step
    return optimizer.step


# ---- torch.compile ---------------------------------------------------------------------------------------------
def compile_transformer(model: torch.nn.Module, *, backend: str = "inductor", regional: bool = True) -> list[str]:
    """Compile `model` in place; returns the names of the compiled modules ("" for the whole model).

    Regional: every submodule whose class is listed in the model's `_repeated_blocks` (diffusers' convention;
    Flux2's double and single blocks) is compiled with `Module.compile`. Without such blocks, or with
    `regional=False`, the whole model's forward is compiled. Shapes are static (`dynamic=False`): a fixed
    resolution bucket compiles once and never recompiles across steps.
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


# ---- data ----------------------------------------------------------------------------------------------------
def build_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    *,
    batch_size: int,
    collate_fn: Any,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int,
    device: torch.device,
) -> DataLoader:
    """The training DataLoader. Pinned host memory only when the batches go to a CUDA device (it buys nothing on
    CPU and costs a copy); workers prefetch `prefetch_factor` batches each and live for the whole run."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory and device.type == "cuda",
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=num_workers > 0,
    )


class BatchPrefetcher:
    """Iterates `source` on a daemon thread, `depth` batches ahead, in order.

    Used when the DataLoader has no workers: the next batch is read while the current step computes (up to
    `depth` batches queued plus the one being read). Errors in the source are re-raised in the consumer at the
    batch where they happened. `close()` stops the thread: it waits for the batch being read, at most `timeout`
    seconds, and warns if the source is still stuck then.
    """

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int = 2):
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowtrain-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Blocking puts, no polling: the thread wakes once per batch consumed. A thread that wakes on a timer
        # slowed 2-thread CPU steps ~2× on a 2-vCPU VM (it keeps stealing the vCPU an intra-op thread needs).
        try:
            for item in self._source:
                self._queue.put((item, None))
                if self._stop.is_set():
                    return
            self._queue.put((self._END, None))
        except BaseException as e:  # handed to the consumer, raised at the batch it could not read
            self._queue.put((None, e))

    def __iter__(self) -> BatchPrefetcher:
        return self

    def __next__(self) -> Any:
        item, error = self._queue.get()
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout  # a source stuck in a read is left to die with the process (daemon)
        while self._thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):  # free a slot: a blocked put returns and the thread sees the stop
                self._queue.get_nowait()
            self._thread.join(timeout=0.05)
        if self._thread.is_alive():
            log.warning("batch prefetch thread still reading after %.0f s; it ends with the process", timeout)


def use_prefetch_thread(prefetch: bool | None, num_workers: int, device: torch.device) -> bool:
    """`dataset.prefetch`: the reading thread only without worker processes (they prefetch on their own); None
    (auto) → on when the step runs on an accelerator, off on CPU. There the thread's tensor work competes with
    torch's intra-op threads for the same cores: a 2-thread CPU step of the 72M bench model ran ~20% slower with
    it, for a data wait of <0.1% without it (benchmarks/README.md)."""
    if num_workers > 0:
        return False
    return device.type != "cpu" if prefetch is None else prefetch


def batch_iterator(loader: Iterable[Any], *, prefetch: bool, depth: int) -> Iterator[Any]:
    """`iter(loader)`, behind a `BatchPrefetcher` thread reading `depth` batches ahead when `prefetch` (meant for
    loaders without worker processes of their own). Close it with `close_batches`."""
    batches = iter(loader)
    return BatchPrefetcher(batches, depth) if prefetch else batches


def close_batches(batches: Iterator[Any]) -> None:
    if isinstance(batches, BatchPrefetcher):
        batches.close()
