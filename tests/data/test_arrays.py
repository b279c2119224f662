"""`flowtrain.data.arrays`: Arrow arrays built from buffers equal what `pa.array` / `from_pylist` build, and the
whole `train --from` chain (prepare, precompute, train, for an image and a video family) never imports pandas,
which any `pa.array` call would (0.27 s and 37 MiB at every start)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import yaml

from flowtrain.data import arrays as A
from flowtrain.testing.data import TINY_RES, make_image_folder, tiny_config_dict


def _same(built: pa.Array, reference: pa.Array) -> None:
    built.validate(full=True)
    assert built.type == reference.type and built.equals(reference), (built, reference)


def test_strings_and_binaries_with_nulls():
    values = ["a", None, "héllo", ""]
    _same(A.byte_strings(values), pa.array(values, pa.string()))
    _same(A.byte_strings(values, pa.large_string()), pa.array(values, pa.large_string()))
    blobs = [b"\x00\x01", b"", None, bytes(range(256))]
    _same(A.byte_strings(blobs, pa.binary()), pa.array(blobs, pa.binary()))
    _same(A.byte_strings(blobs, pa.large_binary()), pa.array(blobs, pa.large_binary()))
    _same(A.byte_strings([]), pa.array([], pa.string()))


@pytest.mark.parametrize("type_", [pa.int32(), pa.int64(), pa.uint16(), pa.float16(), pa.float32(), pa.float64()])
def test_numbers(type_):
    data = np.arange(7).astype(pa.array([], type_).to_numpy(zero_copy_only=False).dtype)
    _same(A.numeric(data, type_), pa.array(data, type_))
    optional = [1, None, 3] if pa.types.is_integer(type_) else [1.5, None, -2.0]
    _same(A.optional_numbers(optional, type_), pa.array(optional, type_))


def test_numeric_is_zero_copy_and_checks_the_item_size():
    data = np.arange(4, dtype=np.float32)
    assert np.shares_memory(A.numeric(data, pa.float32()).to_numpy(), data)
    with pytest.raises(ValueError, match="32-bit"):
        A.numeric(np.arange(4, dtype=np.float64), pa.float32())


def test_as_numpy_views_a_slice_and_refuses_nulls():
    data = np.arange(10, dtype=np.int32)
    sliced = pa.array(data).slice(3, 4)
    np.testing.assert_array_equal(A.as_numpy(sliced), data[3:7])
    np.testing.assert_array_equal(A.as_numpy(pa.chunked_array([sliced, sliced])), np.r_[data[3:7], data[3:7]])
    with pytest.raises(ValueError, match="nulls"):
        A.as_numpy(pa.array([1, None], pa.int32()))


def test_int_lists_and_rows_to_table():
    lists = [[1, 2], [], [3]]
    _same(A.int_lists(lists), pa.array(lists, pa.list_(pa.int32())))
    schema = pa.schema({"key": pa.string(), "image": pa.binary(), "width": pa.int32(), "fps": pa.float32()})
    rows = [{"key": "a", "image": b"12", "width": 3}, {"key": "b", "image": b"", "width": None, "fps": 2.5}]
    built = A.table_from_rows(rows, schema)
    built.validate(full=True)
    assert built.equals(pa.Table.from_pylist(rows, schema=schema))
    with pytest.raises(TypeError, match="list"):
        A.table_from_rows([{"x": [1]}], pa.schema({"x": pa.list_(pa.int32())}))


CHAIN = """
import json, sys
from flowtrain.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "pandas": "pandas" in sys.modules}))
"""


@pytest.mark.parametrize("family", ["flux2_klein", "wan"])
def test_train_from_images_never_imports_pandas(family, tmp_path):
    from flowtrain.models import get_family

    pipeline = get_family(family).save_tiny_pipeline(tmp_path / "pipeline")
    cfg = tiny_config_dict(pipeline, tmp_path / "cache", tmp_path / "run", family=family, max_steps=2)
    cfg["checkpoint"] = {"every_steps": None, "final": False}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    make_image_folder(tmp_path / "src", n=4)
    argv = ["train", "cfg.yaml", "--from", "src", "--resolution", str(TINY_RES), "--quiet"]
    proc = subprocess.run([sys.executable, "-c", CHAIN, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "pandas": False}
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
