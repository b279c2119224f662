"""Precompute's video path: raw rows → clips (`dataset.video`) → pixels for the family's encoder (docs/video.md).

It is on when the raw shards hold videos; otherwise precompute runs its image path unchanged (a video family gets
images there as (B, 3, H, W), one-frame videos, and `cache_columns` without `frames`: its default of 1). One raw
row becomes as many cache rows as `video.select_clips` gives it (an image row is a one-frame video), each keyed by
the raw key (`KEY#i` for the i-th clip of `chunk` / `slide`). The plan is a pure function of the raw shard's
metadata columns, so an interrupted precompute knows which keys each cache shard must hold without decoding
anything.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flowtrain.config.video import VideoConfig
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


def clip_settings(options: VideoConfig | None) -> dict | None:
    """What of the clip options changes the cache (it goes into the fingerprint); None on the image path."""
    return None if options is None else options.model_dump()


def planned_slices(
    table: pa.Table, raw_index: int, rows_per_shard: int, options: VideoConfig
) -> tuple[list[tuple[str, None, pa.Table]], int]:
    """A raw shard's clips as precompute writes them: (cache shard name, bucket (always None: clips are cached at
    one size), clip rows) per slice of `rows_per_shard` raw rows, slices without a clip left out; plus how many raw
    rows gave no clip."""
    slices, left_out = [], 0
    for chunk, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        part, dropped = plan(table.slice(start, rows_per_shard), options)
        left_out += dropped
        if part.num_rows:
            slices.append((f"cache-{raw_index:05d}-{chunk:04d}.parquet", None, part))
    return slices, left_out


def plan(part: pa.Table, options: VideoConfig) -> tuple[pa.Table, int]:
    """A raw slice → one row per clip: key, caption, image (dictionary-encoded: a video's bytes are not copied per
    clip), `frames` (its source frame indices) and `raw_row`; plus how many raw rows gave no clip (videos shorter
    than one clip; image rows when a clip has more than one frame)."""
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
        else:
            clips = [[0]] if options.frames == 1 else []
        left_out += not clips
        for c, indices in enumerate(clips):
            out_keys.append(f"{keys[i]}#{c}" if several and formats[i] in VIDEO_FORMATS else keys[i])
            out_captions.append(captions[i])
            rows.append(i)
            frames.append(indices)
    columns = {"key": pa.array(out_keys, pa.string()), "caption": pa.array(out_captions, pa.string())}
    if "image" in names:  # absent when only counting (`plan_size`)
        # 64-bit offsets: a slice of videos can pass the 2 GiB that one `binary` array can address
        image = part.column("image").cast(pa.large_binary()).combine_chunks()
        columns["image"] = pa.DictionaryArray.from_arrays(pa.array(rows, pa.int32()), image)
    columns |= {
        "format": pa.array([formats[r] for r in rows], pa.string()),
        FRAMES: pa.array(frames, pa.list_(pa.int32())),
        RAW_ROW: pa.array(rows, pa.int32()),
    }
    return pa.table(columns), left_out


def raw_columns(path: Any) -> list[str]:
    """The columns of a raw shard the plan reads (shards prepared before videos were supported lack some)."""
    names = set(pq.read_schema(path).names)
    return [c for c in RAW_COLUMNS if c in names]


def plan_size(path: Any, options: VideoConfig, rows_per_shard: int) -> int:
    """How many cache rows `plan` makes of a raw shard, from its metadata columns only: the progress total."""
    meta = pq.read_table(path, columns=[c for c in raw_columns(path) if c != "image"])
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
    why = "videos too short, or images when a clip has more than one frame (docs/video.md)"
    if cached == 0:
        raise ValueError(f"no raw row gave a {what}: {why}; lower dataset.video.frames or target_fps")
    if left_out:
        log.warning("precompute: %d raw row(s) gave no %s and are not cached: %s", left_out, what, why)
