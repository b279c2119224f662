"""Video clips: probing and decoding with PyAV, and the pure frame-selection rules (docs/video.md).

`prepare` stores a video's original bytes in the raw shards with its fps, frame count and size (`probe`, which
decodes every frame once so that a broken file is skipped there, never met in precompute). `precompute` turns
one raw row into one or more clips: `select_clips` (pure: frame indices only) says which source frames each clip
holds, and `decode_frames` decodes just those. An image row is a one-frame video.

The selection is a pure function of (frame count, fps, options), so the clip plan of a raw shard is known from
its metadata columns alone, without decoding: precompute uses that to name its cache rows and to continue an
interrupted run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".m4v"})
# The raw shard's `format` of a video row: its extension upper-cased, or `sniff_video`'s name for embedded bytes.
VIDEO_FORMATS = frozenset({e[1:].upper() for e in VIDEO_EXTENSIONS} | {"VIDEO"})
Selection = Literal["head", "uniform", "chunk", "slide"]
SELECTIONS: tuple[str, ...] = ("head", "uniform", "chunk", "slide")


class VideoError(ValueError):
    """A video that cannot be used; the message is the one-line reason `prepare` reports."""


# ---- frame counts -------------------------------------------------------------------------------------------
def nearest_valid_frames(frames: int) -> list[int]:
    """The 4k+1 counts nearest to `frames` (two on a tie, e.g. 7 → [5, 9]); never below 1."""
    low = max(1, (frames - 1) // 4 * 4 + 1)
    high = low + 4
    if frames <= low:
        return [low]
    return [low] if frames - low < high - frames else [high] if high - frames < frames - low else [low, high]


def check_frames(frames: int, key: str = "frames") -> int:
    """`frames` if it is 4k+1 (video VAEs compress 4 frames into one latent after the first), else a ValueError
    naming the nearest valid values."""
    if frames >= 1 and (frames - 1) % 4 == 0:
        return frames
    near = " or ".join(str(n) for n in nearest_valid_frames(max(frames, 1)))
    raise ValueError(f"{key}={frames} is not of the form 4k+1 (1, 5, 9, ..., 81); the nearest valid value is {near}")


# ---- frame selection (pure) ---------------------------------------------------------------------------------
def resample_indices(num_frames: int, fps: float | None, target_fps: float | None) -> list[int]:
    """Source frame indices of the video re-timed to `target_fps`: output frame k shows the source frame on
    screen at time k / target_fps, i.e. floor(k · fps / target_fps). Identity when either rate is unknown/unset.
    A target above the source rate repeats frames (the clip plays at the same speed, not slowed down)."""
    if not target_fps or not fps or math.isclose(fps, target_fps):
        return list(range(num_frames))
    step = fps / target_fps
    count = math.floor((num_frames - 1) / step + 1e-9) + 1 if num_frames > 0 else 0
    # the 1e-9 keeps exact ratios (30 → 10 fps: step 3.0) from landing a frame early through float rounding
    return [min(num_frames - 1, math.floor(k * step + 1e-9)) for k in range(count)]


def select_clips(
    num_frames: int,
    frames: int,
    selection: Selection = "head",
    *,
    fps: float | None = None,
    target_fps: float | None = None,
    stride: int | None = None,
    max_clips: int | None = None,
) -> list[list[int]]:
    """Source frame indices of each clip of `frames` frames taken from a video of `num_frames` frames.

    head     one clip: the first `frames` frames (of the re-timed video).
    uniform  one clip: `frames` frames spread evenly over the whole video (first and last included; positions
             rounded half to even, as numpy.linspace(...).round()).
    chunk    consecutive non-overlapping clips from the start; a remainder shorter than a clip is dropped.
    slide    overlapping clips starting every `stride` frames (default: half a clip, at least 1).
    `max_clips` caps chunk / slide (the first ones are kept). An empty list: the video is too short.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}: expected one of {', '.join(SELECTIONS)}")
    if frames < 1:
        raise ValueError(f"frames={frames}: a clip needs at least one frame")
    timeline = resample_indices(num_frames, fps, target_fps)
    n = len(timeline)
    if n < frames:
        return []
    if selection == "head":
        return [timeline[:frames]]
    if selection == "uniform":
        if frames == 1:
            return [[timeline[0]]]
        return [[timeline[round(i * (n - 1) / (frames - 1))] for i in range(frames)]]
    step = frames if selection == "chunk" else (stride or max(1, (frames - 1) // 2))
    if step < 1:
        raise ValueError(f"stride={step}: must be at least 1")
    clips = [timeline[s : s + frames] for s in range(0, n - frames + 1, step)]
    return clips[:max_clips] if max_clips else clips


def frames_needed(frames: int, fps: float | None, target_fps: float | None) -> int:
    """The fewest source frames that give one clip of `frames` at `target_fps` (for the "too short" reason)."""
    if not target_fps or not fps or math.isclose(fps, target_fps):
        return frames
    return math.floor((frames - 1) * fps / target_fps + 1e-9) + 1


# ---- PyAV ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float | None  # None when the container does not say
    num_frames: int  # counted by decoding, not read from the header (WebM headers carry none)
    codec: str
    format: str  # "MP4", "WEBM", ...: what the bytes are, for the raw shard's `format` column


_MAGIC = ((4, b"ftyp", "MP4"), (0, b"\x1a\x45\xdf\xa3", "WEBM"))


def sniff_video(data: bytes) -> str | None:
    """The container, "MP4" (ISO base media: .mp4/.mov/.m4v) or "WEBM" (Matroska/WebM), from the first bytes;
    None otherwise. For sources that embed bytes without a file name (Parquet)."""
    for offset, magic, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def _open(data: bytes) -> Any:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as exc:
        raise VideoError(f"corrupt or unreadable video: {exc.strerror or exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoError("zero frames: the file holds no video stream")
    return container


def probe(data: bytes, fmt: str = "") -> VideoInfo:
    """Decode every frame once (a truncated or corrupt file fails here) and count them; VideoError with the
    reason when the video is unusable: unreadable container, unknown codec, corrupt data, zero frames."""
    import av

    if not data:
        raise VideoError("empty file (0 bytes)")
    with _open(data) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context.name if stream.codec_context is not None else "unknown"
        if stream.codec_context is None:
            raise VideoError("unreadable codec: this FFmpeg build has no decoder for the video stream")
        rate = stream.average_rate or stream.guessed_rate
        # Fail on damaged data instead of concealing it (FFmpeg's default patches broken macroblocks over and
        # decodes on): like a truncated image, a damaged video is skipped here rather than trained on.
        stream.codec_context.options = {"err_detect": "explode"}
        stream.thread_type = "AUTO"  # FFmpeg's frame + slice threads: same frames, decoded sooner
        count = 0
        try:
            for _ in container.decode(stream):
                count += 1
        except av.error.FFmpegError as exc:
            raise VideoError(f"corrupt video: decoding failed after {count} frame(s): {exc.strerror or exc}") from exc
        if count == 0:
            raise VideoError("zero frames: the video stream decodes to no frame")
        width, height = stream.codec_context.width, stream.codec_context.height
    return VideoInfo(width, height, float(rate) if rate else None, count, codec, fmt or sniff_video(data) or "VIDEO")


def decode_frames(data: bytes, indices: Sequence[int]) -> list[Image.Image]:
    """The frames at `indices` (source frame numbers, in any order, repeats allowed) as RGB PIL images, in the
    order given. Decodes from the start up to the last index needed (no seeking: a seek lands on key frames and
    would make the frame numbering depend on the file's GOP)."""
    wanted = set(indices)
    last = max(indices)
    got: dict[int, Image.Image] = {}
    with _open(data) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                got[i] = frame.to_image()  # RGB24, converted by FFmpeg's swscale
            if i >= last:
                break
    missing = sorted(wanted - got.keys())
    if missing:
        raise VideoError(f"the video has no frame {missing[0]} (it decodes to fewer frames than its raw row says)")
    return [got[i] for i in indices]


def frames_to_tensor(frames: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL frames of one size → (F, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1, as diffusers' processors)."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(f.convert("RGB")) for f in frames])  # (F, H, W, 3) uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def row_frames(row: dict[str, Any], indices: Sequence[int]) -> list[Image.Image]:
    """A raw shard row (its `image` bytes and `format`) → the frames at `indices`; an image row is a one-frame
    video (index 0)."""
    from PIL import Image

    is_video = row["format"] in VIDEO_FORMATS if "format" in row else sniff_video(row["image"]) is not None
    if not is_video:
        if list(indices) != [0] * len(indices):
            raise VideoError(f"row {row.get('key')!r} is an image (one frame); asked for frames {list(indices)}")
        return [Image.open(io.BytesIO(row["image"])).convert("RGB")] * len(indices)
    return decode_frames(row["image"], indices)


def row_clip(row: dict[str, Any], indices: Sequence[int]) -> torch.Tensor:
    """A raw shard row → its clip at `indices` as (F, 3, H, W) in [-1, 1], at the stored size (no resizing)."""
    return frames_to_tensor(row_frames(row, indices))


_CODECS = {".mp4": "libx264", ".mov": "libx264", ".m4v": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}
# FFmpeg's muxer for each suffix (None: FFmpeg guesses from the file name, as for a path with its own suffix)
_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".m4v": "mp4", ".mkv": "matroska", ".webm": "webm"}


def write_video(path: Any, frames: Any, fps: float = 8, codec: str | None = None, suffix: str | None = None) -> None:
    """Encode (F, H, W, 3) uint8 RGB frames (H, W even: yuv420p) into a video file with PyAV (H.264 for
    .mp4/.mov, VP9 for .webm unless `codec` says otherwise), near-lossless: for tests, demos and class clips
    (`flowtrain class-images`). `suffix` (".mp4", ...) names the container when `path`'s own suffix does not (a
    temporary name that is renamed when the file is complete)."""
    from fractions import Fraction
    from pathlib import Path

    import av

    path = Path(path)
    suffix = (suffix or path.suffix).lower()
    codec = codec or _CODECS.get(suffix, "libx264")
    with av.open(str(path), mode="w", format=_CONTAINERS.get(suffix)) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":  # near-lossless: tests compare decoded pixels with what was written
            stream.options = {"crf": "0", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
