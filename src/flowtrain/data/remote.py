"""`prepare --out URL`: raw shards written to object storage (any fsspec URL).

`prepare` writes its shards into a local staging folder (a temporary one unless given) and they are uploaded with
fsspec when complete. Staging keeps `prepare` itself one code path with its atomic renames, which object stores do
not have (a rename there is a copy); the cost is local disk for one prepared copy while it runs. As locally, the
manifest goes last: a URL holding `manifest.json` holds complete shards.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flowtrain.data.fs import FsPath
from flowtrain.data.prepare import PrepareReport, prepare

_SHARD_RE = re.compile(r"^raw-\d{5}\.parquet$")


def prepare_to_url(
    src: str | Path,
    url: str,
    *,
    overwrite: bool = False,
    staging: str | Path | None = None,
    progress: bool = True,
    **prepare_options: Any,
) -> PrepareReport:
    """`prepare(src, ...)` into a staging folder, then upload the shards, the report and (last) the manifest to
    `url`. Refuses a URL that holds prepared shards already unless `overwrite`; stale shards of the earlier run are
    deleted only after the new ones are uploaded."""
    dest = FsPath(url)
    manifest = dest / "manifest.json"
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{url} holds prepared raw shards already (manifest.json); --overwrite replaces them")
    if staging is not None:
        Path(staging).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flowtrain-prepare-", dir=staging) as tmp:
        report = prepare(src, tmp, progress=progress, **prepare_options)  # raises before any upload if unusable
        upload_raw(Path(tmp), dest, progress=progress)
    if progress:  # prepare's own summary named the staging folder
        print(f"prepare: uploaded {len(report.shards)} shard(s), report and manifest → {url}")
    return report


def upload_raw(local: Path, dest: FsPath, *, progress: bool = True) -> None:
    """Upload a finished raw folder: the earlier manifest removed first (a half-replaced folder must not pass for a
    complete one), then shards and report, then stale shards deleted, then the manifest."""
    fs = dest.fs
    fs.makedirs(dest.path, exist_ok=True)
    if (dest / "manifest.json").exists():
        fs.rm_file((dest / "manifest.json").path)
    files = sorted(p for p in local.iterdir() if p.is_file() and p.name != "manifest.json")
    for path in tqdm(files, desc="upload", unit="file", disable=not progress):
        fs.put_file(str(path), (dest / path.name).path)
    ours = {p.name for p in files}
    for remote in fs.ls(dest.path, detail=False):
        name = remote.rstrip("/").rsplit("/", 1)[-1]
        if _SHARD_RE.match(name) and name not in ours:
            fs.rm_file(remote)
    fs.put_file(str(local / "manifest.json"), (dest / "manifest.json").path)
