"""Cache columns declared by the family: fixed-shape and variable-length columns are stored, read, collated
(variable-length ones padded per batch with a mask) and merged with class rows generically."""

from __future__ import annotations

import torch

from flowtrain.data.cache import Collate
from flowtrain.data.prior import merge_class_rows
from flowtrain.data.tensors import ragged_column, ragged_to_tensors
from flowtrain.models.common import pad_rows


def test_variable_length_rows_round_trip_and_pad_with_a_mask():
    rows = [torch.randn(3, 4), torch.randn(1, 4), torch.randn(5, 4)]
    for dtype in ("float32", "bfloat16"):
        values, offsets = ragged_to_tensors(ragged_column(rows, dtype), dtype, (None, 4))
        back = [values[offsets[i] : offsets[i + 1]] for i in range(3)]
        assert all(torch.equal(b, r.to(b.dtype)) for b, r in zip(back, rows, strict=True))
    padded, mask = pad_rows(rows)
    assert padded.shape == (3, 5, 4) and mask.sum(1).tolist() == [3, 1, 5]
    assert torch.equal(padded[1, :1], rows[1]) and not padded[1, 1:].any()  # zeros after the real tokens


def test_collate_pads_variable_columns_and_stacks_fixed_ones():
    rows = [{"text": torch.ones(2, 3), "latent": torch.zeros(4), "index": 0},
            {"text": torch.ones(4, 3), "latent": torch.ones(4), "index": 1}]  # fmt: skip
    batch = Collate(variable=("text",))(rows)
    assert batch["text"].shape == (2, 4, 3) and batch["text_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["latent"].shape == (2, 4) and batch["index"].tolist() == [0, 1]


def test_class_rows_of_other_lengths_are_re_padded():
    inst = Collate(("text",))([{"text": torch.ones(2, 3), "index": 0}])
    cls = Collate(("text",))([{"text": torch.full((5, 3), 2.0), "index": 7}])
    merged = merge_class_rows(inst, cls)
    assert merged["text"].shape == (2, 5, 3) and merged["text_mask"].sum(1).tolist() == [2, 5]
    assert merged["is_prior"].tolist() == [False, True] and merged["index"].tolist() == [0]


def test_a_fixed_length_collate_pads_to_the_declared_maximum():
    """With train.compile every batch gets one shape: variable-length columns padded to their max_length."""
    rows = [{"text": torch.ones(2, 3), "index": 0}, {"text": torch.ones(4, 3), "index": 1}]
    batch = Collate(variable=("text",), pad_to=(("text", 6),))(rows)
    assert batch["text"].shape == (2, 6, 3) and batch["text_mask"].sum(1).tolist() == [2, 4]


def test_a_variable_length_column_of_any_rank_reads_back(tmp_path):
    """A row of shape (L_i, 2, 3) is stored as L_i lists of 6 values and read back in its declared shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flowtrain.data.cache import CacheDataset
    from flowtrain.data.manifest import CacheManifest, fingerprint
    from flowtrain.models import Column

    rows = [torch.randn(1, 2, 3), torch.randn(4, 2, 3)]
    table = pa.table({"key": ["a", "b"], "caption": ["x", "y"], "x": ragged_column(rows, "float32")})
    pq.write_table(table, tmp_path / "cache-00000-0000.parquet")
    col = Column("x", "float32", (None, 2, 3), "text")
    fp = fingerprint("some_family", "m", None, 32, "float32", {}, {})
    CacheManifest("some_family", fp, [col], {}, [{"file": "cache-00000-0000.parquet", "rows": 2}]).write(tmp_path)
    ds = CacheDataset(tmp_path)
    assert torch.equal(ds[1]["x"], rows[1]) and ds[0]["x"].shape == (1, 2, 3)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["x"].shape == (2, 4, 2, 3) and batch["x_mask"].sum(1).tolist() == [1, 4]


def test_caption_dropout_keeps_a_fixed_length_batch_at_its_length():
    """Per-batch padding shrinks to the new longest row; a batch padded to the maximum (compile) keeps its shape."""
    from flowtrain.models.common import drop_rows

    rows = [torch.ones(7, 3), torch.ones(3, 3)]
    empty, drop = torch.zeros(2, 3), torch.tensor([True, False])
    per_batch, mask = pad_rows(rows)
    assert drop_rows(per_batch, mask, empty, drop)[0].shape == (2, 3, 3)  # the 7-token row was dropped
    fixed, mask = pad_rows(rows, length=10)
    out, out_mask = drop_rows(fixed, mask, empty, drop)
    assert out.shape == (2, 10, 3) and out_mask.sum(1).tolist() == [2, 3]
