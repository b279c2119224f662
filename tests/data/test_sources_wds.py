"""WebDataset tar shards as a `prepare` source: local and fsspec (memory://) shards, brace ranges and globs; a corrupt
member, a missing caption and a truncated shard are skipped with their reasons and the report counts add up."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowtrain.data.prepare import prepare
from flowtrain.data.sources import count_items, detect_kind, iter_source

_rng = np.random.default_rng(7)


def image_bytes(w: int, h: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar written with the standard library, as any WebDataset writer would (no flowtrain code)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard0() -> bytes:
    return tar_bytes([
        ("s0/000.jpg", image_bytes(40, 24, "JPEG")), ("s0/000.txt", b"a wide jpeg"),
        ("s0/001.png", image_bytes(20, 30, "PNG")), ("s0/001.json", json.dumps({"caption": "a png"}).encode()),
        ("s0/002.webp", image_bytes(32, 32, "WEBP")), ("s0/002.txt", b"a webp"),
        ("s0/003.jpg", b"\xff\xd8\xff not really a jpeg"), ("s0/003.txt", b"corrupt member"),
        ("s0/004.png", image_bytes(24, 24, "PNG")),  # no caption at all
        ("s0/005.txt", b"a caption without an image"),
    ])  # fmt: skip


def shard1() -> bytes:
    return tar_bytes([("100.png", image_bytes(28, 20, "PNG")), ("100.json", b'{"text": "text field"}')])


EXPECT_WRITTEN = {"shard-0/s0/000", "shard-0/s0/001", "shard-0/s0/002", "shard-1/100"}
EXPECT_SKIPPED = {
    "shard-0/s0/003": "not a recognised image",
    "shard-0/s0/004": "missing caption",
    "shard-0/s0/005": "no image in sample",
}


def check_report(report, out: Path) -> None:
    got = {s["key"]: s["reason"] for s in report.skipped_items}
    assert set(got) == set(EXPECT_SKIPPED)
    for key, why in EXPECT_SKIPPED.items():
        assert why in got[key], (key, got[key])
    keys = set()
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        keys |= set(pq.read_table(out / shard["file"], columns=["key"]).column("key").to_pylist())
    assert keys == EXPECT_WRITTEN
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["written"] + saved["skipped"] == saved["seen"] == 7


def test_local_shards_brace_range(tmp_path):
    (tmp_path / "shard-0.tar").write_bytes(shard0())
    (tmp_path / "shard-1.tar").write_bytes(shard1())
    src = str(tmp_path / "shard-{0..1}.tar")
    assert detect_kind(src) == "webdataset"
    assert count_items(src) == 7
    items = {i.key: i for i in iter_source(src)}
    assert items["shard-0/s0/001"].caption == "a png"
    assert items["shard-1/100"].caption == "text field"
    assert items["shard-0/s0/004"].caption is None and items["shard-0/s0/004"].problem is None
    report = prepare(src, tmp_path / "raw", progress=False)
    check_report(report, tmp_path / "raw")
    assert (report.written, report.skipped) == (4, 3)


def test_memory_fs_glob_and_truncated_shard(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/wds-test/shard-0.tar", shard0())
    fs.pipe_file("/wds-test/shard-1.tar", shard1())
    broken = shard1()
    fs.pipe_file("/wds-test/shard-2.tar", broken[:1024])  # header (512 B), then cut inside the image member
    try:
        src = "memory://wds-test/shard-*.tar"
        report = prepare(src, tmp_path / "raw", progress=False)
        reasons = {s["key"]: s["reason"] for s in report.skipped_items}
        assert "corrupt or truncated tar shard" in reasons.pop("shard-2/#error")
        assert set(reasons) == set(EXPECT_SKIPPED)
        saved = json.loads((tmp_path / "raw" / "prepare_report.json").read_text())
        assert saved["written"] + saved["skipped"] == saved["seen"] == 8
        assert saved["source"] == "memory://wds-test/shard-*.tar"
    finally:
        fs.rm("/wds-test", recursive=True)


def test_missing_shards_are_named(tmp_path):
    (tmp_path / "shard-0.tar").write_bytes(shard0())
    with pytest.raises(ValueError, match=r"1 shard\(s\) not found.*shard-1\.tar"):
        iter_source(str(tmp_path / "shard-{0..1}.tar"))
    with pytest.raises(ValueError, match="no shard matches"):
        iter_source(str(tmp_path / "nothing-*.tar"))


def test_signature_sees_a_rewritten_shard(tmp_path):
    """`train --from` reuses prepared shards on the source signature: new pixels under the same keys must change it."""
    from flowtrain.data.prepare import source_signature

    (tmp_path / "shard-1.tar").write_bytes(shard1())
    src = str(tmp_path / "shard-*.tar")
    before = source_signature(src)
    assert source_signature(src) == before
    (tmp_path / "shard-1.tar").write_bytes(shard1())  # same names and captions, new random pixels
    assert source_signature(src) != before
