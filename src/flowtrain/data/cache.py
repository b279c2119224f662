"""Reading the latent cache in training: a map-style Dataset over the columns the model family declared, a
collate that pads variable-length columns per batch, and a resumable, rank-sharded sampler.

Validation happens at the read boundary, never per step: every shard's existence, row count and column shapes are
checked when the dataset is opened, and each row group is checked for NaN/inf once per process, the first time
it is read. Errors are `CacheError`s that name the file, row and key and say what to do.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler

from flowtrain.data.arrays import as_numpy
from flowtrain.data.fs import FsPath, as_path, load_tensors, open_parquet
from flowtrain.data.layout import has_layout, unchanged
from flowtrain.data.manifest import CacheError, CacheManifest
from flowtrain.data.tensors import column_to_tensor, ragged_to_tensors
from flowtrain.models.common import pad_rows

# Optional per-row loss weights, written by the user, not by a family: a float column (per-sample weight) or a
# float32 fixed-shape tensor column of the token grid (h, w) or (N,) (per-token weights). `train.step` hands it to
# the loss as LossContext.mask.
LOSS_MASK = "loss_mask"
RERUN = "rerun `flowtrain precompute` with the same --out (it recomputes missing shards)"
OPEN_SHARDS = 64  # shard handles a reader keeps open (per process); well under the usual 1024 open-file limit
# A shuffle block (`CacheDataset.shuffle_blocks`) runs over a shard's consecutive row groups until it holds this many
# bytes of the file. Opening a shard (its footer parsed) costs about as much as reading ~100 KiB of it, and a cache
# of more shards than OPEN_SHARDS opens one per block read: with 16-row groups of small rows (a few KiB a row or
# less) that open was most of the read, and a 1M-row cache read 0.7× as fast as a 10k-row one (benchmarks/scale.py).
# Real rows (Klein 4B at 1024 px: ~8 MiB) fill a row group of their own, and their blocks stay single row groups.
BLOCK_BYTES = 512 * 1024


class CacheDataset(Dataset):
    """Rows of a latent cache: {column: tensor in its storage dtype (`manifest.columns`), "index": int}; a
    variable-length column's row has its own length (`Collate` pads a batch).

    Shards are read one row group at a time with a small LRU, so memory stays bounded for rows of several MiB.
    """

    def __init__(self, cache_dir: str | Path, lru_row_groups: int = 8):
        self.dir = as_path(cache_dir)  # a folder, or an fsspec URL read in byte ranges (data.fs.open_parquet)
        self._pid = os.getpid()  # the process self.dir's filesystem was made in (`_shard_path`)
        self.manifest = CacheManifest.read(self.dir)
        self.columns = list(self.manifest.columns)
        self._files = [s["file"] for s in self.manifest.shards]
        self._starts: list[int] = []
        n = 0
        for s in self.manifest.shards:
            self._starts.append(n)
            n += s["rows"]
        self._len = n
        if n == 0:
            raise CacheError(
                f"{self.manifest.where}: the cache holds no rows: check that `flowtrain prepare` wrote "
                "images (see its prepare_report.json) and rerun `flowtrain precompute`"
            )
        self._check_shards()
        self._finite_checked: set[tuple[int, int]] = set()
        self._lru: OrderedDict[tuple[int, int], dict[str, torch.Tensor | tuple]] = OrderedDict()
        self._lru_size = lru_row_groups
        # Open shard handles, least recently used first, at most OPEN_SHARDS: each holds a file descriptor and its
        # footer (~80 KB), and an epoch over a 1M-row cache touches ~4k shards (benchmarks/scale.py).
        self._pf: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._rg_starts: dict[int, list[int]] = {}  # per shard: the first row of each row group (`_locate`)

    def __len__(self) -> int:
        return self._len

    @property
    def collate(self) -> Collate:
        """The collate function for this cache's columns."""
        return Collate(tuple(c.name for c in self.columns if c.variable))

    def collate_fixed_length(self) -> Collate:
        """A collate that pads variable-length columns to their declared `max_length` rather than to each batch's
        longest row: one tensor shape for every batch (what `train.compile` needs to compile once)."""
        pad_to = tuple((c.name, c.max_length) for c in self.columns if c.variable and c.max_length is not None)
        return Collate(tuple(c.name for c in self.columns if c.variable), pad_to)

    @property
    def latent_norm(self) -> dict[str, torch.Tensor]:
        """The family's latent statistics from the manifest, as float32 tensors (`ModelFamily.training_latents`)."""
        return {k: torch.tensor(v) for k, v in self.manifest.latent_norm.items()}

    @property
    def lru_row_groups(self) -> int:
        """How many decoded row groups this reader keeps (per process)."""
        return self._lru_size

    def row_group_sizes(self) -> list[int]:
        """Rows of every Parquet row group, in row order over all shards (from the files' footers)."""
        return [n for shard in range(len(self._files)) for n in self._group_rows(shard)]

    def block_sizes(self) -> tuple[np.ndarray, int]:
        """(rows of every shuffle block in row order, the most row groups in one block). A block is a run of one
        shard's consecutive row groups holding at least BLOCK_BYTES of the file, or the shard's rest; a cache
        whose manifest records no file sizes (older caches) has a block per row group."""
        blocks: list[int] = []
        widest = 1
        for s, sizes in zip(self.manifest.shards, self._group_sizes, strict=True):
            per_row = s["bytes"] / max(s["rows"], 1) if "bytes" in s else math.inf
            rows = groups = 0
            for n in sizes:
                rows, groups = rows + n, groups + 1
                if rows * per_row >= BLOCK_BYTES:
                    blocks.append(rows)
                    widest, rows, groups = max(widest, groups), 0, 0
            if rows:
                blocks.append(rows)
                widest = max(widest, groups)
        return np.asarray(blocks, dtype=np.int64), widest

    def shuffle_blocks(self, shuffle_window: int | None) -> dict:
        """`ResumableSampler` keyword arguments for `dataset.shuffle_window` (None: auto, see
        `resolve_shuffle_window`), in blocks (`block_sizes`). Grows this reader's LRU to hold a window's row
        groups (at most a few MiB more: only groups under BLOCK_BYTES share a block), so each is decoded once an
        epoch."""
        blocks, widest = self.block_sizes()
        window = resolve_shuffle_window(shuffle_window, blocks, self._lru_size)
        # the blocks read together: a window, or the whole cache when it fits (not a configured global permutation)
        together = window if window > 0 else len(blocks) if len(blocks) <= self._lru_size else 0
        self._lru_size = max(self._lru_size, together * widest)
        return {"blocks": blocks, "shuffle_window": window}

    def _group_rows(self, shard: int) -> list[int]:
        return self._group_sizes[shard]  # read with the footer check, once

    def _check_shards(self) -> None:
        """Every listed shard exists, is readable Parquet, and has the manifest's row count and column shapes.

        A manifest that records each shard's layout (`data.layout`: size and row groups) is trusted for every shard
        whose file has the recorded size (one `stat`); those shards' footers are checked when first opened
        (`_file`). Other shards, and every shard of an older manifest, get one footer read now (no handle kept:
        handles are opened after the DataLoader forks its workers), on threads when there are many: a 1M-row cache
        is ~4k shards, and each read waits on the file system."""
        shards = self.manifest.shards
        self._group_sizes: list[list[int]] = [[] for _ in shards]
        self._unverified: set[int] = set()  # shards taken from the manifest's layout, footer not yet checked
        if has_layout(shards) and not isinstance(self.dir, FsPath):  # at a URL a stat is a request: footers instead
            for i, (s, same) in enumerate(zip(shards, unchanged(self.dir, shards), strict=True)):
                if same:
                    self._group_sizes[i] = list(s["row_groups"])
                    self._unverified.add(i)
        todo = [i for i in range(len(shards)) if i not in self._unverified]
        paths = [self.dir / shards[i]["file"] for i in todo]
        workers = min(8, os.cpu_count() or 1) if len(paths) > 16 else 1
        with ThreadPoolExecutor(workers) as pool:
            footers = list(pool.map(_read_footer, paths))
        self._has_mask: dict[int, bool] = {}  # whether the shard holds a LOSS_MASK column, known once checked
        self._schemas_ok: dict[tuple, bool] = {}  # (footer's Arrow schema, manifest shapes) checked → has a mask
        for i, path, footer in zip(todo, paths, footers, strict=True):
            if isinstance(footer, Exception):
                self._check_readable(path, footer)
            rows, schema, sizes = footer
            self._check_rows(i, path, rows)
            self._check_columns(i, path, schema)
            self._has_mask[i] = LOSS_MASK in schema.names
            self._group_sizes[i] = sizes

    def _check_readable(self, path: Path | FsPath, error: Exception) -> None:
        """Raise the CacheError for a shard whose footer could not be read (missing, or not Parquet)."""
        if not path.exists():  # asked only when the read failed: at a URL each question is a request
            raise CacheError(f"{path}: listed in manifest.json but missing; {RERUN}")
        raise CacheError(f"{path}: not a readable Parquet file ({error}); delete it and {RERUN}") from error

    def _check_rows(self, shard: int, path: Path | FsPath, rows: int) -> None:
        if rows != self.manifest.shards[shard]["rows"]:
            want = self.manifest.shards[shard]["rows"]
            raise CacheError(f"{path}: {rows} rows, manifest.json says {want}; delete it and {RERUN}")

    def _check_columns(self, shard: int, path: Path | FsPath, schema: pa.Schema) -> None:
        """Raise a CacheError naming `path` when its columns' tensor shapes are not the manifest's for `shard`."""
        s = self.manifest.shards[shard]
        for col in self.columns:
            got = _stored_shape(schema.field(col.name).type) if col.name in schema.names else None
            # a variable-length row (L, *rest) is stored as L fixed-size lists of prod(rest) values; an image
            # column of an aspect-ratio bucket's shard has that bucket's latent grid (manifest `shapes`)
            fixed = s.get("shapes", {}).get(col.name, col.shape)
            want = [None, math.prod(col.shape[1:])] if col.variable else list(fixed)
            if got != want:
                raise CacheError(
                    f"{path}: column {col.name!r} holds tensors of shape {got}, manifest.json says "
                    f"{list(col.shape)} (a shard from another model or resolution?); delete it and {RERUN}"
                )

    def _check_opened(self, shard: int, path: Path | FsPath, pf: pq.ParquetFile) -> None:
        """The footer check of a shard placed by the manifest's layout, on its first open in this process.

        Cheap on purpose: a 1M-row cache opens a new shard for almost every row group it reads. The column check
        is done once per distinct footer schema (all shards of one bucket share it), not per shard."""
        md = pf.metadata
        self._check_rows(shard, path, md.num_rows)
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        if sizes != self._group_sizes[shard]:
            raise CacheError(
                f"{path}: row groups of {sizes} rows, manifest.json says {self._group_sizes[shard]} (the file "
                f"changed after precompute); delete it and {RERUN}"
            )
        shapes = self.manifest.shards[shard].get("shapes")
        arrow_schema = (md.metadata or {}).get(b"ARROW:schema")  # the serialized schema pyarrow wrote (no parse)
        key = (arrow_schema, repr(sorted(shapes.items())) if shapes else None)
        if arrow_schema is None or key not in self._schemas_ok:
            schema = pf.schema_arrow
            self._check_columns(shard, path, schema)
            self._schemas_ok[key] = LOSS_MASK in schema.names
        self._has_mask[shard] = self._schemas_ok[key]
        self._unverified.discard(shard)

    def _check_finite(self, shard: int, rg: int, data: dict[str, torch.Tensor | tuple]) -> None:
        """Raise a CacheError naming the first row of this row group with a NaN/inf value."""
        for col, t in data.items():
            values, offsets = t if isinstance(t, tuple) else (t, None)
            if _all_finite(values):
                continue
            bad = ~torch.isfinite(values.flatten(1) if values.ndim > 1 else values[:, None]).all(dim=1)
            if not bool(bad.any()):
                continue
            i = int(bad.nonzero()[0, 0])
            if offsets is not None:  # a value index → its row
                i = int(torch.searchsorted(offsets, torch.tensor(i), right=True)) - 1
            key = self._file(shard).read_row_group(rg, columns=["key"]).column("key")[i].as_py()
            row = self._rg_starts[shard][rg] + i  # filled by `_locate`, which every read goes through
            path = self.dir / self._files[shard]
            raise CacheError(
                f"{path}: row {row} (key {key!r}) has NaN/inf values in {col!r}. Remove or fix the source image "
                f"{key!r} and rerun `flowtrain prepare` + `flowtrain precompute`, or delete {path.name} and "
                "rerun precompute if the encoders were at fault"
            )

    def empty_batch(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning columns as a collated batch of 1 (caption dropout, CFG's negative)."""
        row = load_tensors(self.dir / self.manifest.empty_prompt)
        return self.collate([row])

    def _file(self, shard: int) -> pq.ParquetFile:
        pf = self._pf.get(shard)
        if pf is not None:
            self._pf.move_to_end(shard)
            return pf
        path = self._shard_path(shard)
        try:
            pf = open_parquet(path)  # opened lazily: DataLoader workers each open their own
        except Exception as e:
            if shard in self._unverified:  # first seen now: the same clear errors as at open
                self._check_readable(path, e)
            raise
        if shard in self._unverified:  # its place came from the manifest's layout: check the footer agrees
            self._check_opened(shard, path, pf)
        self._pf[shard] = pf
        if len(self._pf) > OPEN_SHARDS:
            self._pf.popitem(last=False)  # closed when collected
        return pf

    def _shard_path(self, shard: int) -> Path | FsPath:
        if isinstance(self.dir, FsPath) and self._pid != os.getpid():
            # A forked DataLoader worker: fsspec's async filesystems (s3fs, gcsfs) refuse to be used from another
            # process than their own ("not fork-safe"), so the worker makes its own from the URL.
            self.dir, self._pid = as_path(str(self.dir)), os.getpid()
        return self.dir / self._files[shard]

    def _locate(self, index: int) -> tuple[int, int, int]:
        """(shard, row group, row within it) of a row, from the manifest's layout (no file is opened)."""
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        starts = self._rg_starts.get(shard)
        if starts is None:
            starts = self._rg_starts[shard] = list(itertools.accumulate(self._group_sizes[shard][:-1], initial=0))
        rg = bisect.bisect_right(starts, local) - 1
        return shard, rg, local - starts[rg]

    def _row_group(self, shard: int, rg: int) -> dict[str, torch.Tensor | tuple]:
        key = (shard, rg)
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        data = self._load(shard, rg)
        self._lru[key] = data
        if len(self._lru) > self._lru_size:
            self._lru.popitem(last=False)
        return data

    def _load(self, shard: int, rg: int) -> dict[str, torch.Tensor | tuple]:
        """One row group, decoded: {column: tensor (or (values, offsets) for a variable-length column)}."""
        pf = self._file(shard)
        names = [c.name for c in self.columns] + ([LOSS_MASK] if self._has_mask[shard] else [])
        table = pf.read_row_group(rg, columns=names)
        # Shared with Arrow, not copied: rows are only ever copied out (collate stacks / pads them).
        data: dict[str, torch.Tensor | tuple] = {
            c.name: ragged_to_tensors(table.column(c.name), c.dtype, c.shape)
            if c.variable
            else column_to_tensor(table.column(c.name), c.dtype, copy=False)
            for c in self.columns
        }
        if self._has_mask[shard]:
            data[LOSS_MASK] = _mask_tensor(table.column(LOSS_MASK))
        if (shard, rg) not in self._finite_checked:  # once per row group and process, not on every read
            self._check_finite(shard, rg, data)
            self._finite_checked.add((shard, rg))
        return data

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self._len:
            raise IndexError(index)
        shard, rg, i = self._locate(index)
        data = self._row_group(shard, rg)
        # Storage dtypes (e.g. bf16 text embeddings): half the bytes to collate, pin and copy to the device than
        # float32; `train.step.make_inputs` casts on the device.
        row: dict = {}
        for name, t in data.items():
            if isinstance(t, tuple):
                values, offsets = t
                row[name] = values[offsets[i] : offsets[i + 1]]
            else:
                row[name] = t[i]
        row["index"] = index
        return row


def _read_footer(path: Path | FsPath) -> tuple[int, pa.Schema, list[int]] | Exception:
    """(rows, Arrow schema, rows per row group) from a shard's footer, or the exception reading it raised."""
    try:
        pf = open_parquet(path)
        md = pf.metadata
        return md.num_rows, pf.schema_arrow, [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    except Exception as e:  # reported in shard order by the caller, naming the file
        return e


def _stored_shape(ty: pa.DataType) -> list[int | None] | None:
    """The per-row tensor shape a column's Arrow type stores: a fixed-shape tensor's shape, or [None, width] for a
    variable-length list of fixed-size lists."""
    if hasattr(ty, "shape"):
        return list(ty.shape)
    if pa.types.is_list(ty) and pa.types.is_fixed_size_list(ty.value_type):
        return [None, ty.value_type.list_size]
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """Whether a row group's tensor holds no NaN/inf: the fast screen before the per-row check.

    Large tensors: one multi-threaded sum (NaN/inf anywhere makes it non-finite; a finite overflow only sends us to
    the exact check) — ~15× cheaper than `isfinite` on a row group of 8 MiB rows. Small ones: numpy,
    single-threaded, since waking torch's intra-op threads costs more than the check itself.
    """
    if not t.is_floating_point():
        return True
    if t.numel() >= 1 << 20:
        return bool(torch.isfinite(t.sum()))
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: inf and NaN are the patterns with every exponent bit set
        return not bool(((t.view(torch.int16).numpy() & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(t.numpy()).all())


def _mask_tensor(column) -> torch.Tensor:
    """A loss_mask column → (B, 1) for a plain float column (per-sample weights), else (B, *shape) float32."""
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column_to_tensor(column, "float32").float()
    return torch.from_numpy(as_numpy(column).astype("float32")).unsqueeze(1)


@dataclass(frozen=True)
class Collate:
    """Rows → a batch of (B, ...) tensors; `index` becomes (B,) int64. A variable-length column `c` is zero-padded to
    the batch's longest row and gets a (B, L_max) bool `c_mask` (True on real rows). Picklable, for workers."""

    variable: tuple[str, ...] = ()
    pad_to: tuple[tuple[str, int], ...] = ()  # (column, length): pad to this length, not to the batch's longest

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        lengths = dict(self.pad_to)
        for name in rows[0]:
            if name == "index":
                batch[name] = torch.tensor([r[name] for r in rows], dtype=torch.int64)
            elif name in self.variable:
                batch[name], batch[f"{name}_mask"] = pad_rows([r[name] for r in rows], lengths.get(name))
            else:
                batch[name] = _stack([r[name] for r in rows])
        return batch


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; in a DataLoader worker straight into shared memory (as torch's default_collate does), which
    the batch would otherwise be copied into to reach the main process."""
    from torch.utils.data import get_worker_info

    out = None
    if get_worker_info() is not None:
        first = tensors[0]
        storage = first.untyped_storage()._new_shared(sum(t.nbytes for t in tensors), device=first.device)
        out = first.new_empty(0).set_(storage).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def block_permutation(blocks: Sequence[int], seed: int, epoch: int, window: int) -> torch.Tensor:
    """A row order that reads each block of rows once: `blocks` (rows per block, contiguous, in row order: the
    cache's row groups, or runs of them, `CacheDataset.block_sizes`) in a random order, and the rows of each
    `window` consecutive blocks of that order shuffled together. A pure function of (blocks, seed, epoch).

    A global permutation touches a random row group for every row: with rows of ~8 MiB (16 to a row
    group) and a cache larger than the reader's LRU, every row would decode a whole row group.
    """
    return torch.cat(list(block_permutation_windows(blocks, seed, epoch, window)))


def block_permutation_windows(blocks: Sequence[int], seed: int, epoch: int, window: int) -> Iterator[torch.Tensor]:
    """`block_permutation`, one window at a time (each a 1-D tensor of row indices; concatenated, the epoch's order).

    Lazy on purpose: the first batch of a 1M-row cache needs one window, not the ~8k window shuffles of the whole
    epoch (those took most of the start-up, benchmarks/scale.py). Each window's shuffle is drawn from the one
    generator in window order, so the order does not depend on how far a reader goes.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    sizes = np.asarray(blocks, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    order = torch.randperm(len(sizes), generator=g).numpy()
    for k in range(0, len(order), window):
        picked = order[k : k + window]
        # the rows of this window's blocks, in block order (a few aranges: cheaper than one repeat_interleave)
        spans = zip(starts[picked], sizes[picked], strict=True)
        rows = torch.from_numpy(np.concatenate([np.arange(a, a + n) for a, n in spans]))
        yield rows[torch.randperm(len(rows), generator=g)]


class _Rows:
    """Reads a stream of 1-D index tensors as one sequence: `take(n)` the next n, `skip(n)` past n."""

    def __init__(self, pieces: Iterator[torch.Tensor]):
        self._pieces, self._head = pieces, torch.empty(0, dtype=torch.int64)

    def take(self, n: int) -> torch.Tensor:
        parts, have = [self._head], len(self._head)
        while have < n:
            piece = next(self._pieces)  # the sampler never asks past the epoch's rows
            parts.append(piece)
            have += len(piece)
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        self._head = rows[n:]
        return rows[:n]

    def skip(self, n: int) -> None:
        if n > 0:
            self.take(n)


def resolve_shuffle_window(configured: int | None, blocks: Sequence[int], lru_blocks: int) -> int:
    """`dataset.shuffle_window`: None (auto) → 0 (one global permutation) when every block fits in the reader's
    LRU or blocks hold at most 2 rows (rows of several MiB: a row's read is its block's read), else a window of
    as many blocks as the LRU holds."""
    if configured is not None:
        return configured
    if len(blocks) <= lru_blocks or int(np.max(blocks)) <= 2:
        return 0
    return lru_blocks


def epoch_permutation(num_rows: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The row order of one epoch; a pure function of (seed, epoch) so resume can rebuild it."""
    if not shuffle:
        return torch.arange(num_rows)
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class ResumableSampler(Sampler[int]):
    """Yields row indices for one rank, epoch after epoch, starting at (epoch, batch) — exact resume.

    Each epoch's permutation is split into `batch_size * world_size` blocks; rank r takes the r-th slice of each
    block, and the incomplete tail is dropped so every rank runs the same number of steps (DDP needs that).
    With `blocks` (rows per shuffle block, in row order: `CacheDataset.shuffle_blocks`) and `shuffle_window` > 0,
    the permutation is a `block_permutation` (each block read once an epoch); otherwise one global permutation.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_epoch: int = 0,
        start_batch: int = 0,
        blocks: Sequence[int] | None = None,
        shuffle_window: int = 0,
    ):
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        # an array, not a list: a 1M-row cache has thousands of blocks; start-up should not walk them in Python
        self.blocks = np.asarray(blocks if blocks is not None else [], dtype=np.int64)
        if blocks is not None and int(self.blocks.sum()) != num_rows:
            raise ValueError(f"blocks add up to {int(self.blocks.sum())} rows, the cache has {num_rows}")
        self.shuffle_window = shuffle_window
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.batches_per_epoch = num_rows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the cache has {num_rows} rows, fewer than one global batch "
                f"(train.batch_size={batch_size} × {world_size} processes): lower train.batch_size or add data"
            )

    def __iter__(self) -> Iterator[int]:
        epoch, first = self.start_epoch, self.start_batch
        global_batch = self.batch_size * self.world_size
        while True:
            order = _Rows(self.permutation_windows(epoch))
            order.skip(first * global_batch)  # resume: the windows before the position are drawn, not kept
            for _ in range(first, self.batches_per_epoch):
                block = order.take(global_batch)
                yield from block[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            epoch, first = epoch + 1, 0

    def permutation(self, epoch: int) -> torch.Tensor:
        """The row order of `epoch` (all rows, before the split into batches and ranks)."""
        return torch.cat(list(self.permutation_windows(epoch)))

    def permutation_windows(self, epoch: int) -> Iterator[torch.Tensor]:
        """`permutation(epoch)` in consecutive pieces, made as they are asked for (`block_permutation_windows`)."""
        if self.shuffle and len(self.blocks) and self.shuffle_window > 0:
            return block_permutation_windows(self.blocks, self.seed, epoch, self.shuffle_window)
        return iter([epoch_permutation(self.num_rows, self.seed, epoch, self.shuffle)])

    def position_after(self, batches_consumed: int) -> tuple[int, int]:
        """(epoch, batch) of the next batch after `batches_consumed` batches since the start position."""
        total = self.start_epoch * self.batches_per_epoch + self.start_batch + batches_consumed
        return divmod(total, self.batches_per_epoch)
