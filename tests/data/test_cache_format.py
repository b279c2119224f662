"""docs/cache-format.md's claims: the cache is readable with pyarrow + numpy only, bf16 included."""

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from flowtrain.data.cache import CacheDataset
from flowtrain.data.tensors import column_to_tensor, tensor_column


def test_cache_readable_with_plain_pyarrow(tiny_cache):
    _, cache = tiny_cache
    m = json.loads((cache / "manifest.json").read_text())
    t = pq.read_table(cache / m["shards"][0]["file"])
    shapes = {c["name"]: c["shape"] for c in m["columns"]}
    moments = t.column("latent_moments").combine_chunks().to_numpy_ndarray()
    text = t.column("text_embeds").combine_chunks().to_numpy_ndarray()
    assert list(moments.shape[1:]) == shapes["latent_moments"] and list(text.shape[1:]) == shapes["text_embeds"]
    ds = CacheDataset(cache)
    assert np.array_equal(ds[0]["latent_moments"].numpy(), moments[0])
    assert t.column("key").to_pylist() == [f"img{i:02d}" for i in range(8)]


def test_bfloat16_roundtrip_and_numpy_recipe():
    x = torch.randn(3, 5, 7).to(torch.bfloat16)
    col = tensor_column(x, "bfloat16")
    assert torch.equal(column_to_tensor(col, "bfloat16"), x)
    bits = col.to_numpy_ndarray()  # the documented numpy-only recipe
    as_f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(as_f32, x.float().numpy())


def test_variable_length_column_numpy_recipe():
    """A variable-length column (e.g. a text embedding trimmed to its prompt's length) with numpy alone."""
    from flowtrain.data.tensors import ragged_column

    rows = [torch.randn(3, 4), torch.randn(5, 4)]
    col = ragged_column(rows, "float32")
    offsets = col.offsets.to_numpy()  # the documented recipe
    values = col.values.flatten().to_numpy().reshape(-1, 4)
    for i, r in enumerate(rows):
        assert np.array_equal(values[offsets[i] : offsets[i + 1]], r.numpy())
