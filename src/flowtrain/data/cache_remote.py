"""`precompute --out URL`: a latent cache written to object storage (any fsspec URL).

precompute encodes into a local staging folder and the finished files are uploaded with fsspec. Staging keeps
precompute one code path with its atomic renames and resume (object stores have no rename; a rename there is a
copy); the cost is local disk for one cache while it runs. The staging folder is named after the URL, so a rerun
with the same URL continues where the last one stopped: shards finished locally are reused by precompute's own
resume, and shards already uploaded with the right row count are not uploaded again. As locally, the manifest
goes last: a URL holding `manifest.json` holds a complete cache. Training reads the URL in place (`CacheDataset`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flowtrain.data.fs import FsPath, open_parquet
from flowtrain.data.manifest import MANIFEST, CacheManifest

_SHARD_RE = re.compile(r"^cache-.*\.parquet$")


def default_staging(url: str) -> Path:
    """Where `precompute --out URL` encodes before uploading: one folder per URL under the user's cache folder
    (XDG_CACHE_HOME), so that a rerun finds it."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowtrain" / "precompute-staging"
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def precompute_to_url(
    raw_dir: str | Path,
    url: str,
    model: Any,
    *,
    overwrite: bool = False,
    staging: str | Path | None = None,
    progress: bool = True,
    **precompute_options: Any,
) -> CacheManifest:
    """`precompute(raw_dir, STAGING, model, ...)`, then the cache uploaded to `url`, manifest last; returns the
    manifest. Refuses a URL that holds a finished cache, or an unfinished one of other settings, unless
    `overwrite`. `staging`: the local folder (default `default_staging(url)`), deleted once the upload is done.
    Under `accelerate launch` every process encodes its share into the same staging folder (so it must be on a
    file system they share) and the main process uploads."""
    from flowtrain.data.precompute import STATE, precompute
    from flowtrain.data.precompute_dist import current_ranks

    is_main = current_ranks(precompute_options.get("device")).is_main
    dest = FsPath(url)
    local = Path(staging) if staging is not None else default_staging(url)
    if is_main:
        _claim(dest, local, overwrite)
        if progress:
            print(f"precompute: encoding into {local}, uploaded to {url} when complete")
    try:
        manifest = precompute(raw_dir, local, model, progress=progress, **precompute_options)
    except ValueError as e:  # the remote cache's settings (its state file, copied into staging) differ
        if (local / STATE).exists() and "different settings" in str(e):
            raise ValueError(f"--out {url}: {e}") from None
        raise
    if is_main:
        upload_cache(local, dest, progress=progress)
    # the others have read the staged manifest (precompute's last barrier); no process returns before the upload
    current_ranks(precompute_options.get("device")).barrier()
    if is_main:
        shutil.rmtree(local, ignore_errors=True)
    manifest.path = dest / MANIFEST
    return manifest


def _claim(dest: FsPath, local: Path, overwrite: bool) -> None:
    """Refuse a finished cache at `dest` (unless `overwrite`); carry an unfinished one's settings into `local`, so
    that precompute refuses other settings there as it does in a local folder."""
    from flowtrain.data.precompute import STATE

    if overwrite:
        shutil.rmtree(local, ignore_errors=True)  # a staged cache of other settings must not be reused
        return
    if (dest / MANIFEST).exists():
        fp = json.loads((dest / MANIFEST).read_bytes()).get("fingerprint", {}).get("id", "?")
        raise FileExistsError(
            f"--out {dest} holds a finished latent cache (fingerprint {fp}); train from it as it is, write to a new "
            "--out, or pass --overwrite to replace it (the old manifest is removed first, stale shards after the "
            "new ones are uploaded)"
        )
    state = dest / STATE
    if state.exists() and not (local / STATE).exists():
        local.mkdir(parents=True, exist_ok=True)
        (local / STATE).write_bytes(state.read_bytes())


def _rows(path: Path | FsPath) -> int | None:
    """A Parquet file's row count from its footer; None when it cannot be read."""
    try:
        return open_parquet(path).metadata.num_rows
    except Exception:  # a partial or foreign object: uploaded again
        return None


def upload_cache(local: Path, dest: FsPath, *, progress: bool = True) -> None:
    """Upload a finished cache folder: an earlier manifest removed first (a half-replaced cache must not pass for a
    complete one), the state file, then the shards (skipping those already there with the same row count and
    size) and the empty prompt, then stale shards of an earlier cache deleted, then the manifest."""
    from flowtrain.data.precompute import STATE

    fs = dest.fs
    fs.makedirs(dest.path, exist_ok=True)
    if (dest / MANIFEST).exists():
        fs.rm_file((dest / MANIFEST).path)
    if (local / STATE).exists():
        fs.put_file(str(local / STATE), (dest / STATE).path)
    files = sorted(p for p in local.iterdir() if p.is_file() and p.name not in (MANIFEST, STATE))
    files = [p for p in files if not p.name.endswith(".tmp")]
    skipped = 0
    for path in tqdm(files, desc="upload", unit="file", disable=not progress):
        remote = dest / path.name
        if _SHARD_RE.match(path.name) and _already_there(path, remote):
            skipped += 1
            continue
        fs.put_file(str(path), remote.path)
    ours = {p.name for p in files}
    for remote in fs.ls(dest.path, detail=False):
        name = remote.rstrip("/").rsplit("/", 1)[-1]
        if _SHARD_RE.match(name) and name not in ours:
            fs.rm_file(remote)
    fs.put_file(str(local / MANIFEST), (dest / MANIFEST).path)
    if progress:
        print(f"precompute: uploaded {len(files) - skipped} file(s) ({skipped} already there) and manifest → {dest}")


def _already_there(path: Path, remote: FsPath) -> bool:
    """A shard uploaded by an earlier, interrupted run: the same size and the same row count in its footer."""
    try:
        if remote.fs.size(remote.path) != path.stat().st_size:
            return False
    except FileNotFoundError:
        return False
    return _rows(remote) is not None and _rows(remote) == _rows(path)
