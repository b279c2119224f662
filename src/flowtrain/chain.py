"""`flowtrain train CONFIG --from SRC`: prepare → precompute → train in one process.

Each stage is its own verb: `prepare_and_precompute` parses the arguments a user would give it with the CLI's own
parser and calls the verb's own function, so each writes exactly what it writes alone (raw shards + manifest +
prepare_report.json, the latent cache; `cmd_train` then trains) and keeps its rules on earlier output: refused
unless `--overwrite`, an unfinished cache of the same settings continued.
What the chain adds is one process (imports and the torch runtime are paid once, and the encoders are freed before
the transformer loads) and the reuse of stages whose output is current, decided here without loading a model:

- prepare is skipped when SRC is itself a prepared folder, or when the raw folder holds shards prepared from SRC as
  it is now: the raw manifest's source path, prepare settings and `source_signature` (a stat of every listed file,
  no decoding; `prepare.SourceHasher`) all match;
- precompute is skipped when dataset.cache_dir holds a finished cache whose fingerprint is the one this config
  would write (`precompute.cache_fingerprint`) and that was made from the raw folder's current manifest
  (`source_digest`).

The decisions only read small JSON files and stat the source: nothing heavy is imported to make them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from flowtrain.data.fs import FsPath, as_path

RAW_KIND = "flowtrain.raw"  # the kinds `prepare` and `precompute` write into their manifest.json
CACHE_KIND = "flowtrain.cache"


def default_raw_dir(cache_dir: str | Path) -> Path | FsPath:
    """Where `--from` puts the raw shards unless told: next to the cache, named after it (`data/cache-raw`, or
    `s3://bucket/cache-raw` for a cache at a URL)."""
    cache = as_path(cache_dir)
    return cache.parent / (cache.name + "-raw")


def _manifest(folder: Path | FsPath) -> dict[str, Any] | None:
    try:
        data = json.loads((as_path(folder) / "manifest.json").read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_prepared(src: str | Path) -> bool:
    """`src` is the finished output of `flowtrain prepare` (its manifest is written last)."""
    m = _manifest(as_path(src))
    return m is not None and m.get("kind") == RAW_KIND


def raw_is_current(raw_dir: str | Path, src: str | Path, settings: dict[str, Any]) -> tuple[bool, str]:
    """(whether `raw_dir` holds shards prepared from `src` as it is now with `settings`, why)."""
    from flowtrain.data.fs import describe
    from flowtrain.data.prepare import source_signature

    m = _manifest(as_path(raw_dir))
    if m is None or m.get("kind") != RAW_KIND:
        return False, "no finished raw shards there"
    if m.get("source") != describe(src):
        return False, f"prepared from {m.get('source')}"
    if m.get("settings") != settings:
        return False, f"prepared with {m.get('settings')}, not {settings}"
    if m.get("source_signature") != source_signature(src):
        return False, f"{src} changed since it was prepared"
    return True, f"prepared from {src} as it is now"


def cache_is_current(cache_dir: str | Path, raw_dir: str | Path, fingerprint_id: str) -> tuple[bool, str]:
    """(whether `cache_dir` is a finished cache with fingerprint `fingerprint_id` made from `raw_dir`'s current
    shards, why)."""
    from flowtrain.data.prepare import raw_digest

    m = _manifest(as_path(cache_dir))
    if m is None or m.get("kind") != CACHE_KIND:
        return False, "no finished cache there"
    found = (m.get("fingerprint") or {}).get("id")
    if found != fingerprint_id:
        return False, f"fingerprint {found}, this config's is {fingerprint_id}"
    if m.get("source_digest") != raw_digest(raw_dir):
        return False, f"made from other raw shards than {raw_dir}'s"
    return True, f"fingerprint {fingerprint_id}, made from {raw_dir}"


def resolution_for(cache_dir: str | Path, given: int | None, default: int) -> int:
    """precompute's resolution: the one given, else the finished cache's in `cache_dir` (a rerun without the flag
    reuses it), else `default`."""
    if given is not None:
        return given
    m = _manifest(as_path(cache_dir))
    found = (m or {}).get("fingerprint", {}).get("resolution") if (m or {}).get("kind") == CACHE_KIND else None
    return found if isinstance(found, int) else default


def prepare_and_precompute(args: argparse.Namespace, cfg: Any) -> None:
    """`train --from SRC`: run `prepare` and `precompute` as their verbs (with the arguments a user would give them),
    into the folders the run trains from, each skipped when its output is current. `args` are train's."""
    from flowtrain.cli import PRECOMPUTE_RESOLUTION, _bucket_spec, parse_args

    if cfg.dataset.cache_dir is None:
        raise ValueError("train --from needs dataset.cache_dir (or --precomputed_data_dir): where the cache goes")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "train --from runs in one process: prepare and precompute first (or run `flowtrain train --from` once "
            "without a launcher), then launch the training processes"
        )
    shared = (["--overwrite"] if args.overwrite else []) + (["--quiet"] if args.quiet else [])
    src, cache = args.from_source, str(cfg.dataset.cache_dir)
    if is_prepared(src):
        raw = src
        print(f"prepare: {src} is prepared already: using it")
    else:
        raw = args.raw_dir or str(default_raw_dir(cache))
        dups = ["--keep-duplicates"] if args.keep_duplicates else []
        prep = parse_args(["prepare", src, "--out", raw, *dups, *shared])
        settings = {"resolution": prep.resolution, "min_size": prep.min_size, "keep_duplicates": prep.keep_duplicates}
        current, why = raw_is_current(raw, src, settings)
        if current:
            print(f"prepare: reusing {raw} ({why})")
        else:
            prep.func(prep)
    from flowtrain.data.clips import clip_options, clip_settings
    from flowtrain.data.precompute import cache_fingerprint, read_raw_manifest
    from flowtrain.models import get_family

    resolution = resolution_for(cache, args.resolution, PRECOMPUTE_RESOLUTION)
    pre = parse_args(["precompute", raw, "--out", cache, "--config", args.config, "--resolution", str(resolution),
                      *args.overrides, *shared])  # fmt: skip
    raw_manifest = read_raw_manifest(raw)
    video = clip_settings(clip_options(get_family(cfg.model.family), raw_manifest, cfg.dataset.video), raw_manifest)
    # precompute reads dataset.buckets from the config itself; the spec here is only for the fingerprint's buckets
    buckets = _bucket_spec(pre, cfg.model, cfg.dataset.buckets)
    current, why = cache_is_current(cache, raw, cache_fingerprint(cfg.model, resolution, video, buckets)["id"])
    if current:
        print(f"precompute: reusing {cache} ({why})")
        return
    # The encoders die with precompute's frame (reference counting; tests/e2e/test_chain.py checks that they are gone
    # when the transformer loads). No gc.collect(): a full collection costs ~0.25 s with torch loaded, for nothing.
    pre.func(pre)
