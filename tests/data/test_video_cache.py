"""The generic cache plumbing with a video family's rows: per-row latent moments of rank 4 (2C, F', H', W') are
written by precompute's own writer, validated and read by the training reader, and batched to (B, 2C, F', H', W')."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from flowtrain.data.cache import CacheDataset, Collate
from flowtrain.data.manifest import CacheError, CacheManifest
from flowtrain.data.precompute import column_array, write_shard
from flowtrain.models import Column

LATENT = Column("latent_moments", "float32", (32, 2, 4, 4), "image")  # 5 frames at 32 px through an 8×/4× VAE
TEXT = Column("prompt_embeds", "bfloat16", (None, 8), "text", max_length=6)


def write_cache(out, moments: torch.Tensor, texts: list[torch.Tensor], latent: Column = LATENT) -> None:
    out.mkdir()
    n = moments.shape[0]
    table = pa.table({"key": [f"clip#{i}" for i in range(n)], "caption": ["a clip"] * n,
                      LATENT.name: column_array(latent, moments), TEXT.name: column_array(TEXT, texts)})  # fmt: skip
    write_shard(table, out / "cache-00000-0000.parquet")
    fp = {"id": "test", "resolution": 32}
    CacheManifest("wan", fp, [LATENT, TEXT], {}, [{"file": "cache-00000-0000.parquet", "rows": n}]).write(out)


def test_rank4_rows_are_read_and_batched_to_five_dimensions(tmp_path):
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(5, *LATENT.shape, generator=g)
    texts = [torch.randn(length, 8, generator=g) for length in (3, 6, 1, 4, 2)]
    write_cache(tmp_path / "cache", moments, texts)
    ds = CacheDataset(tmp_path / "cache")
    assert torch.equal(ds[3]["latent_moments"], moments[3])
    loader = DataLoader(ds, batch_size=2, collate_fn=Collate(variable=("prompt_embeds",)))
    batch = next(iter(loader))
    assert batch["latent_moments"].shape == (2, 32, 2, 4, 4)
    assert torch.equal(batch["latent_moments"], moments[:2])
    assert batch["prompt_embeds"].shape == (2, 6, 8) and batch["prompt_embeds_mask"].sum(1).tolist() == [3, 6]


def test_a_frame_count_other_than_declared_is_refused_when_written_and_when_read(tmp_path):
    nine = torch.zeros(2, 32, 3, 4, 4)  # 9 frames' latents, where the family declared 5 frames'
    with pytest.raises(ValueError, match=r"encoded rows of shape \[32, 3, 4, 4\], the family declared \[32, 2, 4, 4\]"):
        column_array(LATENT, nine)
    write_cache(
        tmp_path / "cache", nine, [torch.zeros(2, 8)] * 2, latent=Column(LATENT.name, "float32", (32, 3, 4, 4), "image")
    )
    with pytest.raises(CacheError, match=r"holds tensors of shape \[32, 3, 4, 4\], manifest.json says \[32, 2, 4, 4\]"):
        CacheDataset(tmp_path / "cache")
