"""List (image, caption) items from the source kinds `prepare` accepts.

Listing is cheap and never decodes images: it only finds files, reads captions and records what is
already wrong (a malformed line, a caption that is not UTF-8) in `SourceItem.problem`, so that
`prepare` can skip the item with that reason instead of crashing. Source-level errors (unknown
kind, a Parquet file without an image column) raise ValueError, because no item could be read at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from flowtrain.data.fs import FsPath, as_path
from flowtrain.data.video import VIDEO_EXTENSIONS

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Videos are listed like images (an image is a one-frame video); `prepare` tells them apart by extension.
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
ACCEPTED_KINDS = (
    "a folder of images / videos (.mp4, .webm, .mov) with same-name .txt captions",
    "a .tsv file (image_or_video_path<TAB>caption)",
    "a .jsonl/.json manifest (image + caption fields)",
    "a .parquet file (image + caption columns)",
    "WebDataset .tar shards (a .tar, a {000..009} brace range or a *.tar glob)",
    "a Hugging Face dataset (a save_to_disk folder, or hf-dataset:NAME)",
    "any of these at an fsspec URL (s3://, gs://, hf://, memory://, file://...)",
)
_IMAGE_FIELDS = ("image", "file_name", "path", "image_path", "video", "video_path")
_CAPTION_FIELDS = ("caption", "text")


@dataclass(frozen=True)
class SourceItem:
    """One listed item. `data` carries embedded image bytes (Parquet sources) instead of `image_path`."""

    key: str  # stable unique id within the source
    image_path: Path | None
    caption: str | None  # None = missing caption
    problem: str | None = None  # a reason found while listing; the item is skipped with it
    data: bytes | None = field(default=None, repr=False)
    origin: str | None = None  # where the item came from (e.g. "list.tsv:12"), for reports


class _UniqueKeys:
    """Hands out keys unique within one source: a repeated base gets a `~2`, `~3`... suffix."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, base: str) -> str:
        key, n = base, 1
        while key in self._seen:
            n += 1
            key = f"{base}~{n}"
        self._seen.add(key)
        return key


def _path_key(path: Path, base: Path) -> str:
    """Relative path without extension, with `/` separators, so keys match across OSes."""
    try:
        rel = path.relative_to(base)
    except ValueError:  # absolute path outside the manifest's folder
        rel = Path(*path.parts[1:]) if path.is_absolute() else path
    return rel.with_suffix("").as_posix()


def _decode_caption(raw: bytes) -> str | None:
    """UTF-8 (a BOM is tolerated, editors on Windows add one); None when not decodable."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def detect_kind(src: str | Path) -> str:
    """Return "folder", "tsv", "jsonl", "parquet" or another reader's kind (`_extra_reader`); ValueError naming the
    path and the accepted kinds."""
    extra = _extra_reader(src)
    if extra is not None:
        return extra.KIND
    path = as_path(src)
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    kind = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix)
    if kind is None or not path.is_file():
        why = "does not exist" if not path.exists() else "is not a recognised source"
        raise ValueError(f"source {str(path)!r} {why}; accepted kinds: " + "; ".join(ACCEPTED_KINDS))
    return kind


def iter_source(src: str | Path) -> Iterator[SourceItem]:
    """Iterate the items of `src`. The kind is detected (and errors raised) at call time, not on first next()."""
    kind = detect_kind(src)
    extra = _extra_reader(src)
    if extra is not None:
        return extra.iter_items(src)
    path = as_path(src)
    return {"folder": _iter_folder, "tsv": _iter_tsv, "jsonl": _iter_jsonl, "parquet": _iter_parquet}[kind](path)


def count_items(src: str | Path) -> int:
    """Number of items `iter_source` will yield, without reading images (used for the progress total)."""
    kind = detect_kind(src)
    extra = _extra_reader(src)
    if extra is not None:
        return extra.count(src)
    if kind == "parquet":
        return _parquet_file(as_path(src)).metadata.num_rows
    if kind == "folder":
        return len(list_folder_images(as_path(src)))
    return sum(1 for _ in iter_source(src))


def source_files(src: str | Path) -> list[Path] | list[FsPath]:
    """The files that hold the source's items themselves (not a folder's images): the list file, the tar shards,
    a dataset's Arrow files. What `prepare.SourceHasher` stats to notice a changed source."""
    extra = _extra_reader(src)
    if extra is not None:
        return extra.files(src)
    path = as_path(src)
    return [path] if path.is_file() else []


def _extra_reader(src: str | Path):
    """The module reading `src` when it is a kind kept in a module of its own (WebDataset shards, HF datasets), else
    None. Each such module has KIND, matches(src), iter_items(src), count(src) and files(src); imported late: they
    import this module (and their libraries are slow to import)."""
    from flowtrain.data import sources_hf, sources_wds

    return next((m for m in (sources_wds, sources_hf) if m.matches(src)), None)


def _parquet_file(path: Path | FsPath) -> pq.ParquetFile:
    return pq.ParquetFile(path.open("rb") if isinstance(path, FsPath) else path)


def list_folder_images(root: Path | FsPath) -> list[Path] | list[FsPath]:
    """Image and video files under `root`, recursively, in sorted (deterministic) order.

    Hidden files and folders are ignored: they are tool debris such as macOS `._x.png` resource forks,
    which carry an image extension but are not images.
    """
    if isinstance(root, FsPath):
        return [p for p in root.walk_files() if p.suffix.lower() in MEDIA_EXTENSIONS]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in MEDIA_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return found


def _iter_folder(root: Path) -> Iterator[SourceItem]:
    keys = _UniqueKeys()
    for image in list_folder_images(root):
        key = keys(_path_key(image, root))
        caption_file = image.with_suffix(".txt")
        try:
            raw = caption_file.read_bytes()
        except FileNotFoundError:
            yield SourceItem(key, image, None)
            continue
        except OSError as exc:
            yield SourceItem(key, image, None, problem=f"cannot read caption file: {exc.strerror or exc}")
            continue
        caption = _decode_caption(raw)
        yield SourceItem(key, image, caption, problem=None if caption is not None else "caption is not UTF-8")


def _is_header(cols: list[str]) -> bool:
    return cols[0].strip().lower() in _IMAGE_FIELDS and cols[1].strip().lower() in _CAPTION_FIELDS


def _iter_tsv(tsv: Path) -> Iterator[SourceItem]:
    base, keys = tsv.parent, _UniqueKeys()
    first = True
    # Bytes, not text mode: one bad line must not make the whole file unreadable.
    for lineno, raw in enumerate(tsv.read_bytes().splitlines(), start=1):
        origin = f"{tsv.name}:{lineno}"
        text = _decode_caption(raw)
        if text is None:
            yield SourceItem(keys(f"line{lineno}"), None, None, "line is not UTF-8", origin=origin)
            continue
        if not text.strip():
            continue
        cols = text.split("\t", 1)  # a caption may itself contain tabs
        if first and len(cols) == 2 and _is_header(cols):
            first = False
            continue
        first = False
        if len(cols) != 2 or not cols[0].strip():
            problem = "malformed line: expected image_path<TAB>caption"
            yield SourceItem(keys(f"line{lineno}"), None, None, problem, origin=origin)
            continue
        image = base / cols[0].strip()
        yield SourceItem(keys(_path_key(image, base)), image, cols[1], origin=origin)


def _json_records(manifest: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record, parse problem). A `.json` holding one array is accepted too."""
    raw = manifest.read_bytes()
    if manifest.suffix.lower() == ".json" and raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{manifest}: not valid JSON ({exc})") from exc
        for i, record in enumerate(records, start=1):
            yield i, record, None
        return
    for lineno, line in enumerate(raw.splitlines(), start=1):
        text = _decode_caption(line)
        if text is None:
            yield lineno, None, "line is not UTF-8"
        elif text.strip():
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"invalid JSON: {exc.msg}"


def _first(record: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((record[n] for n in names if record.get(n) is not None), None)


def _iter_jsonl(manifest: Path) -> Iterator[SourceItem]:
    base, keys = manifest.parent, _UniqueKeys()
    for lineno, record, problem in _json_records(manifest):
        origin = f"{manifest.name}:{lineno}"
        if problem is None and not isinstance(record, dict):
            problem = "record is not a JSON object"
        image = _first(record, _IMAGE_FIELDS) if problem is None else None
        if problem is None and not isinstance(image, str):
            problem = "no image path (expected one of: " + ", ".join(_IMAGE_FIELDS) + ")"
        if problem is not None:
            yield SourceItem(keys(f"line{lineno}"), None, None, problem, origin=origin)
            continue
        caption = _first(record, _CAPTION_FIELDS)
        bad_caption = caption is not None and not isinstance(caption, str)
        image_path = base / image
        key = record.get("key", record.get("id"))
        key = keys(str(key) if key is not None else _path_key(image_path, base))
        problem = "caption is not a string" if bad_caption else None
        yield SourceItem(key, image_path, None if bad_caption else caption, problem, origin=origin)


def _parquet_item(value: Any, caption: Any, base: Path) -> tuple[Path | None, bytes | None, str | None, str | None]:
    """Normalise one Parquet row to (image_path, data, caption, problem)."""
    if isinstance(value, dict):  # Hugging Face `datasets` Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(caption, bytes):
        caption = _decode_caption(caption)
        if caption is None:
            return None, None, None, "caption is not UTF-8"
    if isinstance(value, bytes):
        return None, value, caption, None
    if isinstance(value, str) and value:
        return base / value, None, caption, None
    return None, None, caption, "no image in row"


def _iter_parquet(path: Path) -> Iterator[SourceItem]:
    pf = _parquet_file(path)
    names = set(pf.schema_arrow.names)
    caption_col = next((c for c in _CAPTION_FIELDS if c in names), None)
    if "image" not in names or caption_col is None:
        raise ValueError(f"{path}: a Parquet source needs 'image' and 'caption' columns; found {sorted(names)}")
    columns = ["image", caption_col] + (["key"] if "key" in names else [])
    base, keys, row = path.parent, _UniqueKeys(), 0
    # Small batches: embedded images can be megabytes each, so never materialise the whole file.
    for batch in pf.iter_batches(batch_size=64, columns=columns):
        data = batch.to_pydict()
        for i, value in enumerate(data["image"]):
            image_path, blob, caption, problem = _parquet_item(value, data[caption_col][i], base)
            given = data["key"][i] if "key" in data else None
            if given is not None:
                key = str(given)
            elif image_path is not None:
                key = _path_key(image_path, base)
            else:
                key = f"row{row:08d}"
            yield SourceItem(keys(key), image_path, caption, problem, data=blob, origin=f"{path.name}#row{row}")
            row += 1
