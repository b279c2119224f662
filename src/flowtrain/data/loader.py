"""The training DataLoader, built in this one place (instance rows, and DreamBooth class rows alike).

- `build_loader`: pinned memory only for CUDA, workers that prefetch and live for the whole run.
- `BatchPrefetcher`: without workers, a background thread reads the next batches while the step runs (Parquet
  decoding and tensor copies release the GIL).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)


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
) -> DataLoader | MainProcessLoader:
    """The training DataLoader. Pinned host memory only when the batches go to a CUDA device (it buys nothing on
    CPU and costs a copy); workers prefetch `prefetch_factor` batches each and live for the whole run. Without
    workers or pinning, a `MainProcessLoader` reads the same batches."""
    pin = pin_memory and device.type == "cuda"
    if num_workers == 0 and not pin:
        return MainProcessLoader(dataset, sampler, batch_size=batch_size, collate_fn=collate_fn)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=num_workers > 0,
    )


class MainProcessLoader:
    """The batches a worker-less, unpinned DataLoader yields: `batch_size` indices at a time from `sampler` (the last
    batch may be short), each row read from `dataset` and the rows collated, in this process.

    Written here because the DataLoader's own iterator adds ~50 µs of bookkeeping to every batch (a profiler range,
    a batch-sampler and fetcher layer, checks for iterable datasets) that buys nothing without workers: on a small
    model that is ~0.5% of a step.
    """

    num_workers, pin_memory, prefetch_factor = 0, False, None

    def __init__(self, dataset: Dataset, sampler: Sampler[int], *, batch_size: int, collate_fn: Any):
        self.dataset, self.sampler, self.batch_size, self.collate_fn = dataset, sampler, batch_size, collate_fn

    def __iter__(self) -> Iterator[Any]:
        indices, read = iter(self.sampler), self.dataset.__getitem__
        while rows := list(itertools.islice(indices, self.batch_size)):
            yield self.collate_fn([read(i) for i in rows])


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
