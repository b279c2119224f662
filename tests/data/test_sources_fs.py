"""Sources at fsspec URLs: a folder, a TSV, a JSONL and a Parquet file on fsspec's in-memory filesystem and behind
`file://`, each with a corrupt image and a missing caption; the report counts add up, rows equal a local run's."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowtrain.data.fs import FsPath, as_path, is_url
from flowtrain.data.prepare import prepare, source_signature
from flowtrain.data.sources import count_items, detect_kind

_rng = np.random.default_rng(3)
GOOD = {"a": (24, 16), "b": (16, 28), "sub/c": (20, 20)}


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def files() -> dict[str, bytes]:
    """A folder source as {relative path: bytes}: three good images, a corrupt one, one without caption."""
    out: dict[str, bytes] = {}
    for key, (w, h) in GOOD.items():
        out[f"{key}.png"] = png(w, h)
        out[f"{key}.txt"] = f"caption of {key}".encode()
    out["corrupt.png"], out["corrupt.txt"] = b"\x89PNG\r\n\x1a\n garbage", b"broken"
    out["nocap.png"] = png(18, 18)
    return out


def write(root: str, content: dict[str, bytes]) -> None:
    fs, base = fsspec.core.url_to_fs(root)
    for rel, data in content.items():
        fs.pipe_file(f"{base}/{rel}", data)


@pytest.fixture
def memroot():
    root = f"memory://fs-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs, base = fsspec.core.url_to_fs(root)
    if fs.exists(base):
        fs.rm(base, recursive=True)


def keys_in(out: Path) -> set[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {k for s in manifest["shards"] for k in pq.read_table(out / s["file"]).column("key").to_pylist()}


def check(report, out: Path) -> None:
    reasons = {s["key"]: s["reason"] for s in report.skipped_items}
    assert "not a recognised image" in reasons["corrupt"] or "cannot decode" in reasons["corrupt"]
    assert reasons["nocap"] == "missing caption"
    assert keys_in(out) == set(GOOD)
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["written"] + saved["skipped"] == saved["seen"] == len(GOOD) + 2


def test_is_url_and_paths():
    assert is_url("s3://b/k") and is_url("memory://x") and is_url("file:///tmp/x")
    assert not is_url("/tmp/x") and not is_url("C:\\data") and not is_url("rel/path")
    p = as_path("memory://bucket/dir/a.png")
    assert isinstance(p, FsPath) and p.name == "a.png" and p.suffix == ".png"
    assert str(p.parent / "b.txt") == "memory:///bucket/dir/b.txt"
    assert p.with_suffix(".txt").relative_to(as_path("memory://bucket")).as_posix() == "dir/a.txt"


def test_folder_on_memory_fs_equals_local(memroot, tmp_path):
    content = {**files(), ".hidden/x.png": png(16, 16)}
    write(memroot, content)
    local = tmp_path / "local"
    for rel, data in content.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    assert detect_kind(memroot) == "folder" and count_items(memroot) == 5
    report = prepare(memroot, tmp_path / "raw", progress=False)
    check(report, tmp_path / "raw")
    prepare(local, tmp_path / "raw-local", progress=False)
    remote_rows = pq.read_table(tmp_path / "raw" / "raw-00000.parquet").to_pylist()
    local_rows = pq.read_table(tmp_path / "raw-local" / "raw-00000.parquet").to_pylist()
    assert remote_rows == local_rows
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["source"] == memroot
    # The signature sees a changed caption on the remote store (it is what `train --from` reuses shards on).
    before = source_signature(memroot)
    write(memroot, {"a.txt": b"a new caption"})
    assert source_signature(memroot) != before


def test_tsv_jsonl_parquet_on_memory_fs(memroot, tmp_path):
    content = files()
    write(memroot, {k: v for k, v in content.items() if k.endswith(".png")})
    names = ["a", "b", "sub/c", "corrupt", "nocap"]
    captions = {n: content[f"{n}.txt"].decode() if f"{n}.txt" in content else None for n in names}
    tsv = "".join(f"{n}.png\t{captions[n]}\n" for n in names if captions[n] is not None) + "nocap.png\n"
    jsonl = "".join(json.dumps({"image": f"{n}.png", "caption": captions[n]}) + "\n" for n in names)
    table = pa.table({"image": [content[f"{n}.png"] for n in names], "caption": list(captions.values()),
                      "key": names})  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write(memroot, {"list.tsv": tsv.encode(), "list.jsonl": jsonl.encode(), "list.parquet": buf.getvalue()})
    for name in ("list.tsv", "list.jsonl", "list.parquet"):
        src = f"{memroot}/{name}"
        out = tmp_path / name
        report = prepare(src, out, progress=False)
        if name == "list.tsv":  # a line without a tab is malformed, not a missing caption, in a TSV
            reasons = {s["key"]: s["reason"] for s in report.skipped_items}
            assert reasons.pop("line5").startswith("malformed line")
            assert "nocap" not in reasons and set(reasons) == {"corrupt"}
            assert keys_in(out) == set(GOOD)
            continue
        check(report, out)


def test_missing_image_on_store_is_named(memroot, tmp_path):
    write(memroot, {"ok.png": png(16, 16), "list.jsonl": b'{"image": "ok.png", "caption": "x"}\n'
                    b'{"image": "gone.png", "caption": "y"}\n'})  # fmt: skip
    report = prepare(f"{memroot}/list.jsonl", tmp_path / "raw", progress=False)
    assert [s["reason"] for s in report.skipped_items] == ["image file not found"]
    assert report.skipped_items[0]["path"].endswith("/gone.png")


def test_file_url(tmp_path):
    root = tmp_path / "imgs"
    for rel, data in files().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    report = prepare(f"file://{root}", tmp_path / "raw", progress=False)
    check(report, tmp_path / "raw")


def test_unknown_url_is_refused(memroot):
    with pytest.raises(ValueError, match="does not exist; accepted kinds"):
        detect_kind(f"{memroot}/nothing.tsv")


def test_precompute_reads_raw_shards_at_a_url(memroot, tmp_path, tiny_pipeline_dir, tiny_cache):
    """Raw shards on an fsspec store are encoded as they are locally: the cache equals the local run's, bit for bit."""
    from flowtrain.data.precompute import precompute
    from flowtrain.models import get_family
    from flowtrain.testing.data import DEFAULT_FAMILY, tiny_model

    raw_dir, local_cache = tiny_cache
    write(memroot, {p.name: p.read_bytes() for p in raw_dir.iterdir() if p.is_file()})
    model = tiny_model(tiny_pipeline_dir, DEFAULT_FAMILY, dtype="float32")
    resolution = get_family(DEFAULT_FAMILY).tiny_resolution
    manifest = precompute(memroot, tmp_path / "cache", model, resolution=resolution, batch_size=4, progress=False)
    assert manifest.source == str(as_path(memroot))
    local = json.loads((local_cache / "manifest.json").read_text())
    assert [s["file"] for s in manifest.shards] == [s["file"] for s in local["shards"]]
    for shard in local["shards"]:
        assert pq.read_table(tmp_path / "cache" / shard["file"]).equals(pq.read_table(local_cache / shard["file"]))


def test_prepare_out_to_a_url(memroot, tmp_path, capsys):
    """prepare --out URL: shards, report and manifest land on the store; a second run needs --overwrite and then
    replaces the shards, leaving none of the earlier run's behind."""
    from flowtrain.cli import main
    from flowtrain.data.precompute import read_raw_manifest
    from flowtrain.data.remote import prepare_to_url

    local = tmp_path / "imgs"
    for rel, data in files().items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    out = f"{memroot}/raw"
    report = prepare_to_url(local, out, shard_size=1, progress=False)
    assert report.written == 3
    fs, base = fsspec.core.url_to_fs(out)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    assert names == ["manifest.json", "prepare_report.json", "raw-00000.parquet", "raw-00001.parquet",
                     "raw-00002.parquet"]  # fmt: skip
    assert read_raw_manifest(out)["num_rows"] == 3
    prepare(local, tmp_path / "raw-local", shard_size=1, progress=False)
    for i in range(3):
        remote = pq.read_table(fs.open(f"{base}/raw-{i:05d}.parquet"))
        assert remote.equals(pq.read_table(tmp_path / "raw-local" / f"raw-{i:05d}.parquet"))

    argv = ["prepare", str(local), "--out", out, "--quiet", "--shard-size", "2"]
    assert main(argv) == 2
    assert "holds prepared raw shards already (manifest.json); --overwrite replaces them" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    assert names == ["manifest.json", "prepare_report.json", "raw-00000.parquet", "raw-00001.parquet"]
    assert [s["rows"] for s in read_raw_manifest(out)["shards"]] == [2, 1]
