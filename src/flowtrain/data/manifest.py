"""The latent cache's `manifest.json`, typed: what precompute wrote, and the checks that a cache fits a model.

kind, version      "flowtrain.cache", CACHE_VERSION
family             the model family that wrote it
fingerprint        what determines the content: model path, revision, resolution, storage dtype, the family's
                   cache settings, the encoders' / VAE's identity (config + weights digests); `id` hashes it
columns            the family's declared columns (name, dtype, shape, source)
latent_norm        the statistics the family normalises latents with (named lists of floats)
shards             [{file, rows, bytes, row_groups}] (`bytes`, `row_groups`: `data.layout`, absent in older caches),
                   plus `shapes` (the columns' per-row shapes where they differ from `columns`) and what makes them
                   differ: `bucket` (an aspect-ratio bucket's height, width) or `frames` (a video cache's one-frame
                   clips: its images);
                   `empty_prompt`: the "" prompt's conditioning (safetensors)
source, source_digest  the raw folder it was made from, and a digest of that folder's manifest at the time
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowtrain.data.fs import FsPath, as_path
from flowtrain.models.base import Column

CACHE_KIND = "flowtrain.cache"
CACHE_VERSION = 2
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"

log = logging.getLogger(__name__)


class CacheError(ValueError):
    """A cache that cannot be trained on; the message names the file (and row / key) and the fix."""


def fingerprint(
    family: str,
    model: str,
    revision: str | None,
    resolution: int,
    dtype: str,
    settings: dict[str, Any],
    identity: dict[str, str],
    buckets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What determines a cache's content, with an `id` hashing all of it. `buckets` (`BucketSpec.to_json`) only
    for an aspect-ratio bucketed cache: a square cache's fingerprint (and id) is what it always was."""
    fp = {
        "family": family,
        "model": model,
        "revision": revision,
        "resolution": resolution,
        "dtype": dtype,
        "settings": settings,
        "identity": identity,
    }
    if buckets is not None:
        fp["buckets"] = buckets
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


@dataclass
class CacheManifest:
    family: str
    fingerprint: dict[str, Any]
    columns: list[Column]
    latent_norm: dict[str, list[float]]
    shards: list[dict[str, Any]]
    source: str = ""
    source_digest: str = ""  # precompute.raw_digest of the raw folder it was made from ("" in older caches)
    empty_prompt: str = EMPTY_PROMPT
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    path: Path | FsPath | None = None  # where it was read from (not written); an FsPath for a URL cache

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def resolution(self) -> int | None:
        return self.fingerprint.get("resolution")

    @property
    def shard_buckets(self) -> list[tuple[int, int] | None]:
        """Each shard's aspect-ratio bucket (height, width) in pixels; None for shards of a square cache."""
        return [tuple(s["bucket"]) if s.get("bucket") else None for s in self.shards]

    @property
    def shard_frames(self) -> list[int | None]:
        """Each shard's clip length in frames where it differs from the declared columns' (`frames`: a video cache's
        images, one-frame clips); None for shards of the declared shapes."""
        return [int(s["frames"]) if s.get("frames") else None for s in self.shards]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.where}: no column {name!r}; the cache has {[c.name for c in self.columns]}")

    @property
    def where(self) -> str:
        return str(self.path) if self.path else MANIFEST

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": CACHE_KIND,
            "version": CACHE_VERSION,
            "family": self.family,
            "fingerprint": self.fingerprint,
            "columns": [c.to_json() for c in self.columns],
            "latent_norm": self.latent_norm,
            "num_rows": self.num_rows,
            "shards": self.shards,
            "empty_prompt": self.empty_prompt,
            "source": self.source,
            "source_digest": self.source_digest,
            "created": self.created,
        }

    def write(self, cache_dir: str | Path) -> None:
        """Written last and atomically: a cache without manifest.json is incomplete."""
        tmp = Path(cache_dir) / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(Path(cache_dir) / MANIFEST)

    @classmethod
    def read(cls, cache_dir: str | Path) -> CacheManifest:
        """The manifest of a finished cache (a folder or an fsspec URL); a clear error when it is not one."""
        path = as_path(cache_dir) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: run `flowtrain precompute RAW_DIR --out {cache_dir}` first "
                "(a cache without manifest.json is incomplete: an interrupted precompute uploads it last)"
            )
        try:
            d = json.loads(path.read_bytes())
        except json.JSONDecodeError as e:
            raise CacheError(f"{path}: not valid JSON ({e}); rerun `flowtrain precompute`") from None
        if d.get("kind") != CACHE_KIND:
            raise CacheError(f"{path}: kind {d.get('kind')!r} is not a flowtrain latent cache")
        if d.get("version") != CACHE_VERSION:
            raise CacheError(
                f"{path}: cache format version {d.get('version')}, this flowtrain reads version {CACHE_VERSION}; "
                "rerun `flowtrain precompute` into a new --out"
            )
        return cls(
            family=d["family"],
            fingerprint=d["fingerprint"],
            columns=[Column.from_json(c) for c in d["columns"]],
            latent_norm=d["latent_norm"],
            shards=d["shards"],
            source=d.get("source", ""),
            source_digest=d.get("source_digest", ""),
            empty_prompt=d.get("empty_prompt", EMPTY_PROMPT),
            created=d.get("created", ""),
            path=path,
        )


def check_made_for(manifest: CacheManifest, family: str, settings: dict[str, Any], identity: dict[str, str],
                   *, allow_other_weights: bool = False) -> list[str]:  # fmt: skip
    """The checks every family's `check_cache` starts with: the cache was written by `family`, with these cache
    settings, by encoders / a VAE of this identity (compared per component available on both sides).

    Raises CacheError naming the differences and the fix (with `allow_other_weights`, differing weights are only
    logged as a warning); returns the components whose identity could not be compared (not available locally), for
    the caller to warn about.
    """
    where = manifest.where
    if manifest.family != family:
        raise CacheError(
            f"{where}: the cache was made for model family {manifest.family!r}, the config's model is {family!r}: "
            "precompute a cache with this model, or train the model the cache was made for"
        )
    cached = manifest.fingerprint.get("settings", {})
    diff = {k: (cached.get(k), v) for k, v in settings.items() if _norm(cached.get(k)) != _norm(v)}
    if diff:
        lines = ", ".join(f"{k}={a!r} (config: {b!r})" for k, (a, b) in diff.items())
        raise CacheError(
            f"{where}: cache was made with {lines}. Re-run precompute with the config's settings or change the config."
        )
    old = manifest.fingerprint.get("identity", {})
    common = sorted(old.keys() & identity.keys())
    changed = [k for k in common if old[k] != identity[k]]
    if changed:
        message = (
            f"{where}: the cache was made by other weights than model.pretrained's ({', '.join(changed)} differ: "
            f"the cache came from {manifest.fingerprint.get('model')!r})"
        )
        if not allow_other_weights:
            raise CacheError(
                f"{message}. Precompute again with this model, or set dataset.allow_other_weights: true if the "
                "weights are knowingly different but compatible (e.g. the same model saved in another dtype)"
            )
        warn_once(f"{message}; used anyway (dataset.allow_other_weights)")
    return sorted((old.keys() | identity.keys()) - set(common))


_SEEN: set[str] | None = None  # warnings already given inside `warnings_once()`


@contextlib.contextmanager
def warnings_once() -> Iterator[None]:
    """Inside the block, each cache-check warning is logged once (a run checks every cache twice: against the
    model's files before the transformer loads, and with its widths after)."""
    global _SEEN
    outer, _SEEN = _SEEN, set()
    try:
        yield
    finally:
        _SEEN = outer


def warn_once(message: str) -> None:
    """log.warning, but once per message inside `warnings_once()`."""
    if _SEEN is None or message not in _SEEN:
        if _SEEN is not None:
            _SEEN.add(message)
        log.warning(message)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
