"""`flowtrain inspect SRC|RAW_DIR`: what a dataset holds and what is wrong with it, before any training.

Reads any source `prepare` reads (or a prepared raw folder) and reports: items with problems (corrupt image,
missing or empty caption, unreadable listing lines), image sizes and aspect ratios (a histogram PNG, and the bucket
each image would get), caption length statistics, the trigger word's coverage and near-duplicate groups by
perceptual hash (`imagehash`). Output: `inspect_report.json`, `inspect_histogram.png` and a readable summary.

It decodes no more than it needs: sizes come from the image header; only the perceptual hash needs pixels, and
JPEGs are then decoded at a reduced scale (`Image.draft`), which is most of the cost saved. `--no-dedup` reads
headers only (then a truncated JPEG is not noticed; `prepare` decodes every image in full and will skip it).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from flowtrain.data.fs import FsPath, as_path
from flowtrain.data.prepare import SkipItem, _pil_guards, _read_bytes, reason_kind, to_rgb
from flowtrain.data.sources import SourceItem, count_items, iter_source

REPORT_NAME = "inspect_report.json"
HISTOGRAM_NAME = "inspect_histogram.png"
HASH_SIZE = 8  # 64-bit pHash, imagehash's default
DEFAULT_DUP_DISTANCE = 4  # Hamming distance on 64 bits at which two images are counted as near-duplicates
# Aspect-ratio bins (width / height) on a log scale, 1:4 ... 4:1, with open ends for anything more extreme.
ASPECT_EDGES = tuple(float(x) for x in np.round(2.0 ** np.linspace(-2.0, 2.0, 17), 3))


@dataclass
class _Seen:
    """What was learnt about one item: its problems (none = usable) and what could be measured."""

    key: str
    path: str | None
    caption: str | None
    problems: list[str]
    size: tuple[int, int] | None = None
    phash: int | None = None


# ---- pure statistics -------------------------------------------------------------------------------------------


def quantiles(values: list[float] | np.ndarray) -> dict[str, float] | None:
    """min / mean / median / p95 / max of `values` (None when empty), rounded for reading."""
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=np.float64)
    stats = {"min": a.min(), "mean": a.mean(), "median": np.median(a), "p95": np.percentile(a, 95), "max": a.max()}
    return {k: round(float(v), 3) for k, v in stats.items()}


def aspect_histogram(sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Counts of width/height in the log-spaced `ASPECT_EDGES` bins, plus the open-ended bins below and above."""
    if not sizes:
        return []
    aspects = np.array([w / h for w, h in sizes])
    edges = np.array(ASPECT_EDGES)
    idx = np.searchsorted(edges, aspects, side="right")  # 0 = below the first edge, len(edges) = at/above the last
    counts = np.bincount(idx, minlength=len(edges) + 1)
    labels = (
        [f"< {edges[0]:g}"]
        + [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
        + [f">= {edges[-1]:g}"]
    )
    return [{"aspect": label, "count": int(n)} for label, n in zip(labels, counts, strict=True)]


def size_stats(sizes: list[tuple[int, int]], resolution: int | None) -> dict[str, Any]:
    """Width, height, short side and megapixel statistics; how many are below `resolution` on the short side."""
    w = np.array([s[0] for s in sizes], dtype=np.float64)
    h = np.array([s[1] for s in sizes], dtype=np.float64)
    out: dict[str, Any] = {
        "width": quantiles(w),
        "height": quantiles(h),
        "short_side": quantiles(np.minimum(w, h)),
        "megapixels": quantiles(w * h / 1e6),
        "portrait": int((h > w).sum()),
        "landscape": int((w > h).sum()),
        "square": int((w == h).sum()),
    }
    if resolution is not None:
        out["short_side_below_resolution"] = int((np.minimum(w, h) < resolution).sum())
    return out


def caption_stats(captions: list[str]) -> dict[str, Any]:
    """Word and character counts of the (non-empty) captions."""
    return {
        "count": len(captions),
        "words": quantiles([len(c.split()) for c in captions]),
        "chars": quantiles([len(c) for c in captions]),
    }


def trigger_coverage(captions: dict[str, str], word: str) -> dict[str, Any]:
    """How many captions contain `word` as a whole word (case-insensitive); the first keys without it."""
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    without = [k for k, c in captions.items() if not pattern.search(c)]
    n = len(captions)
    return {
        "word": word,
        "with": n - len(without),
        "without": len(without),
        "coverage": round((n - len(without)) / n, 4) if n else None,
        "keys_without": without[:20],
    }


def near_duplicate_groups(hashes: np.ndarray, threshold: int) -> list[list[int]]:
    """Groups (index lists, each sorted, groups sorted by first index) of 64-bit hashes within `threshold` bits.

    hashes: (N,) uint64. Two hashes within `threshold` bits agree exactly on at least one of `threshold + 1`
    disjoint bit chunks (pigeonhole), so only items sharing a chunk value are compared: near-linear instead of
    all N² pairs. Pairs are joined transitively (union-find), so a group's ends may differ by more than `threshold`.
    """
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    chunks = threshold + 1
    bounds = np.linspace(0, 64, chunks + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(part, kind="stable")
        _, starts = np.unique(part[order], return_index=True)
        for members in np.split(order, starts[1:]):
            if len(members) < 2:
                continue
            block = hashes[members]
            dist = np.bitwise_count(block[:, None] ^ block[None, :])  # (m, m) Hamming distances
            for a, b in zip(*np.nonzero(np.triu(dist <= threshold, k=1)), strict=True):
                ra, rb = find(int(members[a])), find(int(members[b]))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def bucket_assignment(
    sizes: list[tuple[int, int]],
    resolution: int | None,
    *,
    sides: Sequence[int] = (),
    multiple: int = 16,
    max_aspect: float = 2.0,
) -> dict[str, int] | None:
    """{"WxH": count} of the aspect-ratio bucket `precompute --buckets --resolution R --bucket-sides S...
    --max-aspect A` would give each (width, height), in bucket order; None without a resolution. `multiple`: the
    model's pixel multiple (16 for every shipped family: VAE factor 8 x 2x2 patches)."""
    if resolution is None or not sizes:
        return None
    from flowtrain.data.buckets import BucketSpec, bucket_counts

    spec = BucketSpec((max(resolution // multiple * multiple, multiple), *sides), multiple, max_aspect)
    counts = bucket_counts([(h, w) for w, h in sizes], spec)
    return {f"{w}x{h}": n for (h, w), n in counts.items()}


# ---- reading the items -----------------------------------------------------------------------------------------


def _phash(im: Image.Image) -> int:
    import imagehash

    if im.format == "JPEG":
        # Decode only the luma plane at 1/2..1/8 scale (pHash reads a 32x32 grey image): ~3x faster than a full
        # decode, and the hash of a 1024 px photo came out the same.
        im.draft("L", (8 * HASH_SIZE, 8 * HASH_SIZE))
    elif im.mode not in ("L", "RGB"):
        im = to_rgb(im)  # transparency on white, 16-bit scaled: as prepare will store it
    return int(str(imagehash.phash(im, hash_size=HASH_SIZE)), 16)


def look_at_image(data: bytes, want_hash: bool) -> tuple[tuple[int, int], int | None]:
    """((width, height), pHash or None) of encoded image bytes; SkipItem with the reason when it is unusable.

    The size is read from the header; pixels are decoded only for the hash (or checked with `verify` without)."""
    if not data:
        raise SkipItem("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        size = im.size
        if want_hash:
            return size, _phash(im)
        im.verify()  # structure and checksums where the format has them, without decoding pixels
        return size, None
    except Image.UnidentifiedImageError as exc:
        raise SkipItem("not a recognised image file") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipItem(f"image too large (decompression bomb guard): {exc}") from exc
    except Exception as exc:
        raise SkipItem(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _examine(item: SourceItem, want_hash: bool) -> _Seen:
    path = str(item.image_path) if item.image_path is not None else item.origin
    seen = _Seen(item.key, path, None, [])
    if item.problem:
        seen.problems.append(item.problem)
    if item.caption is None:
        if not item.problem:
            seen.problems.append("missing caption")
    elif not item.caption.strip():
        seen.problems.append("empty caption")
    else:
        seen.caption = item.caption.strip()
    if item.data is None and item.image_path is None:
        return seen
    try:
        seen.size, seen.phash = look_at_image(_read_bytes(item), want_hash)
    except SkipItem as exc:
        seen.problems.append(" ".join(str(exc).split()))
    return seen


def _raw_manifest(src: str | Path) -> dict | None:
    path = as_path(src) / "manifest.json"  # a local folder or an fsspec URL
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == "flowtrain.raw" else None


def _iter_raw(raw_dir: Path | FsPath, manifest: dict, want_hash: bool) -> Iterator[_Seen]:
    """Rows of prepared shards: sizes from the width/height columns; image bytes are read only for hashing."""
    import pyarrow.parquet as pq

    columns = ["key", "caption", "width", "height"] + (["image"] if want_hash else [])
    for shard in manifest["shards"]:
        path = raw_dir / shard["file"]
        source = path.open("rb") if isinstance(path, FsPath) else path
        for batch in pq.ParquetFile(source).iter_batches(batch_size=64, columns=columns):
            for row in batch.to_pylist():
                seen = _Seen(
                    row["key"], f"{shard['file']}:{row['key']}", row["caption"], [], (row["width"], row["height"])
                )
                if want_hash:
                    try:
                        seen.phash = look_at_image(row["image"], True)[1]
                    except SkipItem as exc:
                        seen.problems.append(str(exc))
                yield seen


# ---- the verb --------------------------------------------------------------------------------------------------


def inspect_dataset(
    src: str | Path,
    *,
    trigger: str | None = None,
    resolution: int | None = None,
    dedup: bool = True,
    dup_distance: int = DEFAULT_DUP_DISTANCE,
    progress: bool = True,
    out: str | Path | None = None,
    bucket_sides: Sequence[int] = (),
    multiple: int = 16,
    max_aspect: float = 2.0,
) -> dict[str, Any]:
    """The report (a JSON-ready dict) for a source or a prepared raw folder; see the module docstring. With `out`,
    the report and the histogram PNG are written there (`write_outputs`). `bucket_sides`, `multiple`, `max_aspect`:
    the bucket preview's settings, as precompute's --bucket-sides, the model's pixel multiple and --max-aspect.

    `items_ok + items_with_problems == seen`; an item may have several problems (a corrupt image and no caption),
    so `problems_by_reason` can sum to more than `items_with_problems`."""
    if not 0 <= dup_distance < 64:
        raise ValueError(f"dup_distance must be in 0..63 bits, got {dup_distance}")
    manifest = _raw_manifest(src)
    if manifest is not None:
        kind, total = "raw", manifest["num_rows"]
        seen_iter = _iter_raw(as_path(src), manifest, dedup)
    else:
        items = iter_source(src)  # errors for an unknown source now
        kind, total = "source", count_items(src)
        seen_iter = (_examine(item, dedup) for item in items)
    seen: list[_Seen] = []
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True, desc="inspect")
    with _pil_guards(), bar:
        for s in seen_iter:
            seen.append(s)
            bar.update(1)
    buckets = {"sides": list(bucket_sides), "multiple": multiple, "max_aspect": max_aspect}
    report = build_report(str(src), kind, seen, trigger=trigger, resolution=resolution, dedup=dedup, dist=dup_distance,
                          buckets=buckets)  # fmt: skip
    if out is not None:
        write_outputs(report, out, [s.size for s in seen if s.size is not None])
    return report


def build_report(
    src: str,
    kind: str,
    seen: list[_Seen],
    *,
    trigger: str | None,
    resolution: int | None,
    dedup: bool,
    dist: int,
    buckets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    reasons = Counter(reason_kind(p) for s in seen for p in s.problems)
    sizes = [s.size for s in seen if s.size is not None]
    captions = {s.key: s.caption for s in seen if s.caption is not None}
    bad = [s for s in seen if s.problems]
    report: dict[str, Any] = {
        "source": src,
        "kind": kind,
        "seen": len(seen),
        "items_ok": len(seen) - len(bad),
        "items_with_problems": len(bad),
        "corrupt_images": sum(1 for s in seen for p in s.problems if _is_image_problem(p)),
        "missing_captions": reasons.get("missing caption", 0),
        "empty_captions": reasons.get("empty caption", 0),
        "problems_by_reason": dict(reasons.most_common()),
        "problems": [{"key": s.key, "path": s.path, "reasons": s.problems} for s in bad],
        "images_measured": len(sizes),
        "sizes": size_stats(sizes, resolution) if sizes else None,
        "aspect_histogram": aspect_histogram(sizes),
        "resolution": resolution,
        "buckets": bucket_assignment(sizes, resolution, **(buckets or {})),
        "bucket_settings": {"resolution": resolution, **(buckets or {})} if resolution else None,
        "captions": caption_stats(list(captions.values())),
        "trigger": trigger_coverage(captions, trigger) if trigger else None,
        "near_duplicates": None,
    }
    if dedup:
        hashed = [s for s in seen if s.phash is not None]
        hashes = np.array([s.phash for s in hashed], dtype=np.uint64)
        groups = [[hashed[i].key for i in g] for g in near_duplicate_groups(hashes, dist)]
        report["near_duplicates"] = {
            "hash": f"pHash {HASH_SIZE * HASH_SIZE} bit",
            "max_distance": dist,
            "groups": groups,
            "images_in_groups": sum(len(g) for g in groups),
        }
    return report


def _is_image_problem(reason: str) -> bool:
    return reason.startswith(("not a recognised image", "cannot decode image", "empty file", "image too large"))


def plot_histogram(report: dict[str, Any], sizes: list[tuple[int, int]] | None, path: Path) -> None:
    """Aspect-ratio histogram, width x height scatter and (when known) bucket counts, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and never one needed
    import matplotlib.pyplot as plt

    panels = 3 if report.get("buckets") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    hist = report["aspect_histogram"]
    axes[0].bar(range(len(hist)), [b["count"] for b in hist], color="#4C72B0")
    axes[0].set_xticks(range(len(hist)), [b["aspect"] for b in hist], rotation=70, fontsize=7)
    axes[0].set_title("aspect ratio (width / height)")
    axes[0].set_ylabel("images")
    if sizes:
        w, h = zip(*sizes, strict=True)
        axes[1].scatter(w, h, s=6, alpha=0.4, color="#DD8452")
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
    axes[1].set_xlabel("width (px)")
    axes[1].set_ylabel("height (px)")
    axes[1].set_title(f"resolution ({len(sizes or [])} images)")
    if panels == 3:
        buckets = sorted(report["buckets"].items(), key=lambda kv: -kv[1])
        axes[2].bar(range(len(buckets)), [n for _, n in buckets], color="#55A868")
        axes[2].set_xticks(range(len(buckets)), [b for b, _ in buckets], rotation=70, fontsize=7)
        axes[2].set_title(f"buckets at {report['resolution']} px")
    fig.suptitle(f"flowtrain inspect: {report['source']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(report: dict[str, Any]) -> str:
    """The readable summary printed at the end (the JSON report has every detail)."""
    lines = [
        f"inspect: {report['seen']} item(s) in {report['source']} ({report['kind']}): "
        f"{report['items_ok']} ok, {report['items_with_problems']} with problems",
        f"  corrupt images: {report['corrupt_images']}, missing captions: {report['missing_captions']}, "
        f"empty captions: {report['empty_captions']}",
    ]
    for reason, n in list(report["problems_by_reason"].items())[:8]:
        lines.append(f"  {n:>6} x {reason}")
    sizes = report["sizes"]
    if sizes:
        w, h, mp = sizes["width"], sizes["height"], sizes["megapixels"]
        lines.append(
            f"  sizes: width {w['min']:g}-{w['max']:g} (median {w['median']:g}), height {h['min']:g}-{h['max']:g} "
            f"(median {h['median']:g}), {mp['median']:g} MP median; {sizes['landscape']} landscape, "
            f"{sizes['portrait']} portrait, {sizes['square']} square"
        )
        if "short_side_below_resolution" in sizes:
            lines.append(f"  short side below {report['resolution']} px: {sizes['short_side_below_resolution']}")
    top = sorted((b for b in report["aspect_histogram"] if b["count"]), key=lambda b: -b["count"])[:4]
    if top:
        lines.append("  commonest aspect ratios: " + ", ".join(f"{b['aspect']} ({b['count']})" for b in top))
    if report["buckets"]:
        lines.append(f"  buckets: {len(report['buckets'])} used")
    words = report["captions"]["words"]
    if words:
        lines.append(
            f"  captions: {report['captions']['count']}, words min {words['min']:g} / median {words['median']:g} / "
            f"max {words['max']:g}"
        )
    if report["trigger"]:
        t = report["trigger"]
        lines.append(f"  trigger {t['word']!r}: in {t['with']} of {t['with'] + t['without']} captions")
    dups = report["near_duplicates"]
    if dups is not None:
        lines.append(
            f"  near-duplicates (pHash distance <= {dups['max_distance']}): {len(dups['groups'])} group(s), "
            f"{dups['images_in_groups']} images"
        )
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out: str | Path, sizes: list[tuple[int, int]] | None = None) -> list[Path]:
    """`inspect_report.json` and `inspect_histogram.png` under `out` (created); written to a temporary name first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / REPORT_NAME, out / HISTOGRAM_NAME
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    plot_histogram(report, sizes, png_path)
    return [json_path, png_path]
