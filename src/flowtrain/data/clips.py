"""Precompute's video path: raw rows → clips (`dataset.video`) → pixels for the family's encoder (docs/video.md).

It is on when the raw shards hold videos; otherwise precompute runs its image path unchanged (a video family gets
images there as (B, 3, H, W), one-frame videos, and `cache_columns` without `frames`: its default of 1). One raw
row becomes as many cache rows as `video.select_clips` gives it (an image row is a one-frame video, kept unless
`dataset.video.images` is false), each keyed by the raw key (`KEY#i` for the i-th clip of `chunk` / `slide`). Each
cache shard holds clips of one frame count: with `frames` > 1 a slice's image rows get a shard of their own, whose
manifest entry records its `frames` and the column `shapes` that differ from the declared ones (the sampler batches
within one frame count, as it batches within one aspect-ratio bucket: `data.bucket_sampler`). The plan is a pure
function of the raw shard's metadata columns, so an interrupted precompute knows which keys each cache shard must
hold without decoding anything.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flowtrain.config.video import VideoConfig
from flowtrain.data.arrays import byte_strings, int_lists, numeric
from flowtrain.data.fs import read_table
from flowtrain.data.video import VIDEO_FORMATS, decode_frames, row_frames, select_clips

log = logging.getLogger(__name__)
RAW_COLUMNS = ("key", "caption", "image", "format", "num_frames", "fps")
FRAMES, RAW_ROW = "frames", "raw_row"  # the plan's extra columns: source frame indices, row in the raw slice


def is_video_family(family: Any) -> bool:
    """Whether the family's VAE encodes clips, declared by a `frames` keyword in its `cache_columns` (models/base.py):
    then `encode_pixels` takes (B, 3, F, H, W). The signature itself is the declaration, so it cannot disagree with
    what the family accepts."""
    return "frames" in inspect.signature(family.cache_columns).parameters


def clip_options(family: Any, raw_manifest: dict, video: VideoConfig | None) -> VideoConfig | None:
    """The clip settings precompute runs with, or None for the image path (the raw shards hold no video).
    ValueError when an image family is asked for clips of more than one frame."""
    if raw_manifest.get("videos", 0) == 0:
        return None
    video = video or VideoConfig()
    if not is_video_family(family) and video.frames != 1:
        raise ValueError(
            f"the raw shards hold {raw_manifest.get('videos')} video(s) and family {family.name!r} encodes images: "
            f"set dataset.video.frames: 1 to cache single frames of them (dataset.video.selection says which), or "
            f"use a video family (docs/video.md)"
        )
    return video


def holds_images(raw_manifest: dict) -> bool:
    """Whether a raw folder (its manifest) holds image rows next to its videos."""
    return sum(int(s["rows"]) for s in raw_manifest.get("shards", [])) > int(raw_manifest.get("videos", 0))


def clip_settings(options: VideoConfig | None, raw_manifest: dict) -> dict | None:
    """What of the clip options changes the cache (it goes into the fingerprint); None on the image path.

    `images` enters only where it changes what is cached from what flowtrain cached before the option existed
    (image rows at `frames: 1` only): every such cache keeps its fingerprint, while the cache of a folder with
    images at `frames` > 1, which now holds them, gets a new one, so a stale cache without them is never reused."""
    if options is None:
        return None
    settings = options.model_dump(exclude={"images"})
    if holds_images(raw_manifest) and options.images != (options.frames == 1):
        settings["images"] = options.images
    return settings


def planned_slices(
    table: pa.Table, raw_index: int, rows_per_shard: int, options: VideoConfig
) -> tuple[list[tuple[str, int | None, pa.Table]], int]:
    """A raw shard's clips as precompute writes them: (cache shard name, frame count, clip rows) per slice of
    `rows_per_shard` raw rows and frame count, slices without a clip left out; plus how many raw rows gave no clip.

    The frame count is None for clips of `options.frames` (the declared columns' shapes), in shard
    `cache-RRRRR-CCCC.parquet` as always; a slice's clips of another count (images as one-frame clips) go into
    `cache-RRRRR-CCCC-fNNN.parquet`, NNN the count."""
    slices, left_out = [], 0
    for chunk, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        part, dropped = plan(table.slice(start, rows_per_shard), options)
        left_out += dropped
        for frames, rows in by_frame_count(part, options.frames):
            suffix = "" if frames is None else f"-f{frames:03d}"
            slices.append((f"cache-{raw_index:05d}-{chunk:04d}{suffix}.parquet", frames, rows))
    return slices, left_out


def by_frame_count(part: pa.Table, frames: int) -> list[tuple[int | None, pa.Table]]:
    """A plan's rows split by clip length, each group in plan order: (None, clips of `frames`) first, then
    (n, clips of n frames) by n; groups without rows left out. A plan of one length is returned as is."""
    lengths = pc.list_value_length(part.column(FRAMES)).to_pylist()
    rows: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        rows[n].append(i)
    if set(rows) <= {frames}:
        return [(None, part)] if part.num_rows else []
    order = sorted(rows, key=lambda n: (n != frames, n))
    return [(None if n == frames else n, part.take(numeric(rows[n], pa.int64()))) for n in order]


def differing_shapes(columns: list[Any], other: list[Any]) -> dict[str, list[int]]:
    """The per-row shapes of `other` (the family's columns for another frame count) that differ from `columns`
    (the cache's declared ones): what a shard of that frame count records as its manifest `shapes`."""
    declared = {c.name: c.shape for c in columns}
    return {c.name: list(c.shape) for c in other if tuple(c.shape) != tuple(declared[c.name])}


def plan(part: pa.Table, options: VideoConfig) -> tuple[pa.Table, int]:
    """A raw slice → one row per clip: key, caption, image (dictionary-encoded: a video's bytes are not copied per
    clip), `frames` (its source frame indices) and `raw_row`; plus how many raw rows gave no clip (videos shorter
    than one clip; image rows when `options.images` is false)."""
    names = set(part.column_names)
    n = part.num_rows
    formats = part.column("format").to_pylist() if "format" in names else [None] * n
    counts = part.column("num_frames").to_pylist() if "num_frames" in names else [1] * n
    rates = part.column("fps").to_pylist() if "fps" in names else [None] * n
    keys, captions = part.column("key").to_pylist(), part.column("caption").to_pylist()
    out_keys, out_captions, rows, frames = [], [], [], []
    left_out = 0
    several = options.selection in ("chunk", "slide")
    for i in range(n):
        if formats[i] in VIDEO_FORMATS:
            clips = select_clips(
                counts[i] or 0,
                options.frames,
                options.selection,
                fps=rates[i],
                target_fps=options.target_fps,
                stride=options.stride,
                max_clips=options.max_clips,
            )
        else:  # an image: a one-frame clip, whatever the frame count of the videos' clips
            clips = [[0]] if options.images else []
        left_out += not clips
        for c, indices in enumerate(clips):
            out_keys.append(f"{keys[i]}#{c}" if several and formats[i] in VIDEO_FORMATS else keys[i])
            out_captions.append(captions[i])
            rows.append(i)
            frames.append(indices)
    columns = {"key": byte_strings(out_keys), "caption": byte_strings(out_captions)}
    if "image" in names:  # absent when only counting (`plan_size`)
        # 64-bit offsets: a slice of videos can pass the 2 GiB that one `binary` array can address
        image = part.column("image").cast(pa.large_binary()).combine_chunks()
        columns["image"] = pa.DictionaryArray.from_arrays(numeric(rows, pa.int32()), image)
    columns |= {
        "format": byte_strings([formats[r] for r in rows]),
        FRAMES: int_lists(frames),
        RAW_ROW: numeric(rows, pa.int32()),
    }
    return pa.table(columns), left_out


def frame_counts(manifest: Any) -> dict[int, int]:
    """Rows per clip length of a cache (`CacheManifest`) made on the clip path, longest first: {frames: rows}; the
    shards without `frames` hold clips of `dataset.video.frames` (the fingerprint's)."""
    declared = int(manifest.fingerprint.get("settings", {}).get("video", {}).get("frames", 1))
    counts: dict[int, int] = defaultdict(int)
    for shard, frames in zip(manifest.shards, manifest.shard_frames, strict=True):
        counts[frames or declared] += int(shard["rows"])
    return dict(sorted(counts.items(), reverse=True))


def raw_columns(path: Any) -> list[str]:
    """The columns of a raw shard the plan reads (shards prepared before videos were supported lack some)."""
    names = set(pq.read_schema(path).names)
    return [c for c in RAW_COLUMNS if c in names]


def plan_size(path: Any, options: VideoConfig, rows_per_shard: int) -> int:
    """How many cache rows `plan` makes of a raw shard, from its metadata columns only: the progress total."""
    meta = read_table(path, columns=[c for c in raw_columns(path) if c != "image"])
    starts = range(0, meta.num_rows, rows_per_shard)
    return sum(plan(meta.slice(s, rows_per_shard), options)[0].num_rows for s in starts)


def clip_pixels(family: Any, encoders: Any, rows: dict[str, list], resolution: int) -> Any:
    """A batch of planned clips (`plan` rows, as a pydict) → pixels for `family.encode_pixels`: (B, 3, F, H, W) for
    a video family, (B, 3, H, W) (one-frame clips) for an image family; in [-1, 1], each frame through the family's
    own `preprocess_images` (the pipeline's resize and crop). A video is decoded once per batch for all its clips."""
    import torch

    wanted: dict[int, set[int]] = defaultdict(set)
    for r, indices in zip(rows[RAW_ROW], rows[FRAMES], strict=True):
        wanted[r].update(indices)
    decoded: dict[int, dict[int, Any]] = {}
    for i, r in enumerate(rows[RAW_ROW]):
        if r in decoded:
            continue
        order = sorted(wanted[r])
        if rows["format"][i] in VIDEO_FORMATS:
            images = decode_frames(rows["image"][i], order)
        else:  # an image: one frame
            images = row_frames({"image": rows["image"][i], "key": rows["key"][i], "format": None}, order)
        decoded[r] = dict(zip(order, images, strict=True))
    clips = [
        family.preprocess_images(encoders, [decoded[r][f] for f in indices], resolution=resolution)
        for r, indices in zip(rows[RAW_ROW], rows[FRAMES], strict=True)
    ]  # each (F, 3, res, res)
    if is_video_family(family):
        return torch.stack(clips).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W) → (B, 3, F, H, W), the VAE's layout
    return torch.cat(clips)  # one frame each: (B, 3, H, W)


def log_left_out(left_out: int, options: VideoConfig, cached: int) -> None:
    """Say how many raw rows gave no clip; ValueError when none gave one (an empty cache trains nothing)."""
    what = f"clip of {options.frames} frame(s) (selection {options.selection}, target_fps {options.target_fps})"
    why = "videos too short, or images with dataset.video.images false (docs/video.md)"
    if cached == 0:
        raise ValueError(f"no raw row gave a {what}: {why}; lower dataset.video.frames or target_fps")
    if left_out:
        log.warning("precompute: %d raw row(s) gave no %s and are not cached: %s", left_out, what, why)
