"""`prepare`: images + captions -> validated raw Parquet shards (`raw-00000.parquet`, ...).

Every image is fully decoded once here, so later stages (latent caching, training) never meet a broken
file. A bad item is skipped with a one-line reason instead of stopping the run; the reasons go to
`prepare_report.json`. The manifest is written last, so its presence means the shards are complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

from flowtrain.data.arrays import table_from_rows
from flowtrain.data.fs import as_path, describe
from flowtrain.data.sources import SourceItem, count_items, iter_source, source_files
from flowtrain.data.video import VIDEO_EXTENSIONS, VIDEO_FORMATS, VideoError, probe, sniff_video

# Pillow's own default warns at ~89M pixels and fails at ~179M; we skip above this limit instead.
MAX_IMAGE_PIXELS = 178_956_970
ROW_GROUP_ROWS = 128  # small row groups keep memory bounded (images are large) and allow random access
ROW_GROUP_BYTES = 64 << 20
_STR, _I32 = pa.string(), pa.int32()
# `image` holds the file's bytes, a video's too (then `format` names its container, `num_frames` and `fps` say what
# it holds; an image is one frame with no fps).
SCHEMA = pa.schema({"key": _STR, "caption": _STR, "image": pa.binary(), "width": _I32, "height": _I32, "format": _STR,
                    "num_frames": _I32, "fps": pa.float32()})  # fmt: skip
_SHARD_RE = re.compile(r"^raw-\d{5}\.parquet(\.tmp)?$")


class SkipItem(Exception):
    """Raised inside the per-item pipeline; its message is the one-line skip reason."""


@dataclass
class PrepareReport:
    """Outcome of `prepare`: `written + skipped` equals the number of items the source listed."""

    written: int
    skipped: int
    skipped_items: list[dict] = field(default_factory=list)  # each {"key", "path", "reason"}
    duplicates: int = 0  # byte-identical copies dropped (counted in `skipped` too); 0 with keep_duplicates
    videos: int = 0  # written rows that are videos (the rest are images)
    shards: list[str] = field(default_factory=list)


@dataclass
class _Encoded:
    image: bytes
    width: int
    height: int
    format: str
    num_frames: int = 1
    fps: float | None = None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16/32-bit integer or float grey array to 8 bits (truncating would keep only the high byte's noise)."""
    is_float = arr.dtype.kind == "f"
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if is_float and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    elif lo >= 0 and hi <= 65535:  # 16-bit data (PNG/TIFF 'I;16' or 'I' holding 16-bit values)
        scaled = arr / 257.0
    else:  # arbitrary range (signed / float TIFF): stretch to the full 8-bit range
        scaled = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white (black would darken cut-outs)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        grey = np.asarray(im)
        return Image.fromarray(_to_uint8(grey), mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX...


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))  # 0x0112 = EXIF Orientation
    except Exception:  # malformed EXIF: the pixels are still fine, treat as upright
        return 1


def _resize_short_side(im: Image.Image, resolution: int) -> Image.Image:
    w, h = im.size
    scale = resolution / min(w, h)
    size = (resolution, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), resolution)
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def decode_image(data: bytes, resolution: int | None, min_size: int) -> _Encoded:
    """Fully decode, orient, convert and resize; raise SkipItem with the reason when unusable.

    The original bytes are kept when nothing changed, so already-clean JPEGs are not re-encoded.
    """
    if not data:
        raise SkipItem("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format or "UNKNOWN"
        im.load()  # forces the full decode: truncated or corrupt data fails here, not during training
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipItem(f"image too large (decompression bomb guard): {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise SkipItem("not a recognised image file") from exc
    except Exception as exc:
        raise SkipItem(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if min(w, h) < min_size:
        raise SkipItem(f"too small ({w}x{h} < min_size {min_size})")
    changed = getattr(im, "n_frames", 1) > 1  # animations: keep only the first frame
    if _orientation(im) != 1:
        with contextlib.suppress(Exception):  # an undecodable tag: keep the pixels as stored
            im = ImageOps.exif_transpose(im)
            changed = True
    if im.mode != "RGB":
        try:
            im = to_rgb(im)
        except Exception as exc:
            raise SkipItem(f"unsupported image mode {im.mode}: {exc}") from exc
        changed = True
    if resolution is not None and min(im.size) > resolution:
        im = _resize_short_side(im, resolution)
        changed = True
    if not changed:
        return _Encoded(data, w, h, fmt)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return _Encoded(buf.getvalue(), im.width, im.height, "PNG")


@contextlib.contextmanager
def _pil_guards() -> Iterator[None]:
    """Bomb limit as an error and strict truncation, restored afterwards: Pillow's settings are process-global."""
    old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = MAX_IMAGE_PIXELS, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_truncated


def _read_bytes(item: SourceItem) -> bytes:
    if item.data is not None:
        return item.data
    if item.image_path is None:
        raise SkipItem("no image")
    try:
        return item.image_path.read_bytes()
    except FileNotFoundError as exc:
        raise SkipItem("image file not found") from exc
    except OSError as exc:
        raise SkipItem(f"cannot read image file: {exc.strerror or exc}") from exc


def decode_video(data: bytes, fmt: str, min_size: int, min_frames: int) -> _Encoded:
    """Decode every frame once (`video.probe`); the original bytes are kept (re-encoding would lose quality, and
    clips are cut and resized in precompute). SkipItem with the reason when unusable."""
    try:
        info = probe(data, fmt)
    except VideoError as exc:
        raise SkipItem(str(exc)) from exc
    if min(info.width, info.height) < min_size:
        raise SkipItem(f"too small ({info.width}x{info.height} < min_size {min_size})")
    if info.num_frames < min_frames:
        raise SkipItem(f"too short ({info.num_frames} frames < min_frames {min_frames})")
    return _Encoded(data, info.width, info.height, info.format, info.num_frames, info.fps)


def _video_format(item: SourceItem, data: bytes) -> str | None:
    """The container name ("MP4", "WEBM", ...) when the item is a video (by its extension, or for embedded
    bytes by their magic number); None for an image."""
    if item.image_path is not None:
        suffix = item.image_path.suffix.lower()
        return suffix[1:].upper() if suffix in VIDEO_EXTENSIONS else None
    return sniff_video(data)


def _process(
    item: SourceItem,
    first_key_by_hash: dict[str, str] | None,
    resolution: int | None,
    min_size: int,
    min_frames: int = 1,
) -> tuple[str, str, _Encoded]:
    """(caption, sha256 of the file bytes, encoded image) or SkipItem. Captions first: they are cheapest.
    `first_key_by_hash` None keeps duplicates (e.g. the same image deliberately listed under two captions)."""
    if item.problem:
        raise SkipItem(item.problem)
    if item.caption is None:
        raise SkipItem("missing caption")
    caption = item.caption.strip()
    if not caption:
        raise SkipItem("empty caption")
    data = _read_bytes(item)
    digest = hashlib.sha256(data).hexdigest()
    if first_key_by_hash is not None and digest in first_key_by_hash:
        raise SkipItem(f"duplicate of {first_key_by_hash[digest]}")
    video = _video_format(item, data)
    if video is not None:
        return caption, digest, decode_video(data, video, min_size, min_frames)
    return caption, digest, decode_image(data, resolution, min_size)


class _ShardWriter:
    """Writes `raw-{i:05d}.parquet` shards atomically (a `.tmp` file renamed when complete)."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size
        self.shards: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows: list[dict] = []
        self._buffered_bytes = 0
        self._shard_rows = 0

    def _tmp(self) -> Path:
        return self.out / f"raw-{len(self.shards):05d}.parquet.tmp"

    def add(self, row: dict) -> None:
        if self._writer is None:
            # zstd everywhere as documented; statistics only where they help (min/max of image bytes is waste).
            self._writer = pq.ParquetWriter(
                self._tmp(), SCHEMA, compression="zstd", write_statistics=["key", "width", "height"]
            )
        self._rows.append(row)
        self._buffered_bytes += len(row["image"])
        self._shard_rows += 1
        if len(self._rows) >= ROW_GROUP_ROWS or self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()
        if self._shard_rows >= self.shard_size:
            self.close()

    def _flush(self) -> None:
        if self._rows and self._writer is not None:
            self._writer.write_table(table_from_rows(self._rows, SCHEMA))
        self._rows, self._buffered_bytes = [], 0

    def close(self) -> None:
        """Finish the open shard (if any) and move it into place."""
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        name = f"raw-{len(self.shards):05d}.parquet"
        os.replace(self._tmp(), self.out / name)
        self.shards.append({"file": name, "rows": self._shard_rows})
        self._writer, self._shard_rows = None, 0

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp().unlink(missing_ok=True)
            self._writer = None


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class SourceHasher:
    """A digest of what a source lists: each item's key, caption and image file (size and modification time, not
    its bytes, so hashing costs a stat per file), plus the source file itself. Two listings with the same digest
    give the same raw shards; `flowtrain train --from` reuses prepared shards on it (flowtrain.chain)."""

    def __init__(self, src: str | Path) -> None:
        self._h = hashlib.sha256()
        # A TSV / JSONL / Parquet list, tar shards, a dataset's Arrow files: their content (embedded images too)
        for path in source_files(src):
            self._stat(path)

    def _stat(self, path: Path) -> None:
        try:
            st = path.stat()
            self._h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:
            self._h.update(f"{path}\0missing\0".encode())

    def add(self, item: SourceItem) -> None:
        self._h.update(f"{item.key}\0{item.caption}\0{item.problem}\0".encode())
        if item.image_path is not None:
            self._stat(item.image_path)

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]


def source_signature(src: str | Path) -> str:
    """`SourceHasher`'s digest of `src`, listing it without decoding any image."""
    hasher = SourceHasher(src)
    for item in iter_source(src):
        hasher.add(item)
    return hasher.hexdigest()


def raw_digest(raw_dir: str | Path) -> str:
    """A digest of the raw manifest (shards, row counts, creation time): which prepared data a cache was made from.
    Every prepare run writes a new manifest, so re-prepared shards never pass for the ones a cache was made of."""
    return hashlib.sha256((as_path(raw_dir) / "manifest.json").read_bytes()).hexdigest()[:16]


def reason_kind(reason: str) -> str:
    """Group reasons for the summary: 'duplicate of a/b' -> 'duplicate', 'cannot decode image: ...' -> prefix."""
    return "duplicate" if reason.startswith("duplicate of ") else re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def prepare(
    src: str | Path,
    out: str | Path,
    resolution: int | None = None,
    shard_size: int = 1000,
    min_size: int = 16,
    progress: bool = True,
    *,
    keep_duplicates: bool = False,
    min_frames: int = 1,
) -> PrepareReport:
    """Validate and convert the items of `src` into raw Parquet shards under `out`; see docs/prepare.md.

    Byte-identical copies of an image already written are skipped (`duplicate of KEY`) unless `keep_duplicates`.
    Videos (docs/video.md) are stored as they are, with their frame count and fps; `resolution` applies to images
    only, and a video with fewer than `min_frames` frames is skipped as too short."""
    if shard_size < 1 or min_size < 1 or min_frames < 1 or (resolution is not None and resolution < 1):
        raise ValueError(
            f"need shard_size, min_size, min_frames >= 1 and resolution >= 1 or None; got {shard_size=}, "
            f"{min_size=}, {min_frames=}, {resolution=}"
        )
    items = iter_source(src)  # raises ValueError for an unknown source before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A stale manifest would vouch for shards this run is about to replace.
    (out / "manifest.json").unlink(missing_ok=True)
    report = PrepareReport(written=0, skipped=0)
    first_key_by_hash: dict[str, str] | None = None if keep_duplicates else {}
    writer = _ShardWriter(out, shard_size)
    hasher = SourceHasher(src)
    bar = tqdm(total=count_items(src) if progress else None, unit="file", disable=not progress, dynamic_ncols=True)
    try:
        with _pil_guards():
            for item in items:
                bar.update(1)
                hasher.add(item)
                try:
                    caption, digest, enc = _process(item, first_key_by_hash, resolution, min_size, min_frames)
                except Exception as exc:  # SkipItem, or a bug/odd file we did not foresee: still never crash
                    reason = str(exc) if isinstance(exc, SkipItem) else f"unexpected error: {type(exc).__name__}: {exc}"
                    path = str(item.image_path) if item.image_path is not None else item.origin
                    report.skipped_items.append({"key": item.key, "path": path, "reason": " ".join(reason.split())})
                    report.skipped += 1
                    continue
                # Only written images count as "first": a corrupt original must not make its copies duplicates.
                if first_key_by_hash is not None:
                    first_key_by_hash[digest] = item.key
                writer.add({"key": item.key, "caption": caption, **asdict(enc)})
                report.written += 1
                report.videos += enc.format in VIDEO_FORMATS
                if report.written % 64 == 0:
                    bar.set_postfix(written=report.written, skipped=report.skipped, refresh=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    report.shards = [s["file"] for s in writer.shards]
    settings = {"resolution": resolution, "min_size": min_size, "keep_duplicates": keep_duplicates}
    if min_frames > 1:  # only then: image-only manifests stay as they were
        settings["min_frames"] = min_frames
    _finish(src, out, settings, report, writer.shards, progress, hasher.hexdigest())
    return report


def summary(report: PrepareReport, out: str | Path, *, keep_duplicates: bool = False) -> str:
    """The one-line outcome both the progress output and `--quiet` print: counts, and what became of duplicates."""
    dups = "duplicates kept" if keep_duplicates else f"duplicates dropped: {report.duplicates}"
    return f"prepare: wrote {report.written}, skipped {report.skipped} ({dups}) → {out}"


def _finish(
    src: str | Path, out: Path, settings: dict, report: PrepareReport, shards: list, progress: bool, signature: str
) -> None:
    """Write the report, drop stale shards, write the manifest last (or raise when nothing was written)."""
    kinds = Counter(reason_kind(s["reason"]) for s in report.skipped_items)
    report.duplicates = kinds.get("duplicate", 0)
    head = {"source": describe(src), "seen": report.written + report.skipped}
    _write_json(out / "prepare_report.json", {**head, "skipped_by_reason": dict(kinds.most_common()), **asdict(report)})
    for stale in out.iterdir():
        if _SHARD_RE.match(stale.name) and stale.name not in report.shards:
            stale.unlink()
    if progress:
        print(f"{summary(report, out, keep_duplicates=settings['keep_duplicates'])} (see prepare_report.json)")
        for kind, n in kinds.most_common(5):
            print(f"  {n:>6} x {kind}")
    if report.written == 0:
        common = ", ".join(f"{k} ({n})" for k, n in kinds.most_common(3))
        what = f"all {report.skipped} item(s) skipped: {common}" if report.skipped else "the source listed no items"
        raise ValueError(f"no usable images in {src}: {what}; see report {out / 'prepare_report.json'}")
    manifest = {
        "kind": "flowtrain.raw",
        "version": 1,
        "source": describe(src),
        "source_signature": signature,
        "resolution": settings["resolution"],
        "settings": settings,
        "num_rows": report.written,
        "videos": report.videos,  # > 0 puts precompute on its video path (data/clips.py)
        "columns": SCHEMA.names,
        "shards": shards,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(out / "manifest.json", manifest)
