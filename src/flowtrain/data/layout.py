"""Each cache shard's layout in the manifest, so a reader can open a cache of millions of rows without reading
thousands of Parquet footers first.

A shard entry of `manifest.json` gains `bytes` (the file's size) and `row_groups` (rows of each Parquet row group,
in order), written once by precompute after the shards are on disk. A reader then learns every row's place from the
manifest, checks each shard with one `stat` (it exists and has the recorded size) and reads a shard's footer only
when it first opens it. Why sizes and not a checksum: hashing every shard at start-up would cost more than the
footers did; a shard rewritten to a different size, truncated or replaced is caught by the `stat`, and any other
change by the lazy footer check. Manifests written before the layout existed have neither key and are read as
before, through every shard's footer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

LAYOUT_KEYS = ("bytes", "row_groups")


def shard_layout(path: Path) -> dict[str, Any]:
    """{"bytes": file size, "row_groups": [rows per row group]} of a written shard, from its footer."""
    md = pq.read_metadata(path)
    return {"bytes": path.stat().st_size, "row_groups": [md.row_group(i).num_rows for i in range(md.num_row_groups)]}


def with_layout(cache_dir: Path, shards: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`shards` (manifest entries naming files in `cache_dir`) with each one's layout added; the footers are read
    on threads, since each read waits on the file system (~1 ms a shard)."""
    paths = [Path(cache_dir) / s["file"] for s in shards]
    workers = min(8, os.cpu_count() or 1) if len(paths) > 16 else 1
    with ThreadPoolExecutor(workers) as pool:
        layouts = list(pool.map(shard_layout, paths))
    return [{**s, **lay} for s, lay in zip(shards, layouts, strict=True)]


def has_layout(shards: Sequence[dict[str, Any]]) -> bool:
    """Whether every shard entry records its layout (a manifest from before it records none)."""
    return bool(shards) and all(all(k in s for k in LAYOUT_KEYS) for s in shards)


def unchanged(cache_dir: Path, shards: Sequence[dict[str, Any]]) -> list[bool]:
    """Per shard: whether its file exists with the size the manifest recorded (one `stat`, no read)."""
    root, out = os.fspath(cache_dir), []
    for s in shards:
        try:  # a plain string join: building ~4k Path objects cost a third of the stats themselves
            out.append(os.stat(os.path.join(root, s["file"])).st_size == s["bytes"])
        except FileNotFoundError:
            out.append(False)
    return out
