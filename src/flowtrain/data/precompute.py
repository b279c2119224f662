"""`flowtrain precompute`: raw shards → latent cache (VAE moments + text embeddings), once.

Output (see docs/cache-format.md): `cache-{raw:05d}-{chunk:04d}.parquet` shards, `empty_prompt.safetensors`
(for caption dropout) and `manifest.json` with the fingerprint that `train` checks.

Interrupted runs continue: each cache shard is written to a temporary name and renamed when complete, so a rerun
skips the shards that exist and recomputes only the rest; the result equals an uninterrupted run. An existing
shard is reused only when it holds exactly the keys of its raw slice (the raw shards may have been re-prepared
since), and the manifest is removed at the start and written last, so it never vouches for a half-done cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from flowtrain.data.tensors import STORAGE_DTYPES, tensor_column

log = logging.getLogger(__name__)
CACHE_KIND = "flowtrain.cache"
CACHE_VERSION = 1


@dataclass(frozen=True)
class PrecomputeSettings:
    """Everything that determines the cache content (the fingerprint is derived from it)."""

    model: str
    family: str = "flux2_klein"
    revision: str | None = None
    text_encoder_layers: tuple[int, ...] = (9, 18, 27)
    max_sequence_length: int = 512
    resolution: int = 512
    dtype: str = "bfloat16"  # encoder compute dtype and text-embedding storage dtype
    trust_remote_code: bool = False

    def fingerprint(self, latent_mean: list[float], latent_std: list[float]) -> dict[str, Any]:
        fp = {
            "family": self.family,
            "model": self.model,
            "revision": self.revision,
            "text_encoder_layers": list(self.text_encoder_layers),
            "max_sequence_length": self.max_sequence_length,
            "resolution": self.resolution,
            "dtype": self.dtype,
            "latent_stats_sha256": hashlib.sha256(json.dumps([latent_mean, latent_std]).encode()).hexdigest()[:16],
        }
        fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        return fp


def _read_raw_manifest(raw_dir: Path) -> dict:
    path = raw_dir / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {raw_dir} the output of `flowtrain prepare`?")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != "flowtrain.raw":
        raise ValueError(f"{path}: kind is {manifest.get('kind')!r}, expected 'flowtrain.raw'")
    return manifest


def _decode(rows: dict[str, list]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in rows["image"]]


ROW_GROUP_BYTES = 8 * 2**20  # target decoded size of a row group
MAX_ROWS_PER_GROUP = 16


def rows_per_group(table: pa.Table) -> int:
    """Rows per Parquet row group: up to 16, at most ~8 MiB decoded. The reader decodes a whole row group to get
    one row, so a Klein-4B row (~8 MiB: a 7.5 MiB bf16 text embedding) gets a row group of its own and random
    access costs no more than the row itself (benchmarks/loader.py); small rows keep 16 to a group."""
    row_bytes = table.nbytes / max(table.num_rows, 1)
    return int(max(1, min(MAX_ROWS_PER_GROUP, ROW_GROUP_BYTES // max(row_bytes, 1))))


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=rows_per_group(table))
    tmp.replace(path)


def precompute(
    raw_dir: str | Path,
    out: str | Path,
    settings: PrecomputeSettings,
    *,
    batch_size: int = 8,
    rows_per_shard: int = 256,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Encode every raw row once; returns the written cache manifest."""
    from flowtrain.models import get_adapter

    raw_dir, out = Path(raw_dir), Path(out)
    raw = _read_raw_manifest(raw_dir)
    if settings.dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype {settings.dtype!r} not one of {sorted(STORAGE_DTYPES)}")
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = get_adapter(settings.family)
    pipe = adapter.load_pipeline(
        settings.model,
        dtype=STORAGE_DTYPES[settings.dtype],
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
    )
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    latent_mean, latent_std = adapter.latent_stats(pipe)
    fingerprint = settings.fingerprint(latent_mean, latent_std)
    _check_existing(out, fingerprint)
    (out / "manifest.json").unlink(missing_ok=True)  # written again, last, when every shard is in place

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return adapter.encode_prompts(
            pipe, prompts, layers=list(settings.text_encoder_layers), max_length=settings.max_sequence_length
        )

    from safetensors.torch import save_file

    tmp_empty = out / "empty_prompt.safetensors.tmp"
    save_file(
        {"text_embeds": encode_text([""])[0].to("cpu", STORAGE_DTYPES[settings.dtype]).contiguous()}, str(tmp_empty)
    )
    tmp_empty.replace(out / "empty_prompt.safetensors")

    total = sum(s["rows"] for s in raw["shards"])
    bar = tqdm(total=total, desc="precompute", unit="img", disable=not progress, dynamic_ncols=True)
    shards: list[dict] = []
    t0 = time.perf_counter()
    # Decoding/resizing the next batch on a thread overlaps PIL work with the encoders (both release the GIL) when
    # they run on an accelerator. On CPU the encoders already use every core, and the thread only preempts their
    # intra-op threads: inline is ~25% faster there (benchmarks/precompute.py).
    overlap = torch.device(device).type != "cpu"
    with ThreadPoolExecutor(max_workers=1) if overlap else _Inline() as pool:
        for raw_idx, raw_shard in enumerate(raw["shards"]):
            table = pq.read_table(raw_dir / raw_shard["file"], columns=["key", "caption", "image"])
            for chunk, start in enumerate(range(0, table.num_rows, rows_per_shard)):
                name = f"cache-{raw_idx:05d}-{chunk:04d}.parquet"
                part = table.slice(start, rows_per_shard)
                if _reusable(out / name, part):  # finished by an earlier, interrupted run
                    shards.append({"file": name, "rows": part.num_rows})
                    bar.update(part.num_rows)
                    continue
                _encode_shard(part, out / name, adapter, pipe, encode_text, settings, batch_size, pool, bar)
                shards.append({"file": name, "rows": part.num_rows})
    bar.close()
    _remove_stale(out, {s["file"] for s in shards})
    manifest = _manifest(out, settings, fingerprint, latent_mean, latent_std, shards, raw_dir)
    log.info("precompute: %d rows in %.1fs → %s", manifest["num_rows"], time.perf_counter() - t0, out)
    return manifest


class _Inline:
    """The `ThreadPoolExecutor` interface, running each task at once in the calling thread."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # raised by .result(), where the thread pool would raise it too
            future.set_exception(e)
        return future


def _encode_shard(part: pa.Table, path: Path, adapter, pipe, encode_text, settings, batch_size, pool, bar) -> None:
    keys, captions = part.column("key").to_pylist(), part.column("caption").to_pylist()
    batches = [part.slice(i, batch_size).to_pydict() for i in range(0, part.num_rows, batch_size)]
    moments, embeds = [], []

    def load(rows: dict) -> torch.Tensor:
        return adapter.preprocess_images(pipe, _decode(rows), resolution=settings.resolution)

    pending = pool.submit(load, batches[0])
    for i, rows in enumerate(batches):
        pixels = pending.result()
        if i + 1 < len(batches):
            pending = pool.submit(load, batches[i + 1])
        moments.append(adapter.encode_pixels(pipe, pixels).cpu())
        embeds.append(encode_text(rows["caption"]).cpu())
        bar.update(len(rows["key"]))
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "latent_moments": tensor_column(torch.cat(moments), "float32"),
            "text_embeds": tensor_column(torch.cat(embeds), settings.dtype),
        }
    )
    _write_atomic(table, path)


def _reusable(path: Path, part: pa.Table) -> bool:
    """An existing cache shard counts as done only if it holds exactly the keys of its raw slice, in order."""
    if not path.exists():
        return False
    try:
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
    except Exception as e:  # unreadable: recompute it
        log.warning("precompute: %s is unreadable (%s); recomputing it", path, e)
        return False
    if keys != part.column("key").to_pylist():
        log.warning("precompute: %s holds other rows than its raw slice now (re-prepared data?); recomputing", path)
        return False
    return True


def _remove_stale(out: Path, current: set[str]) -> None:
    """Temporary files of interrupted writes, and shards no raw slice maps to any more."""
    for p in out.iterdir():
        stale_shard = p.name.startswith("cache-") and p.name.endswith(".parquet") and p.name not in current
        if p.is_file() and (p.name.endswith(".tmp") or stale_shard):
            p.unlink(missing_ok=True)


def _check_existing(out: Path, fingerprint: dict) -> None:
    """Refuse to mix shards of a different model/settings into an existing cache directory."""
    state = out / "precompute_state.json"
    if state.exists():
        old = json.loads(state.read_text())["fingerprint"]
        if old["id"] != fingerprint["id"]:
            diff = {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v and k != "id"}
            raise ValueError(
                f"{out} holds a cache made with different settings {diff}; use another --out, or "
                "--overwrite to replace it"
            )
    else:
        state.write_text(json.dumps({"fingerprint": fingerprint}, indent=2))


def _manifest(out, settings, fingerprint, latent_mean, latent_std, shards, raw_dir) -> dict:
    first = pq.ParquetFile(out / shards[0]["file"]).schema_arrow if shards else None
    manifest = {
        "kind": CACHE_KIND,
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "source": str(raw_dir),
        "num_rows": sum(s["rows"] for s in shards),
        "shards": shards,
        "latent_bn_mean": latent_mean,
        "latent_bn_std": latent_std,
        "latent_storage_dtype": "float32",
        "text_storage_dtype": settings.dtype,
        "latent_shape": list(first.field("latent_moments").type.shape) if first else None,
        "text_shape": list(first.field("text_embeds").type.shape) if first else None,
        "empty_prompt": "empty_prompt.safetensors",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / "manifest.json")  # written last: a cache without it is incomplete
    return manifest
