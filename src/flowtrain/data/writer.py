"""Writing cache shards on a background thread, so the encoders never wait on Parquet encoding and compression.

Why our own small class and not a bare `ThreadPoolExecutor`: the queue must be bounded (each pending shard holds
its whole encoded table in memory), a failed write must surface in the encoding loop at the next shard rather
than be lost in a future nobody reads, and when the encoding loop itself fails, the shards already handed over
are still written (a rerun then skips them) before the error propagates.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)


class ShardWriter:
    """`submit(table, path)` hands a finished cache table to one writer thread running `write(table, path)`.

    At most `max_pending` tables wait or are being written; `submit` blocks on the oldest beyond that (back
    pressure: memory stays bounded when writing is slower than encoding). A write's exception is re-raised by the
    next `submit` or by `close`. Use as a context manager: leaving the block waits for every pending write.
    """

    def __init__(self, write: Callable[[pa.Table, Path], None], max_pending: int = 2):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self._write, self._max = write, max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowtrain-shard-writer")
        self._pending: deque[tuple[Path, Future]] = deque()
        self.written: list[Path] = []  # in submission order, once each write has completed

    def submit(self, table: pa.Table, path: Path) -> None:
        while len(self._pending) >= self._max:
            self._finish_oldest()
        self._pending.append((path, self._pool.submit(self._write, table, path)))

    def _finish_oldest(self) -> None:
        path, future = self._pending.popleft()
        try:
            future.result()
        except Exception as e:  # the write's own exception (its type tells a full disk from a bug), with the shard
            e.add_note(f"while writing cache shard {path}")
            raise
        self.written.append(path)

    def close(self) -> None:
        """Wait for every pending write; raise the first failure."""
        try:
            while self._pending:
                self._finish_oldest()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=False)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # The encoding loop failed: keep what it finished (a rerun skips those shards), and let its error, not a
        # write's, be the one reported.
        try:
            self.close()
        except Exception as e:
            log.warning("precompute: a pending shard write failed too: %s", e)
