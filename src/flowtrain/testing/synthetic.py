"""Synthetic latent caches of any shape, written by precompute's own writer (no encoders run).

For loader benchmarks and tests that need Klein-sized rows or many row groups without running a VAE: the shards,
row groups, compression and manifest are exactly what `flowtrain precompute` writes; the values are Gaussian.
"""

from __future__ import annotations

from pathlib import Path


def write_synthetic_cache(
    out: Path,
    rows: int,
    *,
    latent_shape: tuple[int, ...] = (8, 16, 16),
    text_shape: tuple[int, ...] = (32, 96),
    text_dtype: str = "float32",
    rows_per_shard: int = 256,
    rows_per_group: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a Klein-layout cache of `rows` rows into `out` (skipped when `out/manifest.json` exists); returns `out`.

    latent_shape: (2C, h, w) posterior moments, stored float32; text_shape: (L, D), stored as `text_dtype`.
    rows_per_group: Parquet row-group size; None: what precompute picks for these rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from flowtrain.data.layout import with_layout
    from flowtrain.data.manifest import CacheManifest, fingerprint
    from flowtrain.data.precompute import write_shard
    from flowtrain.data.tensors import STORAGE_DTYPES, tensor_column
    from flowtrain.models import Column

    out = Path(out)
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards = []
    for i, start in enumerate(range(0, rows, rows_per_shard)):
        n = min(rows_per_shard, rows - start)
        table = pa.table(
            {
                "key": pa.array([f"row{start + j:06d}" for j in range(n)], pa.string()),
                "caption": pa.array([f"synthetic row {start + j}" for j in range(n)], pa.string()),
                "latent_moments": tensor_column(torch.randn(n, *latent_shape, generator=g), "float32"),
                "text_embeds": tensor_column(torch.randn(n, *text_shape, generator=g), text_dtype),
            }
        )
        name = f"cache-00000-{i:04d}.parquet"
        if rows_per_group is None:
            write_shard(table, out / name)
        else:
            pq.write_table(table, out / name, compression="zstd", row_group_size=rows_per_group)
        shards.append({"file": name, "rows": n})
    save_file(
        {"text_embeds": torch.zeros(text_shape, dtype=STORAGE_DTYPES[text_dtype])},
        str(out / "empty_prompt.safetensors"),
    )
    c = latent_shape[0] * 2  # patchified channels: 4 · C = 2 · (2C)
    columns = [
        Column("latent_moments", "float32", tuple(latent_shape), "image"),
        Column("text_embeds", text_dtype, tuple(text_shape), "text"),
    ]
    settings = {"text_encoder_layers": [9, 18, 27], "max_sequence_length": text_shape[0]}
    fp = fingerprint("flux2_klein", "synthetic", None, latent_shape[1] * 8, text_dtype, settings, {})
    norm = {"bn_mean": [0.0] * c, "bn_std": [1.0] * c}
    CacheManifest("flux2_klein", fp, columns, norm, with_layout(out, shards), source=str(out)).write(out)
    return out
