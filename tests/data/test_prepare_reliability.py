"""`prepare` on hostile input, beyond tests/data/test_prepare.py: real decompression bombs (a tiny file that
claims billions of pixels), huge but legal images, every EXIF orientation, more odd modes and corruptions — and
the counts always add up."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowtrain.data.prepare import prepare


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width×height RGB pixels, with (almost) no data: Pillow sees the size at open."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png(arr_or_im, **kw) -> bytes:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def put(folder: Path, name: str, data: bytes, caption: str | None = "a caption") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")


def rows(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {r["key"]: r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()}


def decoded(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))


def blocks() -> np.ndarray:
    """A 16x24 RGB image of 2x3 distinct 8px colour blocks: every flip / rotation of it is distinguishable."""
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[255, 255, 0], [0, 255, 255], [255, 0, 255]]])
    return np.kron(colours, np.ones((8, 8, 1))).astype(np.uint8)


# How each EXIF orientation maps the stored pixels to the displayed ones (EXIF 2.3, tag 0x0112), written with
# numpy so the test does not rely on the Pillow function prepare itself uses.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def test_every_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    stored = blocks()
    for o in DISPLAYED:
        exif = Image.Exif()
        exif[0x0112] = o
        put(src, f"o{o}.png", png(stored, exif=exif.tobytes()), caption=f"orientation {o}")
    report = prepare(src, tmp_path / "out", progress=False)
    assert (report.written, report.skipped) == (8, 0)
    got = rows(tmp_path / "out")
    for o, fn in DISPLAYED.items():
        want = np.ascontiguousarray(fn(stored))
        assert np.array_equal(decoded(got[f"o{o}"]), want), o
        assert (got[f"o{o}"]["width"], got[f"o{o}"]["height"]) == (want.shape[1], want.shape[0])
        if o != 1:  # re-encoded without the tag, so no viewer rotates it a second time
            assert Image.open(io.BytesIO(got[f"o{o}"]["image"])).getexif().get(0x0112) in (None, 1)


def test_real_decompression_bombs_are_skipped_without_decoding(tmp_path):
    """Files of a few hundred bytes that claim 225M and 900M pixels; a normal image next to them still passes."""
    src = tmp_path / "src"
    put(src, "warns.png", bomb_png(15_000, 15_000))  # above the limit (~179M pixels): Pillow warns, prepare skips
    put(src, "errors.png", bomb_png(30_000, 30_000))  # above twice the limit: Pillow refuses outright
    put(src, "ok.png", png(blocks()))
    report = prepare(src, tmp_path / "out", progress=False)
    reasons = {s["key"]: s["reason"] for s in report.skipped_items}
    assert report.written == 1 and set(reasons) == {"warns", "errors"}
    assert all("decompression bomb guard" in r for r in reasons.values())
    assert all(len(r) < 300 for r in reasons.values())


def test_huge_legal_image_is_decoded_and_downscaled(tmp_path):
    src = tmp_path / "src"
    big = np.zeros((3000, 4000, 3), dtype=np.uint8)
    big[:, 2000:] = (10, 200, 30)  # left half black, right half green: the resize must keep that layout
    put(src, "big.png", png(big))
    report = prepare(src, tmp_path / "out", resolution=64, progress=False)
    assert report.written == 1
    row = rows(tmp_path / "out")["big"]
    assert (row["width"], row["height"]) == (85, 64)
    px = decoded(row)
    assert tuple(px[32, 5]) == (0, 0, 0) and tuple(px[32, 80]) == (10, 200, 30)


def test_more_modes_and_corruptions(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    # modes
    put(src, "la.png", png(Image.fromarray(rng.integers(0, 256, (20, 20, 2), np.uint8), "LA")))
    bits = Image.fromarray(rng.integers(0, 2, (20, 20), np.uint8) * 255).convert("1")
    put(src, "bilevel.png", png(bits))
    put(src, "rgb16.tif", _tiff16(np.full((20, 20), 65535)))  # 16-bit grey TIFF, full white
    put(src, "pal_noalpha.gif", _gif(rng))
    # corruptions
    full = png(rng.integers(0, 256, (30, 30, 3), np.uint8))
    crc = bytearray(full)
    crc[-20] ^= 0xFF  # a flipped byte near the end (IDAT data / CRC)
    put(src, "badcrc.png", bytes(crc))
    put(src, "truncated.png", full[: len(full) // 2])
    put(src, "header_only.png", full[:33])
    put(src, "html.jpg", b"<html><body>404 Not Found</body></html>")
    # captions
    put(src, "bom.png", png(rng.integers(0, 256, (20, 20, 3), np.uint8)), caption=None)
    (src / "bom.txt").write_bytes("\ufeffa caption with a byte-order mark".encode())
    put(src, "spaces.png", png(rng.integers(0, 256, (20, 20, 3), np.uint8)), caption="\u00a0\u2003 \n")
    # duplicates of a duplicate: the first one written wins, both copies name it
    dup = png(rng.integers(0, 256, (20, 20, 3), np.uint8))
    for name in ("dup_a.png", "dup_b.png", "dup_c.png"):
        put(src, name, dup)
    report = prepare(src, tmp_path / "out", progress=False)
    got = rows(tmp_path / "out")
    reasons = {s["key"]: s["reason"] for s in report.skipped_items}
    assert set(got) == {"la", "bilevel", "rgb16", "pal_noalpha", "bom", "dup_a"}, reasons
    assert got["bom"]["caption"] == "a caption with a byte-order mark"
    assert tuple(decoded(got["rgb16"])[0, 0]) == (255, 255, 255)  # 16-bit grey scaled, not clipped
    assert set(reasons) == {"badcrc", "truncated", "header_only", "html", "spaces", "dup_b", "dup_c"}
    assert reasons["dup_b"] == reasons["dup_c"] == "duplicate of dup_a"
    assert reasons["spaces"] == "empty caption" and reasons["html"] == "not a recognised image file"
    for key in ("badcrc", "truncated", "header_only"):
        assert reasons[key].startswith(("cannot decode image", "not a recognised image")), reasons[key]


def _tiff16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="TIFF")
    return buf.getvalue()


def _gif(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).convert("P").save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["folder", "tsv", "jsonl"])
def test_counts_add_up(tmp_path, kind):
    """written + skipped == seen == items listed, the reasons' counts sum to skipped, the shards hold `written`."""
    rng = np.random.default_rng(2)
    imgs = tmp_path / "imgs"
    listed = []
    for i in range(7):
        data = png(rng.integers(0, 256, (20 + i, 20, 3), np.uint8))
        put(imgs, f"g{i}.png", data, caption=f"good {i}")
        listed.append((f"g{i}.png", f"good {i}"))
    put(imgs, "dup.png", (imgs / "g0.png").read_bytes(), caption="dup")
    put(imgs, "zero.png", b"", caption="zero")
    put(imgs, "bomb.png", bomb_png(20_000, 20_000), caption="bomb")
    put(imgs, "tiny.png", png(rng.integers(0, 256, (4, 4, 3), np.uint8)), caption="tiny")
    put(imgs, "nocap.png", png(rng.integers(0, 256, (20, 20, 3), np.uint8)), caption=None)
    listed += [("dup.png", "dup"), ("zero.png", "zero"), ("bomb.png", "bomb"), ("tiny.png", "tiny")]
    listed += [("nocap.png", None), ("missing.png", "gone")]
    if kind == "folder":
        src, n_items = imgs, len(listed) - 1  # a folder cannot list a missing file
    elif kind == "tsv":
        src = tmp_path / "list.tsv"
        src.write_text("".join(f"imgs/{p}\t{c or ''}\n" for p, c in listed) + "no tab here\n")
        n_items = len(listed) + 1
    else:
        src = tmp_path / "list.jsonl"
        lines = [json.dumps({"image": f"imgs/{p}", **({"caption": c} if c else {})}) for p, c in listed]
        src.write_text("\n".join([*lines, "{broken"]) + "\n")
        n_items = len(listed) + 1
    out = tmp_path / "out"
    report = prepare(src, out, shard_size=3, progress=False)
    on_disk = json.loads((out / "prepare_report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report.written == 7
    assert report.written + report.skipped == on_disk["seen"] == n_items
    assert sum(on_disk["skipped_by_reason"].values()) == report.skipped == len(report.skipped_items)
    assert Counter(r["key"] for r in report.skipped_items).most_common(1)[0][1] == 1  # each item reported once
    assert manifest["num_rows"] == sum(s["rows"] for s in manifest["shards"]) == report.written
    assert len(rows(out)) == report.written
