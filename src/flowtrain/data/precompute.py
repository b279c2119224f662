"""`flowtrain precompute`: raw shards → latent cache (VAE moments + text conditioning), once.

Generic over model families: the family (`model.family`) encodes, and declares the columns it writes. Output
(see docs/cache-format.md): `cache-{raw:05d}-{chunk:04d}.parquet` shards, `empty_prompt.safetensors` (the ""
prompt's conditioning, for caption dropout and CFG) and `manifest.json` (`data.manifest.CacheManifest`) with the
fingerprint that `train` checks.

Interrupted runs continue: each cache shard is written to a temporary name and renamed when complete, so a rerun
skips the shards that exist and recomputes only the rest; the result equals an uninterrupted run. An existing
shard is reused only when it holds exactly the keys of its raw slice (the raw shards may have been re-prepared
since), and the manifest is removed at the start and written last, so it never vouches for a half-done cache.

On N processes (`accelerate launch -m flowtrain precompute ...`) each rank encodes its own share (of the cache
shards of a square cache, of the raw shards of a bucketed or video cache) and continues on its own after a kill;
the main rank merges the manifest at the end (`precompute_dist`).
Finished tables are written by a thread (`writer.ShardWriter`), so the encoders do not wait on Parquet.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from flowtrain.config.model import ModelOptions
from flowtrain.config.video import VideoConfig
from flowtrain.data import clips
from flowtrain.data.arrays import byte_strings
from flowtrain.data.buckets import BucketSpec, cache_slices, shard_entry
from flowtrain.data.fs import as_path, read_table
from flowtrain.data.layout import with_layout
from flowtrain.data.manifest import EMPTY_PROMPT, MANIFEST, CacheManifest, fingerprint
from flowtrain.data.precompute_dist import (
    current_ranks,
    merge,
    merge_whole,
    plan,
    raw_share,
    share,
    write_rank_record,
)
from flowtrain.data.prepare import raw_digest
from flowtrain.data.tensors import ragged_column, tensor_column
from flowtrain.data.writer import ShardWriter
from flowtrain.dtypes import torch_dtype
from flowtrain.gc_pause import loading
from flowtrain.models import Column, ModelFamily, get_family

log = logging.getLogger(__name__)
RAW_KIND = "flowtrain.raw"
STATE = "precompute_state.json"  # the fingerprint of what is being written, for a rerun to continue or refuse


def read_raw_manifest(raw_dir: str | Path) -> dict:
    """The manifest `flowtrain prepare` wrote; a clear error when the folder is not its output."""
    path = as_path(raw_dir) / "manifest.json"  # a local folder or an fsspec URL
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {raw_dir} the output of `flowtrain prepare`?")
    manifest = json.loads(path.read_bytes())
    if manifest.get("kind") != RAW_KIND:
        raise ValueError(f"{path}: kind is {manifest.get('kind')!r}, expected {RAW_KIND!r}")
    return manifest


def cache_fingerprint(
    model: ModelOptions, resolution: int, clips: dict | None = None, buckets: BucketSpec | None = None
) -> dict:
    """What a cache of `model` (the validated `model:` section) at `resolution` will be, from the options and the
    model's files alone: known before any encoder loads. `clips`: the video path's settings (`clips.clip_settings`),
    None for images; `buckets`: the aspect-ratio buckets, None for a square cache (either None leaves the
    fingerprint what it always was)."""
    family = get_family(model.family)
    settings = family.cache_settings(model) | ({"video": clips} if clips is not None else {})
    return fingerprint(family.name, model.pretrained, model.revision, resolution, model.dtype,
                       settings, family.identity(model),
                       buckets.to_json() if buckets is not None else None)  # fmt: skip


def _decode(rows: dict[str, list]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in rows["image"]]


ROW_GROUP_BYTES = 8 * 2**20  # target decoded size of a row group
MAX_ROWS_PER_GROUP = 16


def rows_per_group(table: pa.Table) -> int:
    """Rows per Parquet row group: up to 16, at most ~8 MiB decoded. The reader decodes a whole row group to get
    one row, so an ~8 MiB row (a 4B model's 512-token bf16 text embedding) gets a row group of its own and random
    access costs no more than the row itself (benchmarks/loader.py); small rows keep 16 to a group."""
    row_bytes = table.nbytes / max(table.num_rows, 1)
    return int(max(1, min(MAX_ROWS_PER_GROUP, ROW_GROUP_BYTES // max(row_bytes, 1))))


def write_shard(table: pa.Table, path: Path) -> None:
    """Write a cache shard atomically (a temporary name, renamed when complete).

    Dictionary encoding only for the string columns (key, caption). Parquet's default tries it on every column, and
    on encoder outputs, where next to no two floats repeat, it costs: a (64, 128, 128) float32 latent took 1.21× its
    raw size on disk and an 81-frame Wan clip's 1.45×, against 0.92× as plain values under zstd
    (benchmarks/scale.py --bytes), and the reader decodes the dictionary pages for nothing."""
    tmp = path.with_suffix(".parquet.tmp")
    strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    pq.write_table(table, tmp, compression="zstd", row_group_size=rows_per_group(table), use_dictionary=strings)
    tmp.replace(path)


def column_array(col: Column, values: torch.Tensor | list[torch.Tensor]) -> pa.Array:
    """One declared column's values (a (B, *shape) tensor, or B (L_i, ...) tensors when variable-length) as Arrow,
    after checking them against the declaration (a family that disagrees with itself is a bug to catch here)."""
    rows = list(values) if col.variable else None
    got = [list(r.shape) for r in rows] if rows is not None else [list(values.shape[1:])]
    for shape in got:
        if len(shape) != len(col.shape) or any(d is not None and d != g for d, g in zip(col.shape, shape, strict=True)):
            raise ValueError(
                f"column {col.name!r}: encoded rows of shape {shape}, the family declared {list(col.shape)}"
            )
    return ragged_column(rows, col.dtype) if rows is not None else tensor_column(values, col.dtype)


def precompute(
    raw_dir: str | Path,
    out: str | Path,
    model: ModelOptions,
    *,
    resolution: int = 512,
    batch_size: int = 8,
    rows_per_shard: int = 256,
    device: str | None = None,
    progress: bool = True,
    video: VideoConfig | None = None,
    buckets: BucketSpec | None = None,
) -> CacheManifest:
    """Encode every raw row once with `model` (the validated `model:` section); returns the written manifest.
    Videos (or a video family) take the clip path, cut as `video` (`dataset.video`) says: docs/video.md.
    `buckets`: each image at its aspect-ratio bucket (`flowtrain.data.buckets`), one bucket per cache shard."""
    raw_dir, out = as_path(raw_dir), Path(out)
    if buckets is not None and resolution % buckets.multiple:  # the declared columns' latent grid is at it
        raise ValueError(
            f"resolution {resolution} is not a multiple of the model's pixel multiple {buckets.multiple}: use e.g. "
            f"{max(buckets.multiple, resolution // buckets.multiple * buckets.multiple)}"
        )
    raw = read_raw_manifest(raw_dir)
    family = get_family(model.family)
    clip_opts = clips.clip_options(family, raw, video)  # None: the image path
    if clip_opts is not None and buckets is not None:
        raise ValueError("aspect-ratio buckets are for images: video clips are cached at one size (drop --buckets)")
    ranks = current_ranks(device)  # one process, or this rank of `accelerate launch` (precompute_dist)
    # Square image caches are planned from the raw manifest alone and shared over the ranks by cache shard; a
    # bucket's or a video's cache shards depend on each row (its size, its clips), so those are shared by raw shard.
    square = clip_opts is None and buckets is None
    if ranks.world_size > 1 and device in (None, "cuda"):  # each rank its own GPU, not all of them on cuda:0
        device = ranks.device
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # What the cache will be is known from the options and the model's files: a mismatch with an existing cache in
    # `out` fails before the encoders load. It is recorded only once the options passed the loaded encoders' checks.
    fp = cache_fingerprint(model, resolution, clips.clip_settings(clip_opts, raw), buckets)
    if ranks.is_main:
        _check_existing(out, fp)
    with loading():  # imports and builds millions of long-lived objects: no collector walks meanwhile
        encoders = family.load_encoders(model, dtype=torch_dtype(model.dtype), device=device)
    family.check_options(encoders, model)
    frames = {"frames": clip_opts.frames} if clip_opts is not None and clips.is_video_family(family) else {}
    columns = family.cache_columns(encoders, model, resolution=resolution, **frames)

    @functools.cache
    def frame_shapes(n: int) -> dict[str, list[int]]:
        """The shapes a shard of n-frame clips records: the family's own columns at n frames, where they differ."""
        return clips.differing_shapes(columns, family.cache_columns(encoders, model, resolution=resolution, frames=n))

    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE).write_text(json.dumps({"fingerprint": fp}, indent=2))
        (out / MANIFEST).unlink(missing_ok=True)  # written again, last, when every shard is in place
        _save_empty_prompt(out, family, encoders, model, columns)
    ranks.barrier()  # the other ranks write into `out` once the main rank has set it up

    units = plan(raw["shards"], rows_per_shard)
    mine = share(units, ranks.rank, ranks.world_size)  # square caches
    my_raws = raw_share(len(raw["shards"]), ranks.rank, ranks.world_size)  # bucketed and video caches
    if square:
        total = sum(u.rows for u in mine)
    elif clip_opts is None:
        total = sum(raw["shards"][i]["rows"] for i in my_raws)
    else:
        total = sum(clips.plan_size(raw_dir / raw["shards"][i]["file"], clip_opts, rows_per_shard) for i in my_raws)
    desc = "precompute" if ranks.world_size == 1 else f"precompute {ranks.rank}/{ranks.world_size}"
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
               position=ranks.rank)  # fmt: skip
    t0 = time.perf_counter()
    # Decoding/resizing the next batch on a thread overlaps PIL work with the encoders (both release the GIL) when
    # they run on an accelerator. On CPU the encoders already use every core, and the thread only preempts their
    # intra-op threads: inline is ~25% faster there (benchmarks/precompute.py).
    overlap = torch.device(device).type != "cpu"
    encode = _ShardEncoder(family, encoders, model, columns, resolution, batch_size)
    table, table_of, encoded, reused = None, -1, [], []
    planned: list[dict] = []  # bucketed and video caches: [{raw, shards, left_out}] per raw shard of this rank
    with ThreadPoolExecutor(max_workers=1) if overlap else _Inline() as pool, ShardWriter(write_shard) as writer:
        if square:
            for unit in mine:
                if table_of != unit.raw:  # a rank reads only the raw shards its units come from
                    table_of = unit.raw
                    table = read_table(raw_dir / raw["shards"][unit.raw]["file"], columns=["key", "caption", "image"])
                part = table.slice(unit.start, unit.rows)
                if not _reusable(out / unit.file, part):  # else finished by an earlier, interrupted run
                    writer.submit(encode(part, pool, bar), out / unit.file)
                    encoded.append(unit.file)
                else:
                    bar.update(part.num_rows)
                    reused.append(unit.file)
        else:
            for raw_idx in my_raws:
                path = raw_dir / raw["shards"][raw_idx]["file"]
                slices, dropped = _cut_raw_shard(path, raw_idx, rows_per_shard, buckets, clip_opts)
                entries = []
                for name, bucket, n_frames, part in slices:
                    entry = shard_entry(name, part.num_rows, bucket, columns, resolution)
                    if n_frames is not None:  # clips of another length than the declared columns' (images)
                        entry |= {"frames": n_frames, "shapes": frame_shapes(n_frames)}
                    if not _reusable(out / name, part):  # else finished by an earlier, interrupted run
                        writer.submit(encode(part, pool, bar, bucket, entry.get("shapes")), out / name)
                        encoded.append(name)
                    else:
                        bar.update(part.num_rows)
                        reused.append(name)
                    entries.append(entry)
                planned.append({"raw": raw_idx, "shards": entries, "left_out": dropped})
    bar.close()
    if ranks.world_size > 1:
        write_rank_record(out, ranks, encoded, reused, None if square else planned)
    ranks.barrier()  # every rank's shards are written
    if ranks.is_main:  # the one merge, once every rank has finished its share
        if square:
            shards = merge(out, units, ranks.world_size)
        else:  # the ranks' raw shards' entries in raw order: the shards, and their order, of one process
            shards, left_out = merge_whole(out, len(raw["shards"]), ranks.world_size, planned)
            if clip_opts is not None:
                clips.log_left_out(left_out, clip_opts, cached=sum(s["rows"] for s in shards))
        _remove_stale(out, {s["file"] for s in shards})
        shards = with_layout(out, shards)  # readers open the cache without reading every footer (data.layout)
        manifest = CacheManifest(family.name, fp, columns, family.latent_norm(encoders), shards,
                                 source=str(raw_dir), source_digest=raw_digest(raw_dir))  # fmt: skip
        manifest.write(out)
        log.info("precompute: %d rows in %.1fs → %s", manifest.num_rows, time.perf_counter() - t0, out)
    ranks.barrier()  # no rank returns before the manifest is there
    return manifest if ranks.is_main else CacheManifest.read(out)


def _cut_raw_shard(
    path: Any, raw_idx: int, rows_per_shard: int, buckets: BucketSpec | None, clip_opts: VideoConfig | None
) -> tuple[list[tuple[str, tuple[int, int] | None, int | None, pa.Table]], int]:
    """A bucketed or video cache's slices of raw shard `raw_idx` at `path`, in the order one process writes them:
    (cache shard name, bucket (height, width) or None, frame count or None, rows) each; and how many raw rows gave
    no clip. Each row's bucket or clips decide the names, so they are known only here, once the shard is read."""
    if clip_opts is None:  # images grouped by bucket (data.buckets), in raw order within one
        table = read_table(path, columns=["key", "caption", "image", "width", "height"])
        return [(n, b, None, p) for n, b, p in cache_slices(table, raw_idx, rows_per_shard, buckets)], 0
    table = read_table(path, columns=clips.raw_columns(path))  # videos: one row per clip, one frame count a shard
    cut, dropped = clips.planned_slices(table, raw_idx, rows_per_shard, clip_opts)
    return [(n, None, f, p) for n, f, p in cut], dropped


def _save_empty_prompt(out: Path, family: ModelFamily, encoders: Any, model: ModelOptions, columns: list[Column]):
    """The "" prompt's conditioning, one row per text column, in the columns' storage dtypes."""
    from safetensors.torch import save_file

    encoded = family.encode_prompts(encoders, [""], model)
    row = {c.name: encoded[c.name][0].to("cpu", torch_dtype(c.dtype)).contiguous() for c in columns
           if c.source == "text"}  # fmt: skip
    tmp = out / f"{EMPTY_PROMPT}.tmp"
    save_file(row, str(tmp))
    tmp.replace(out / EMPTY_PROMPT)


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


class _ShardEncoder:
    """Encodes one raw slice into a cache table: images and captions in batches, the next batch's images decoded
    on `pool` while the encoders run."""

    def __init__(self, family, encoders, model, columns, resolution, batch_size):
        self.family, self.encoders, self.model, self.columns = family, encoders, model, columns
        self.resolution, self.batch_size = resolution, batch_size

    def _pixels(self, rows: dict, size: tuple[int, int] | None) -> torch.Tensor:
        if clips.FRAMES in rows:  # a planned clip batch (data/clips.py)
            return clips.clip_pixels(self.family, self.encoders, rows, self.resolution)
        if size is None:  # square: the family's call as it always was
            return self.family.preprocess_images(self.encoders, _decode(rows), resolution=self.resolution)
        return self.family.preprocess_images(self.encoders, _decode(rows), resolution=self.resolution, size=size)

    def __call__(
        self,
        part: pa.Table,
        pool: Any,
        bar: Any,
        size: tuple[int, int] | None = None,
        shapes: dict[str, list[int]] | None = None,
    ) -> pa.Table:
        """`size`: the (height, width) bucket of every row of `part`; None: the square `resolution`. `shapes`: the
        per-row shapes of the columns that differ from the declared ones in this shard (its manifest entry's: an
        aspect-ratio bucket's latent grid, or another clip length's latent frames)."""
        columns = self.columns
        if shapes:
            columns = [dataclasses.replace(c, shape=tuple(shapes[c.name])) if c.name in shapes else c for c in columns]
        if clips.FRAMES not in part.column_names:  # images: what the encoders read (a clip plan keeps its columns)
            part = part.select(["key", "caption", "image"])
        batches = [part.slice(i, self.batch_size).to_pydict() for i in range(0, part.num_rows, self.batch_size)]
        encoded: dict[str, list] = {c.name: [] for c in columns}
        pending = pool.submit(self._pixels, batches[0], size)
        for i, rows in enumerate(batches):
            pixels = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(self._pixels, batches[i + 1], size)
            image = self.family.encode_pixels(self.encoders, pixels)
            text = self.family.encode_prompts(self.encoders, rows["caption"], self.model)
            for c in columns:
                values = (image if c.source == "image" else text)[c.name]
                encoded[c.name].extend([v.cpu() for v in values] if c.variable else [values.cpu()])
            bar.update(len(rows["key"]))
        arrays = {
            c.name: column_array(c, encoded[c.name] if c.variable else torch.cat(encoded[c.name])) for c in columns
        }
        return pa.table(
            {
                "key": byte_strings(part.column("key").to_pylist()),
                "caption": byte_strings(part.column("caption").to_pylist()),
                **arrays,
            }
        )


def _reusable(path: Path, part: pa.Table) -> bool:
    """An existing cache shard counts as done only if it holds exactly the keys of its raw slice, in order."""
    if not path.exists():
        return False
    try:
        keys = read_table(path, columns=["key"]).column("key").to_pylist()
    except Exception as e:  # unreadable: recompute it
        log.warning("precompute: %s is unreadable (%s); recomputing it", path, e)
        return False
    if keys != part.column("key").to_pylist():
        log.warning("precompute: %s holds other rows than its raw slice now (re-prepared data?); recomputing", path)
        return False
    return True


def _remove_stale(out: Path, current: set[str]) -> None:
    """Temporary files of interrupted writes, and shards no raw slice maps to any more. Only names precompute
    writes: the folder may hold the user's own files too."""
    for p in out.iterdir():
        ours = p.name.startswith("cache-") and p.name.endswith((".parquet", ".parquet.tmp"))
        tmp = p.name in (f"{MANIFEST}.tmp", f"{EMPTY_PROMPT}.tmp") or (ours and p.name.endswith(".tmp"))
        if p.is_file() and (tmp or (ours and p.name not in current)):
            p.unlink(missing_ok=True)


def _check_existing(out: Path, fp: dict) -> None:
    """Refuse to mix shards of a different model/settings into an existing cache directory."""
    state = out / STATE
    if state.exists():
        old = json.loads(state.read_text())["fingerprint"]
        if old["id"] != fp["id"]:
            diff = {k: (old.get(k), v) for k, v in fp.items() if old.get(k) != v and k != "id"}
            raise ValueError(
                f"{out} holds a cache made with different settings {diff}; use another --out, or "
                "--overwrite to replace it"
            )
