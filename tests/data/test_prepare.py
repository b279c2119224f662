"""`flowtrain.data.prepare`: every kind of bad input is skipped with a reason, good input lands in readable shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowtrain.data import prepare as prepare_mod
from flowtrain.data.prepare import PrepareReport, prepare
from flowtrain.data.sources import iter_source

_rng = np.random.default_rng(0)


def noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """Random pixels, so that no two test images are accidentally byte-identical (duplicates are skipped)."""
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    return Image.fromarray(_rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode=mode)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def put(folder: Path, name: str, data: bytes, caption: str | bytes | None = "a caption") -> Path:
    """Write an image file and (unless None) its same-name .txt caption."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if caption is not None:
        raw = caption.encode() if isinstance(caption, str) else caption
        path.with_suffix(".txt").write_bytes(raw)
    return path


def read_rows(out: Path) -> dict[str, dict]:
    """All shard rows by key, read back with plain pyarrow (no flowtrain code)."""
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {}
    for shard in manifest["shards"]:
        for row in pq.read_table(out / shard["file"]).to_pylist():
            rows[row["key"]] = row
    return rows


def pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])))


def reasons(report: PrepareReport) -> dict[str, str]:
    return {s["key"]: s["reason"] for s in report.skipped_items}


# ---- folder source: one realistic messy folder, prepared once --------------------------------------------------

GOOD = {"a_orig", "clean", "cmyk", "deep/web", "gray16", "palette", "rgba", "rotated", "big"}
BAD = {  # key -> expected substring of the reason
    "corrupt": "not a recognised image",
    "truncated": "cannot decode image: OSError: image file is truncated",
    "zero": "empty file",
    "textfile": "not a recognised image",
    "nocap": "missing caption",
    "emptycap": "empty caption",
    "latin1": "caption is not UTF-8",
    "tiny": "too small",
    "z_dup": "duplicate of a_orig",
}


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, Path, PrepareReport, dict[str, bytes]]:
    src = tmp_path_factory.mktemp("src")
    originals: dict[str, bytes] = {}
    originals["a_orig"] = put(src, "a_orig.png", encode(noise(40, 30)), "  an original \n").read_bytes()
    put(src, "z_dup.png", originals["a_orig"], "same bytes, other caption")
    originals["clean"] = put(src, "clean.jpg", encode(noise(36, 28), "JPEG")).read_bytes()
    originals["deep/web"] = put(src, "deep/web.webp", encode(noise(24, 24), "WEBP", lossless=True)).read_bytes()
    # CMYK pure red (C=0, M=Y=255); a naive channel drop would give cyan/black
    put(src, "cmyk.jpg", encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95))
    # 16-bit grey: left half full white, right half mid-grey; naive conversion would clip both to 255
    gray = np.full((24, 32), 65535, dtype=np.uint16)
    gray[:, 16:] = 32896  # 32896 / 257 = 128
    put(src, "gray16.png", encode(Image.fromarray(gray)))
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (12, 0, 24, 24))  # right half red, left half index 0 = transparent (black if not composited)
    put(src, "palette.png", encode(pal, transparency=0))
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, 10:, 3] = 255  # left half fully transparent, right half opaque red
    put(src, "rgba.png", encode(Image.fromarray(rgba, "RGBA")))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    put(src, "rotated.jpg", encode(noise(40, 20), "JPEG", exif=exif.tobytes()))
    put(src, "big.png", encode(noise(64, 48)))  # short side 48 > resolution 32 -> 43x32
    # bad items
    put(src, "corrupt.png", _rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    full = encode(noise(30, 30), "JPEG", quality=95)  # below resolution: only the forced load() can catch it
    put(src, "truncated.jpg", full[: len(full) // 2])
    put(src, "zero.png", b"")
    put(src, "textfile.jpg", b"this is not an image at all\n")
    put(src, "nocap.png", encode(noise(20, 20)), caption=None)
    put(src, "emptycap.png", encode(noise(20, 20)), caption=" \n\t ")
    put(src, "latin1.png", encode(noise(20, 20)), caption="caf\xe9 cr\xe8me".encode("latin-1"))
    put(src, "tiny.png", encode(noise(8, 40)))
    # not items at all: an orphan caption and a hidden macOS resource fork
    (src / "orphan.txt").write_text("no image here")
    put(src, "._a_orig.png", b"\x00\x05\x16\x07junk")
    out = tmp_path_factory.mktemp("out")
    report = prepare(src, out, resolution=32, shard_size=4, progress=False)
    return src, out, report, originals


def test_folder_counts_and_reasons(messy):
    src, out, report, _ = messy
    assert report.written + report.skipped == len(GOOD) + len(BAD)
    assert report.written == len(GOOD)
    got = reasons(report)
    assert set(got) == set(BAD)
    for key, expected in BAD.items():
        assert expected in got[key], (key, got[key])
        assert "\n" not in got[key]
    on_disk = json.loads((out / "prepare_report.json").read_text())
    assert (on_disk["written"], on_disk["skipped"], on_disk["seen"]) == (len(GOOD), len(BAD), len(GOOD) + len(BAD))
    assert {s["key"]: s["reason"] for s in on_disk["skipped_items"]} == got
    paths = {s["key"]: s["path"] for s in on_disk["skipped_items"]}
    assert paths["nocap"] == str(src / "nocap.png") and paths["z_dup"] == str(src / "z_dup.png")
    assert on_disk["skipped_by_reason"]["duplicate"] == 1


def test_folder_shards_and_manifest(messy):
    src, out, report, _ = messy
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "flowtrain.raw" and manifest["version"] == 1
    assert manifest["resolution"] == 32 and manifest["num_rows"] == len(GOOD)
    assert manifest["source"] == str(src.resolve()) and manifest["created"]
    assert [s["file"] for s in manifest["shards"]] == ["raw-00000.parquet", "raw-00001.parquet", "raw-00002.parquet"]
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 1]
    assert report.shards == [s["file"] for s in manifest["shards"]]
    assert not list(out.glob("*.tmp"))
    schema = pq.read_schema(out / "raw-00000.parquet")
    assert schema.field("image").type == pa.binary() and schema.field("width").type == pa.int32()
    assert schema.names == ["key", "caption", "image", "width", "height", "format", "num_frames", "fps"]
    rows = read_rows(out)
    assert set(rows) == GOOD
    for row in rows.values():
        im = Image.open(io.BytesIO(row["image"]))
        assert im.mode == "RGB" and im.size == (row["width"], row["height"]) and im.format == row["format"]


def test_folder_keeps_clean_bytes_and_strips_captions(messy):
    _, out, _, originals = messy
    rows = read_rows(out)
    for key in ("a_orig", "clean", "deep/web"):  # RGB, upright, not resized -> stored verbatim
        assert rows[key]["image"] == originals[key]
    assert (rows["clean"]["format"], rows["deep/web"]["format"]) == ("JPEG", "WEBP")
    assert rows["a_orig"]["caption"] == "an original"


def test_folder_converts_modes(messy):
    _, out, _, _ = messy
    rows = read_rows(out)
    for key in ("cmyk", "gray16", "palette", "rgba", "rotated", "big"):
        assert rows[key]["format"] == "PNG", key  # re-encoded because something changed
    r, g, b = pixels(rows["cmyk"]).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    g16 = pixels(rows["gray16"])
    assert tuple(g16[0, 0]) == (255, 255, 255) and tuple(g16[0, 31]) == (128, 128, 128)
    pal = pixels(rows["palette"])
    assert tuple(pal[0, 0]) == (255, 255, 255) and tuple(pal[0, 23]) == (255, 0, 0)
    rgba = pixels(rows["rgba"])
    assert tuple(rgba[0, 0]) == (255, 255, 255) and tuple(rgba[0, 19]) == (255, 0, 0)


def test_folder_orientation_and_resize(messy):
    _, out, _, _ = messy
    rows = read_rows(out)
    assert (rows["rotated"]["width"], rows["rotated"]["height"]) == (20, 40)  # stored 40x20 + orientation 6
    assert Image.open(io.BytesIO(rows["rotated"]["image"])).getexif().get(0x0112) is None
    assert (rows["big"]["width"], rows["big"]["height"]) == (43, 32)  # 64x48 -> short side 32, LANCZOS


# ---- other source kinds ----------------------------------------------------------------------------------------


def test_tsv_source(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "one.png").write_bytes(encode(noise(20, 20)))
    (imgs / "two.jpg").write_bytes(encode(noise(20, 30), "JPEG"))
    lines = [
        "image\tcaption",
        "imgs/one.png\tfirst caption",
        "",
        "imgs/two.jpg\tsecond\twith a tab",
        "imgs/missing.png\tgone",
        "no tab on this line",
    ]
    tsv = tmp_path / "list.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    report = prepare(tsv, tmp_path / "out", progress=False)
    assert (report.written, report.skipped) == (2, 2)
    got = reasons(report)
    assert got["imgs/missing"] == "image file not found"
    assert any(r.startswith("malformed line") for r in got.values())
    paths = {s["path"] for s in report.skipped_items}
    assert str(imgs / "missing.png") in paths and "list.tsv:6" in paths
    rows = read_rows(tmp_path / "out")
    assert rows["imgs/one"]["caption"] == "first caption"
    assert rows["imgs/two"]["caption"] == "second\twith a tab"


def test_jsonl_source(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(noise(20, 20)))
    (tmp_path / "b.png").write_bytes(encode(noise(24, 20)))
    records = [
        json.dumps({"image": "a.png", "caption": "from image/caption"}),
        json.dumps({"file_name": "b.png", "text": "from file_name/text"}),
        json.dumps({"path": "nope.png", "caption": "missing"}),
        json.dumps({"image": "a.png"}),  # no caption field
        "{not json",
    ]
    manifest = tmp_path / "meta.jsonl"
    manifest.write_text("\n".join(records) + "\n")
    report = prepare(manifest, tmp_path / "out", progress=False)
    assert (report.written, report.skipped) == (2, 3)
    got = sorted(reasons(report).values())
    assert got[0] == "image file not found" and got[2] == "missing caption" and got[1].startswith("invalid JSON")
    rows = read_rows(tmp_path / "out")
    assert {r["caption"] for r in rows.values()} == {"from image/caption", "from file_name/text"}


def test_parquet_source(tmp_path):
    good = [encode(noise(20, 20)), encode(noise(30, 20), "JPEG")]
    table = pa.table(
        {
            "image": pa.array([good[0], None, b"garbage", good[1]], type=pa.binary()),
            "caption": ["zero", "one", "two", "three"],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    report = prepare(tmp_path / "in.parquet", tmp_path / "out", progress=False)
    assert (report.written, report.skipped) == (2, 2)
    assert reasons(report) == {"row00000001": "no image in row", "row00000002": "not a recognised image file"}
    rows = read_rows(tmp_path / "out")
    assert rows["row00000000"]["image"] == good[0] and rows["row00000003"]["image"] == good[1]
    assert rows["row00000003"]["caption"] == "three"


def test_parquet_source_with_paths_and_keys(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(noise(20, 20)))
    table = pa.table({"key": ["k1", "k2"], "image": ["a.png", "missing.png"], "text": ["has file", "no file"]})
    pq.write_table(table, tmp_path / "in.parquet")
    report = prepare(tmp_path / "in.parquet", tmp_path / "out", progress=False)
    assert reasons(report) == {"k2": "image file not found"}
    assert read_rows(tmp_path / "out")["k1"]["caption"] == "has file"


@pytest.mark.parametrize("name", ["data.csv", "does-not-exist", "notes.txt"])
def test_unknown_source_raises(tmp_path, name):
    if name != "does-not-exist":
        (tmp_path / name).write_text("x")
    with pytest.raises(ValueError, match="accepted kinds") as err:
        iter_source(tmp_path / name)
    assert name in str(err.value)
    with pytest.raises(ValueError):
        prepare(tmp_path / name, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- run-level behaviour ---------------------------------------------------------------------------------------


def test_nothing_usable_writes_report_and_raises(tmp_path):
    put(tmp_path / "src", "x.png", encode(noise(20, 20)), caption=None)
    put(tmp_path / "src", "y.png", b"")
    with pytest.raises(ValueError, match="no usable images.*see report"):
        prepare(tmp_path / "src", tmp_path / "out", progress=False)
    on_disk = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert on_disk["written"] == 0 and on_disk["skipped"] == 2
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "MAX_IMAGE_PIXELS", 1000)
    put(tmp_path / "src", "warn.png", encode(noise(40, 40)))  # 1600 px: Pillow warns (> limit)
    put(tmp_path / "src", "error.png", encode(noise(64, 64)))  # 4096 px: Pillow errors (> 2x limit)
    put(tmp_path / "src", "ok.png", encode(noise(20, 20)))
    before = Image.MAX_IMAGE_PIXELS
    report = prepare(tmp_path / "src", tmp_path / "out", progress=False)
    assert report.written == 1
    got = reasons(report)
    assert "decompression bomb" in got["warn"] and "decompression bomb" in got["error"]
    assert before == Image.MAX_IMAGE_PIXELS  # the process-global limit is restored


def test_duplicate_of_a_broken_file_is_not_called_duplicate(tmp_path):
    put(tmp_path / "src", "a.png", b"\x89PNG broken", caption="first")
    put(tmp_path / "src", "b.png", b"\x89PNG broken", caption="second")
    put(tmp_path / "src", "c.png", encode(noise(20, 20)))
    report = prepare(tmp_path / "src", tmp_path / "out", progress=False)
    assert not any(r.startswith("duplicate") for r in reasons(report).values())


def test_rerun_replaces_stale_shards_and_prints_summary(tmp_path, capsys):
    for i in range(3):
        put(tmp_path / "src", f"{i}.png", encode(noise(20, 20)))
    put(tmp_path / "src", "bad.png", b"")
    prepare(tmp_path / "src", tmp_path / "out", shard_size=1, progress=False)
    assert len(list((tmp_path / "out").glob("raw-*.parquet"))) == 3
    report = prepare(tmp_path / "src", tmp_path / "out", shard_size=10, progress=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("raw-*")) == ["raw-00000.parquet"]
    assert report.shards == ["raw-00000.parquet"]
    assert "prepare: wrote 3, skipped 1 (duplicates dropped: 0) →" in capsys.readouterr().out


def _three_with_a_copy(src: Path) -> None:
    """a.png and its byte-identical copy b.png under another caption, and one other image."""
    same = encode(noise(20, 20))
    put(src, "a.png", same, caption="a red square")
    put(src, "b.png", same, caption="the same square, another caption")
    put(src, "c.png", encode(noise(20, 20)))


def test_duplicates_dropped_by_default_and_counted_in_the_summary(tmp_path, capsys):
    from flowtrain.cli import main

    _three_with_a_copy(tmp_path / "src")
    assert main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "wrote 2, skipped 1 (duplicates dropped: 1)" in capsys.readouterr().out
    assert set(read_rows(tmp_path / "out")) == {"a", "c"}
    on_disk = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert on_disk["duplicates"] == 1 and reasons(PrepareReport(**{k: on_disk[k] for k in ("written", "skipped",
        "skipped_items")}))["b"] == "duplicate of a"  # fmt: skip
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["keep_duplicates"] is False


def test_keep_duplicates_keeps_every_copy_with_its_caption(tmp_path, capsys):
    from flowtrain.cli import main

    _three_with_a_copy(tmp_path / "src")
    assert main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--keep-duplicates"]) == 0
    assert "wrote 3, skipped 0 (duplicates kept)" in capsys.readouterr().out
    rows = read_rows(tmp_path / "out")
    assert rows["a"]["image"] == rows["b"]["image"]
    assert (rows["a"]["caption"], rows["b"]["caption"]) == ("a red square", "the same square, another caption")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["keep_duplicates"] is True


def test_source_signature_follows_the_listing_not_the_decoding(tmp_path):
    """What `train --from` compares to reuse prepared shards: equal for an unchanged source, different once a
    caption or an image changes, and equal to what prepare recorded."""
    from flowtrain.data.prepare import source_signature

    src = tmp_path / "src"
    _three_with_a_copy(src)
    prepare(src, tmp_path / "out", progress=False)
    recorded = json.loads((tmp_path / "out" / "manifest.json").read_text())["source_signature"]
    assert source_signature(src) == recorded
    (src / "c.txt").write_text("a new caption")
    assert source_signature(src) != recorded
    (src / "c.txt").write_text("a caption")
    assert source_signature(src) == recorded
    put(src, "c.png", encode(noise(21, 20)), caption="a caption")
    assert source_signature(src) != recorded
