"""`flowtrain prepare` on real video files made with PyAV: good clips land in the shards with fps / frame count /
size, bad ones are skipped with their reason, and the report's counts add up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowtrain.data.video import decode_frames, probe, row_clip, row_frames, write_video


def grey_frames(n: int, size: int = 32, start: int = 0) -> np.ndarray:
    """n flat grey frames, frame i at level 10 + 20·(start + i): a decoded frame's mean says which frame it is."""
    levels = 10 + 20 * (start + np.arange(n))
    return np.broadcast_to(levels[:, None, None, None], (n, size, size, 3)).astype(np.uint8).copy()


def frame_numbers(frames) -> list[int]:
    return [round((np.asarray(f).mean() - 10) / 20) for f in frames]


def caption(path: Path, text: str) -> None:
    path.with_suffix(".txt").write_text(text)


def make_source(root: Path) -> dict[str, str]:
    """A folder of good and bad videos plus one image; returns {key: expected skip reason kind or 'ok'}."""
    root.mkdir(parents=True)
    write_video(root / "walk.mp4", grey_frames(9), fps=8)
    caption(root / "walk.mp4", "a grey walk")
    write_video(root / "wave.webm", grey_frames(11, start=1), fps=12)
    caption(root / "wave.webm", "a grey wave")
    write_video(root / "turn.mov", grey_frames(9, start=2), fps=8)
    caption(root / "turn.mov", "a grey turn")
    write_video(root / "short.mp4", grey_frames(3), fps=8)  # too short for --min-frames 5
    caption(root / "short.mp4", "too short")
    good = (root / "walk.mp4").read_bytes()
    (root / "broken.mp4").write_bytes(good[: len(good) // 2])  # truncated mid-stream
    caption(root / "broken.mp4", "a truncated file")
    write_video(root / "damaged.mp4", np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), np.uint8))
    data = bytearray((root / "damaged.mp4").read_bytes())
    data[len(data) // 3 : len(data) // 3 + 100] = bytes(100)  # a hole in the frame data: it opens, then fails
    (root / "damaged.mp4").write_bytes(bytes(data))
    caption(root / "damaged.mp4", "a damaged file")
    write_video(root / "alien.mkv", grey_frames(5), fps=8)  # Matroska names its codec by a string: make it unknown
    data = (root / "alien.mkv").read_bytes()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    (root / "alien.mkv").write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/QQQ"))
    caption(root / "alien.mkv", "a codec nobody decodes")
    (root / "noise.webm").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 4)  # WebM magic, then garbage
    caption(root / "noise.webm", "not a video")
    import av

    with av.open(str(root / "empty.mov"), mode="w") as c:  # a header and nothing else
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = 32
        c.start_encoding()
    caption(root / "empty.mov", "no frames at all")
    Image.fromarray(grey_frames(1, start=3)[0]).save(root / "still.png")
    caption(root / "still.png", "a still image")
    return {"walk": "ok", "wave": "ok", "turn": "ok", "still": "ok", "short": "too short", "broken": "corrupt",
            "noise": "corrupt", "damaged": "corrupt video: decoding failed", "empty": "zero frames",
            "alien": "unreadable codec"}  # fmt: skip


def test_prepare_cli_stores_videos_and_reports_every_bad_one(tmp_path, capsys):
    from flowtrain.cli import main

    expected = make_source(tmp_path / "src")
    out = tmp_path / "raw"
    assert main(["prepare", str(tmp_path / "src"), "--out", str(out), "--min-frames", "5"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["seen"] == len(expected) == report["written"] + report["skipped"]
    assert report["written"] == 4 and report["skipped"] == 6
    assert sum(report["skipped_by_reason"].values()) == report["skipped"]
    reasons = {s["key"]: s["reason"] for s in report["skipped_items"]}
    for key, kind in expected.items():
        if kind == "ok":
            assert key not in reasons
        else:
            assert reasons[key].startswith(kind), (key, reasons[key])
    assert reasons["short"] == "too short (3 frames < min_frames 5)"
    assert "skipped 6" in capsys.readouterr().out

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["min_frames"] == 5
    rows = {r["key"]: r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()}
    assert set(rows) == {"walk", "wave", "turn", "still"}
    src = tmp_path / "src"
    assert rows["walk"]["image"] == (src / "walk.mp4").read_bytes()  # the original bytes, not re-encoded
    got = {k: (r["format"], r["num_frames"], r["fps"], r["width"], r["height"]) for k, r in rows.items()}
    assert got == {
        "walk": ("MP4", 9, 8.0, 32, 32),
        "wave": ("WEBM", 11, 12.0, 32, 32),
        "turn": ("MOV", 9, 8.0, 32, 32),
        "still": ("PNG", 1, None, 32, 32),  # an image is a one-frame video
    }

    # the raw row → clip contract precompute (and a video family) builds on
    clip = row_clip(rows["wave"], [0, 5, 10])
    assert clip.shape == (3, 3, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    assert frame_numbers(row_frames(rows["wave"], [10, 0, 5])) == [11, 1, 6]
    still = row_clip(rows["still"], [0])
    assert still.shape == (1, 3, 32, 32)
    assert abs(float(still.mean()) - ((10 + 60) / 127.5 - 1)) < 1e-6


def test_jsonl_and_tsv_rows_point_at_videos(tmp_path):
    from flowtrain.data.prepare import prepare

    media = tmp_path / "media"
    media.mkdir()
    write_video(media / "a.mp4", grey_frames(5), fps=10)
    write_video(media / "b.webm", grey_frames(9), fps=10)
    Image.fromarray(grey_frames(1)[0]).save(media / "c.png")
    lines = [
        {"video": "media/a.mp4", "caption": "clip a"},
        {"video": "media/b.webm", "text": "clip b"},
        {"image": "media/c.png", "caption": "an image"},
        {"video": "media/missing.mp4", "caption": "gone"},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = prepare(tmp_path / "list.jsonl", tmp_path / "raw_j", progress=False)
    assert (report.written, report.skipped) == (3, 1)
    assert report.skipped_items[0]["reason"] == "image file not found"

    (tmp_path / "list.tsv").write_text("video\tcaption\nmedia/a.mp4\tclip a\nmedia/b.webm\tclip b\n")
    report = prepare(tmp_path / "list.tsv", tmp_path / "raw_t", progress=False)
    assert (report.written, report.skipped) == (2, 0)
    rows = pq.read_table(tmp_path / "raw_t" / "raw-00000.parquet").to_pylist()
    assert [(r["key"], r["num_frames"], r["fps"]) for r in rows] == [("media/a", 5, 10.0), ("media/b", 9, 10.0)]


def test_decoding_picks_exactly_the_requested_frames(tmp_path):
    write_video(tmp_path / "v.mp4", grey_frames(11), fps=24)
    data = (tmp_path / "v.mp4").read_bytes()
    info = probe(data, "MP4")
    assert (info.num_frames, info.fps, info.width, info.height, info.codec) == (11, 24.0, 32, 32, "h264")
    assert frame_numbers(decode_frames(data, [0, 3, 3, 10])) == [0, 3, 3, 10]
    with pytest.raises(ValueError, match="no frame 11"):
        decode_frames(data, [11])


def test_parquet_rows_with_embedded_video_bytes_are_recognised_by_their_magic(tmp_path):
    import pyarrow as pa

    from flowtrain.data.prepare import prepare

    write_video(tmp_path / "a.mp4", grey_frames(5), fps=10)
    write_video(tmp_path / "b.webm", grey_frames(9), fps=10)
    blobs = [(tmp_path / "a.mp4").read_bytes(), (tmp_path / "b.webm").read_bytes(), b"\x00\x00\x00\x18ftypmp42junk"]
    pq.write_table(pa.table({"image": blobs, "caption": ["a", "b", "fake"]}), tmp_path / "clips.parquet")
    report = prepare(tmp_path / "clips.parquet", tmp_path / "raw", progress=False)
    assert (report.written, report.videos, report.skipped) == (2, 2, 1)
    assert report.skipped_items[0]["reason"].startswith("corrupt or unreadable video")
    rows = pq.read_table(tmp_path / "raw" / "raw-00000.parquet").to_pylist()
    assert [(r["format"], r["num_frames"]) for r in rows] == [("MP4", 5), ("WEBM", 9)]
    assert rows[0]["image"] == blobs[0]
