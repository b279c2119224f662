"""fsspec URLs (`s3://`, `gs://`, `hf://`, `memory://`, `file://`, ...) as source paths.

The source readers in `flowtrain.data.sources` were written against `pathlib.Path`. `FsPath` offers the part of
that interface they use (joining, `.parent`, `.suffix`, `read_bytes`, `is_dir`, `stat`, ...) on top of an fsspec
filesystem, so one reader serves local folders and object storage alike; fsspec does all the I/O. We keep our own
small class because `pathlib` subclasses cannot carry a filesystem on Python 3.11 and `universal_pathlib` is not a
dependency.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

# `C:\x` must stay a Windows path, so a protocol needs two letters or more.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")


def is_url(src: str | os.PathLike) -> bool:
    """True for `proto://...` strings (any fsspec protocol, `file://` included); False for plain paths."""
    return isinstance(src, str | FsPath) and bool(_URL_RE.match(str(src)))


class FsPath:
    """A path on an fsspec filesystem, with the subset of the `pathlib.Path` interface the source readers use.

    `str()` gives the full URL (`memory:///bucket/a.png`), which is what reports and manifests record."""

    __slots__ = ("fs", "_p")

    def __init__(self, url_or_fs: Any, path: str | PurePosixPath | None = None) -> None:
        if path is None:
            from fsspec.core import url_to_fs

            self.fs, raw = url_to_fs(str(url_or_fs))
        else:
            self.fs, raw = url_or_fs, str(path)
        self._p = PurePosixPath(raw or "/")

    # --- pure path operations (no I/O) -----------------------------------------------------------------
    def _new(self, p: PurePosixPath | str) -> FsPath:
        return FsPath(self.fs, p)

    def __truediv__(self, other: str | PurePosixPath) -> FsPath:
        return self._new(self._p / str(other))

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(str(self._p))

    def __repr__(self) -> str:
        return f"FsPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FsPath) and other.fs is self.fs and other._p == self._p

    def __hash__(self) -> int:
        return hash((id(self.fs), self._p))

    @property
    def path(self) -> str:
        """The path inside the filesystem, without the protocol."""
        return str(self._p)

    @property
    def parent(self) -> FsPath:
        return self._new(self._p.parent)

    @property
    def name(self) -> str:
        return self._p.name

    @property
    def suffix(self) -> str:
        return self._p.suffix

    @property
    def stem(self) -> str:
        return self._p.stem

    @property
    def parts(self) -> tuple[str, ...]:
        return self._p.parts

    def with_suffix(self, suffix: str) -> FsPath:
        return self._new(self._p.with_suffix(suffix))

    def relative_to(self, other: FsPath) -> PurePosixPath:
        return self._p.relative_to(other._p)

    def is_absolute(self) -> bool:
        return True

    def resolve(self) -> FsPath:
        return self

    # --- I/O through fsspec ----------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def open(self, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self.path, mode)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def stat(self) -> SimpleNamespace:
        """`st_size` and an `st_mtime_ns` stand-in: stores report a modification time, an ETag or a creation
        time under different names; any of them changes when the object is rewritten, which is all
        `SourceHasher` needs."""
        info = self.fs.info(self.path)
        stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "ETag", "created")
                      if info.get(k) is not None), "")  # fmt: skip
        return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime_ns=str(stamp))

    def walk_files(self) -> Iterator[FsPath]:
        """Every file below this folder, sorted; hidden files and folders (a `.` name) are left out."""
        root = self.path.rstrip("/")
        for found in sorted(self.fs.find(root)):
            rel = posixpath.relpath(found, root)
            if not any(part.startswith(".") for part in rel.split("/")):
                yield self._new(found)


def as_path(src: str | os.PathLike) -> Path | FsPath:
    """`FsPath` for an fsspec URL, `Path` for anything else. `file://` URLs stay on fsspec too, so that the
    fsspec code path is what tests of them exercise."""
    if isinstance(src, FsPath):
        return src
    return FsPath(str(src)) if is_url(src) else Path(src)


def read_table(path: Path | FsPath, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file as a table, through the path's fsspec filesystem for a URL.

    `ParquetFile.read`, not `pq.read_table`: for one file that goes through `pyarrow.dataset`, whose import also
    imports pandas (0.27 s and 37 MiB that no flowtrain verb needs; see `data/arrays.py`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = path.open("rb") if isinstance(path, FsPath) else pa.OSFile(os.fspath(path))
    with source, pq.ParquetFile(source) as f:
        return f.read(columns=columns)


def describe(src: str | os.PathLike) -> str:
    """What manifests and reports record as the source: the URL as given, or the absolute local path."""
    return str(src) if is_url(src) else str(Path(src).resolve())


def open_parquet(path: Path | FsPath) -> pq.ParquetFile:
    """A Parquet file opened for reading; for a URL over an fsspec file object, so pyarrow fetches the footer and
    then only the row groups asked for (byte ranges), never the whole object."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(path, FsPath):
        return pq.ParquetFile(path.open("rb"))
    # A local file as an OSFile: a path string would make pyarrow resolve a filesystem on every open, a sixth of
    # the open's cost, and a 1M-row cache opens a shard for almost every row group it reads (benchmarks/scale.py).
    return pq.ParquetFile(pa.OSFile(os.fspath(path)))


def load_tensors(path: Path | FsPath) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, from a local path or (read whole: these files are small) a URL."""
    from safetensors.torch import load, load_file

    return load(path.read_bytes()) if isinstance(path, FsPath) else load_file(str(path))
