"""WebDataset tar shards as a `prepare` source, grouped into samples by the `webdataset` package.

A sample is the group of tar members sharing a basename (`000123.jpg`, `000123.txt`, `000123.json`). The image is
the first of `.jpg .jpeg .png .webp` present; the caption comes from `.txt`, else from the `caption` (or `text`)
field of `.json`. Shards are given as one `.tar`, a brace range (`shards-{00000..00099}.tar`) or a glob
(`shards/*.tar`), on local disk or at any fsspec URL; fsspec opens the streams. A shard that is truncated or not a
tar at all becomes one problem item (listed in the report), and the shards after it are still read.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from flowtrain.data.fs import FsPath, as_path, is_url
from flowtrain.data.sources import SourceItem, _decode_caption, _UniqueKeys

KIND = "webdataset"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
_CAPTION_FIELDS = ("caption", "text")
_BRACE_RE = re.compile(r"\{\d+\.\.\d+\}")


def matches(src: str | Path) -> bool:
    """A `.tar` path or pattern (local or URL). Checked by name only, so that listing stays cheap."""
    return str(src).lower().endswith(".tar")


def shard_paths(src: str | Path) -> list[Path] | list[FsPath]:
    """The shards `src` names, in order; ValueError when none exist (naming the pattern)."""
    from braceexpand import braceexpand  # a webdataset dependency

    text = str(src)
    names = list(braceexpand(text)) if _BRACE_RE.search(text) else [text]
    found: list = []
    for name in names:
        if any(c in name for c in "*?["):
            if is_url(name):
                probe = FsPath(name)
                found += [FsPath(probe.fs, p) for p in sorted(probe.fs.glob(probe.path))]
            else:
                found += sorted(Path(name).parent.glob(Path(name).name))
        else:
            found.append(as_path(name))
    missing = [str(p) for p in found if not p.is_file()]
    if not found or missing:
        what = f"{len(missing)} shard(s) not found, e.g. {missing[0]}" if missing else "no shard matches"
        raise ValueError(f"WebDataset source {text!r}: {what}; give a .tar, a {{000..009}} range or a *.tar glob")
    return found


def files(src: str | Path) -> list[Path] | list[FsPath]:
    return shard_paths(src)


def _open(shard: Path | FsPath):
    return shard.open("rb")


def _caption(sample: dict) -> tuple[str | None, str | None]:
    """(caption, problem) of one grouped sample; a missing caption is (None, None), as for the other sources."""
    if "txt" in sample:
        text = _decode_caption(sample["txt"])
        return (text, None) if text is not None else (None, "caption is not UTF-8")
    if "json" in sample:
        try:
            record = json.loads(sample["json"].decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"invalid JSON caption: {exc}"
        value = next((record[f] for f in _CAPTION_FIELDS if isinstance(record, dict) and f in record), None)
        if value is not None and not isinstance(value, str):
            return None, "caption is not a string"
        return value, None
    return None, None


def _members(stream, url: str) -> Iterator[dict]:
    """(name, bytes) of each regular member, in webdataset's record form. Ours rather than webdataset's
    `tar_file_iterator` because a streamed tarfile hands back a member cut short by a truncated shard without an
    error; here a short read raises, so the shard is reported instead of yielding a silently cut image."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or _meta(info.name):
                continue
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise EOFError(f"member {info.name} has {len(data)} of its {info.size} bytes")
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # streaming: do not keep every header of a large shard


def _samples(shard: Path | FsPath) -> Iterator[dict]:
    """Grouped samples of one shard, grouped by webdataset's own key rule (`group_by_keys`)."""
    from webdataset.tariterators import group_by_keys

    with _open(shard) as stream:
        yield from group_by_keys(_members(stream, str(shard)))


def iter_items(src: str | Path) -> Iterator[SourceItem]:
    """One SourceItem per sample, keyed `SHARD_STEM/SAMPLE_KEY` (unique across shards), image bytes in `data`."""
    shards = shard_paths(src)  # errors now, not on first next()
    return _iter(shards)


def _iter(shards: list) -> Iterator[SourceItem]:
    keys = _UniqueKeys()
    for shard in shards:
        stem, n = shard.name[: -len(".tar")], 0
        try:
            for sample in _samples(shard):
                n += 1
                key = keys(f"{stem}/{sample['__key__']}")
                origin = f"{shard.name}:{sample['__key__']}"
                image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
                caption, problem = _caption(sample)
                if image is None:
                    problem = "no image in sample (expected ." + " .".join(IMAGE_SUFFIXES) + ")"
                yield SourceItem(key, None, caption, problem, data=image, origin=origin)
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            # webdataset re-raises a broken stream; one problem item keeps the shard visible in the report.
            reason = f"corrupt or truncated tar shard after {n} sample(s): {type(exc).__name__}: {exc}"
            yield SourceItem(keys(f"{stem}/#error"), None, None, reason, origin=str(shard))


def count(src: str | Path) -> int:
    """Samples across the shards from the tar headers only (members are skipped over, not read); a shard that
    cannot be listed counts as one (its problem item)."""
    total = 0
    for shard in shard_paths(src):
        try:
            with _open(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                prefixes = {_prefix(m.name) for m in tar if m.isreg() and not _meta(m.name)}
            total += len(prefixes)
        except (tarfile.TarError, OSError, EOFError):
            total += 1
    return total


def _prefix(name: str) -> str:
    """webdataset's grouping key: the path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    return f"{head}/{base.split('.', 1)[0]}" if head else base.split(".", 1)[0]


def _meta(name: str) -> bool:
    return name.startswith("__") or "/__" in name
