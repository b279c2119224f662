"""Arrow arrays built from numpy buffers and Python values, without `pa.array` / `pa.Table.from_pylist`.

Why not pyarrow's own constructors: the first time a process calls `pa.array`, `pa.scalar` or `from_pylist`,
pyarrow imports pandas, only to ask whether the input is a pandas object (`pandas-shim.pxi`; it has no switch).
That import cost every `flowtrain prepare`, `precompute` and `train --from` 0.27 s and 37 MiB of resident memory
(the 2-core dev VM; more than all of `prepare`'s own work on 32 images), and nothing of ours uses pandas. Building
from buffers (`pa.Array.from_buffers`) is what `pa.array` does underneath for these simple types, and stays
zero-copy for numeric data. `tests/data/test_arrays.py` checks each builder against `pa.array` and that no
training-path verb imports pandas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def _np_dtype(type: pa.DataType) -> np.dtype:
    """The numpy dtype of an Arrow integer or floating type (not `type.to_pandas_dtype()`: it may import pandas)."""
    if pa.types.is_floating(type):
        return np.dtype(f"f{type.bit_width // 8}")
    if pa.types.is_integer(type):
        return np.dtype(f"{'i' if pa.types.is_signed_integer(type) else 'u'}{type.bit_width // 8}")
    raise TypeError(f"{type} is not an integer or floating type")


def _validity(values: Sequence[Any]) -> tuple[pa.Buffer | None, int]:
    """Arrow's validity bitmap for `values` (None where no value is None) and the null count."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    nulls = len(values) - int(valid.sum())
    return (pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None), nulls


def numeric(values: np.ndarray | Sequence[float | int], type: pa.DataType) -> pa.Array:
    """A 1-D numeric array of `type` (no nulls): from a numpy array of the same item size without a copy."""
    arr = np.ascontiguousarray(values, dtype=None if isinstance(values, np.ndarray) else _np_dtype(type))
    if arr.ndim != 1 or arr.dtype.itemsize * 8 != type.bit_width:
        raise ValueError(f"need a 1-D array of {type.bit_width}-bit items for {type}, got {arr.dtype} {arr.shape}")
    return pa.Array.from_buffers(type, len(arr), [None, pa.py_buffer(arr)])


def optional_numbers(values: Sequence[float | int | None], type: pa.DataType) -> pa.Array:
    """Python numbers (None: null) → an array of `type` (an integer or floating type)."""
    validity, nulls = _validity(values)
    data = np.fromiter((0 if v is None else v for v in values), dtype=_np_dtype(type), count=len(values))
    return pa.Array.from_buffers(type, len(values), [validity, pa.py_buffer(data)], null_count=nulls)


def byte_strings(values: Sequence[str | bytes | None], type: pa.DataType = pa.string()) -> pa.Array:
    """str (UTF-8) or bytes values (None: null) → a `string`, `binary` or their `large_` variant."""
    data = [b"" if v is None else (v.encode() if isinstance(v, str) else bytes(v)) for v in values]
    large = type in (pa.large_string(), pa.large_binary())
    offsets = np.zeros(len(data) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    validity, nulls = _validity(values)
    return pa.Array.from_buffers(
        type, len(data), [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))], null_count=nulls
    )


def int_lists(values: Sequence[Sequence[int]], type: pa.DataType = pa.list_(pa.int32())) -> pa.Array:
    """Lists of ints (no nulls) → a `list<int…>` array."""
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.fromiter((x for v in values for x in v), dtype=_np_dtype(type.value_type))
    return pa.ListArray.from_arrays(numeric(offsets, pa.int32()), numeric(flat, type.value_type))


def as_numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer or floating array without nulls as a read-only numpy view of its buffer (`Array.to_numpy` imports
    pandas too). Respects a slice's offset."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.null_count:
        raise ValueError(f"as_numpy: the array has {array.null_count} nulls")
    dtype = _np_dtype(array.type)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def table_from_rows(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """`pa.Table.from_pylist(rows, schema=schema)` for string, binary and numeric fields (a missing key: null)."""
    arrays = []
    for f in schema:
        column = [r.get(f.name) for r in rows]
        if f.type in (pa.string(), pa.binary(), pa.large_string(), pa.large_binary()):
            arrays.append(byte_strings(column, f.type))
        elif pa.types.is_integer(f.type) or pa.types.is_floating(f.type):
            arrays.append(optional_numbers(column, f.type))
        else:
            raise TypeError(f"table_from_rows: field {f.name!r} has type {f.type}, which it does not build")
    return pa.Table.from_arrays(arrays, schema=schema)
