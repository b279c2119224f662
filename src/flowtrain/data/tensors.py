"""Torch tensors ↔ Arrow fixed-shape tensor columns, so caches stay readable with plain pyarrow.

Arrow has no bfloat16: bf16 is stored as its raw uint16 bit pattern and the manifest says so
(`storage_dtype: bfloat16`). `docs/cache-format.md` shows how to read it back with numpy alone.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch

from flowtrain.data.arrays import as_numpy, numeric
from flowtrain.dtypes import DTYPES as STORAGE_DTYPES

_ARROW_VALUE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


def tensor_column(batch: torch.Tensor, storage_dtype: str) -> pa.ExtensionArray:
    """(B, *shape) tensor → Arrow `fixed_shape_tensor` array of B rows, cast to `storage_dtype`."""
    t = batch.detach().to("cpu", STORAGE_DTYPES[storage_dtype]).contiguous()
    arr = t.view(torch.uint16).numpy() if storage_dtype == "bfloat16" else t.numpy()
    ty = pa.fixed_shape_tensor(_ARROW_VALUE[storage_dtype], list(arr.shape[1:]))
    values = numeric(arr.reshape(-1), _ARROW_VALUE[storage_dtype])
    storage = pa.FixedSizeListArray.from_arrays(values, int(np.prod(arr.shape[1:])))
    return pa.ExtensionArray.from_storage(ty, storage)


def column_to_tensor(column: pa.ChunkedArray | pa.Array, storage_dtype: str, *, copy: bool = True) -> torch.Tensor:
    """Inverse of `tensor_column`: a fixed-shape tensor column → (B, *shape) torch tensor (storage dtype).

    `copy=False` shares Arrow's (read-only) buffer instead of copying it: for readers that only ever copy out of the
    tensor (the cache's row-group LRU), it saves a full pass over every row group. Never write to such a tensor.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    # Arrow buffers are read-only; one copy per row group gives torch a writable, owned tensor.
    arr = column.to_numpy_ndarray()
    if copy:
        t = torch.from_numpy(np.array(arr, copy=True))
    else:
        t = _from_readonly(arr)
    return t.view(torch.bfloat16) if storage_dtype == "bfloat16" else t


_silenced = False


def _from_readonly(arr: np.ndarray) -> torch.Tensor:
    """`torch.from_numpy` on Arrow's read-only memory, without the warning torch gives (once a process) that the
    array is not writable. Silenced on the first call only: a `catch_warnings` on every row group cost more than
    reading a small one (benchmarks/scale.py), and it is not thread-safe (the prefetch thread reads)."""
    global _silenced
    if _silenced:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    _silenced = True
    return t


def ragged_column(rows: list[torch.Tensor], storage_dtype: str) -> pa.ListArray:
    """B tensors of shapes (L_i, *rest) → an Arrow `list<fixed_size_list<value, prod(rest)>>` column: each row
    stored at its own length (a variable-length text embedding is not padded on disk)."""
    width = int(np.prod(rows[0].shape[1:])) if rows[0].ndim > 1 else 1
    flat = torch.cat([r.detach().reshape(r.shape[0], width) for r in rows]) if rows else torch.zeros(0, width)
    t = flat.to("cpu", STORAGE_DTYPES[storage_dtype]).contiguous()
    arr = t.view(torch.uint16).numpy() if storage_dtype == "bfloat16" else t.numpy()
    values = pa.FixedSizeListArray.from_arrays(numeric(arr.reshape(-1), _ARROW_VALUE[storage_dtype]), width)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([r.shape[0] for r in rows])
    return pa.ListArray.from_arrays(numeric(offsets, pa.int32()), values)


def ragged_to_tensors(
    column: pa.ChunkedArray | pa.Array, storage_dtype: str, row_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `ragged_column`, without copying: (all rows' values (ΣL_i, *row_shape[1:]) in the storage dtype,
    offsets (B + 1,) int64); row i is `values[offsets[i]:offsets[i + 1]]`. Never write to the values."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = torch.from_numpy(as_numpy(column.offsets).astype(np.int64))
    flat = column.flatten().flatten()  # rows → fixed-size lists → values (respects slicing offsets)
    values = _from_readonly(as_numpy(flat))  # the caller only copies out of it
    if storage_dtype == "bfloat16":
        values = values.view(torch.bfloat16)
    offsets = offsets - offsets[0]
    return values.reshape(-1, *row_shape[1:]), offsets
