"""`flowtrain inspect`: counts that add up, sizes from headers, caption and trigger statistics, near-duplicates by
perceptual hash, the histogram PNG, raw folders and the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flowtrain.data.prepare import prepare
from flowtrain.inspect import (
    aspect_histogram,
    inspect_dataset,
    look_at_image,
    near_duplicate_groups,
    trigger_coverage,
)

_rng = np.random.default_rng(11)


def smooth(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random picture (blurred noise): its pHash is stable under small edits, as a photo's is."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return small.filter(ImageFilter.GaussianBlur(2))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect") / "src"
    root.mkdir()
    base = smooth(96, 64, seed=1)
    files = {
        "a.jpg": (encode(base, "JPEG", quality=95), "ohwx a red thing"),
        "a_copy.jpg": (encode(base, "JPEG", quality=60), "ohwx the same thing, recompressed"),  # near-duplicate
        "a_resized.png": (encode(base.resize((48, 32)), "PNG"), "OHWX, smaller"),  # near-duplicate too
        "tall.png": (encode(smooth(30, 120, seed=2), "PNG"), "a tall one"),
        "wide.webp": (encode(smooth(200, 50, seed=3), "WEBP"), "a wide ohwxy one"),  # not the trigger word
        "square.png": (encode(smooth(64, 64, seed=4), "PNG"), "   "),  # empty caption
        "nocap.png": (encode(smooth(40, 80, seed=5), "PNG"), None),  # missing caption
        "corrupt.jpg": (b"\xff\xd8\xff\xe0 garbage", "corrupt"),
        "corrupt_nocap.png": (b"nope", None),  # two problems, one item
    }
    for name, (data, caption) in files.items():
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)
    return root


def test_report_counts_and_stats(folder, tmp_path):
    report = inspect_dataset(folder, trigger="ohwx", resolution=64, progress=False, out=tmp_path)
    assert report["seen"] == 9
    assert report["items_ok"] + report["items_with_problems"] == report["seen"]
    assert report["items_with_problems"] == 4
    assert (report["corrupt_images"], report["missing_captions"], report["empty_captions"]) == (2, 2, 1)
    assert report["problems_by_reason"] == {
        "missing caption": 2, "not a recognised image file": 1, "cannot decode image": 1, "empty caption": 1
    }  # fmt: skip
    by_key = {p["key"]: p["reasons"] for p in report["problems"]}
    assert by_key["corrupt_nocap"] == ["missing caption", "not a recognised image file"]
    assert report["images_measured"] == 7  # every readable image, even those without a usable caption
    sizes = report["sizes"]
    assert sizes["width"]["min"] == 30 and sizes["width"]["max"] == 200 and sizes["height"]["max"] == 120
    assert (sizes["landscape"], sizes["portrait"], sizes["square"]) == (4, 2, 1)
    assert sizes["short_side_below_resolution"] == 4  # 48x32, 30x120, 200x50, 40x80
    assert sum(b["count"] for b in report["aspect_histogram"]) == 7
    assert report["captions"]["count"] == 6 and report["captions"]["words"]["min"] == 1
    assert report["captions"]["words"]["max"] == 5
    t = report["trigger"]
    assert (t["with"], t["without"]) == (3, 3) and set(t["keys_without"]) == {"tall", "wide", "corrupt"}
    assert report["near_duplicates"]["groups"] == [["a", "a_copy", "a_resized"]]
    # the buckets `precompute --buckets --resolution 64` would use (data.buckets), one per measured image
    from flowtrain.data.buckets import BucketSpec, assign

    assert sum(report["buckets"].values()) == 7
    spec = BucketSpec((64,), 16, 2.0)  # buckets (h, w): 48x80, 64x64, 80x48
    assert assign((32, 48), spec) == (48, 80)  # 48x32 (3:2 landscape): the wide bucket, reported as "80x48"
    assert report["buckets"] == {"80x48": 4, "64x64": 1, "48x80": 2}  # as landscape / square / portrait above
    saved = json.loads((tmp_path / "inspect_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    with Image.open(tmp_path / "inspect_histogram.png") as png:
        assert png.format == "PNG" and png.width > 500


def test_headers_only_without_dedup(folder):
    report = inspect_dataset(folder, dedup=False, progress=False)
    assert report["near_duplicates"] is None and report["images_measured"] == 7
    assert report["corrupt_images"] == 2


def test_raw_folder(folder, tmp_path):
    prepare(folder, tmp_path / "raw", progress=False)
    report = inspect_dataset(tmp_path / "raw", trigger="ohwx", progress=False)
    assert report["kind"] == "raw" and report["seen"] == 5 and report["items_with_problems"] == 0
    assert report["near_duplicates"]["groups"] == [["a", "a_copy", "a_resized"]]
    # The same raw folder on an fsspec store reads the same.
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in (tmp_path / "raw").iterdir():
        fs.pipe_file(f"/inspect-raw/{p.name}", p.read_bytes())
    try:
        remote = inspect_dataset("memory://inspect-raw", trigger="ohwx", progress=False)
    finally:
        fs.rm("/inspect-raw", recursive=True)
    assert {k: v for k, v in remote.items() if k != "source"} == {k: v for k, v in report.items() if k != "source"}


def test_size_comes_from_the_header_only():
    """A PNG cut after its header still reports its size without --dedup, and is found corrupt with it."""
    data = encode(smooth(300, 200, seed=9), "PNG")
    assert look_at_image(data, want_hash=False)[0] == (300, 200)
    with pytest.raises(Exception, match="cannot decode image"):
        look_at_image(data[: len(data) // 2], want_hash=True)


def test_near_duplicate_groups_pigeonhole_equals_brute_force():
    hashes = _rng.integers(0, 2**63, 300, dtype=np.uint64) | (_rng.integers(0, 2, 300, dtype=np.uint64) << 63)
    for i in range(0, 60, 3):  # plant neighbours at 0..6 bits
        flips = _rng.choice(64, size=i % 7, replace=False)
        hashes[i + 1] = hashes[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    for threshold in (0, 2, 4, 6):
        dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        pairs = {(a, b) for a, b in zip(*np.nonzero(np.triu(dist <= threshold, k=1)), strict=True)}
        groups = near_duplicate_groups(hashes, threshold)
        assert pairs  # planted neighbours exist at every threshold
        member = {i: gi for gi, g in enumerate(groups) for i in g}
        assert all(member.get(a) is not None and member.get(a) == member.get(b) for a, b in pairs)
        assert sum(len(g) for g in groups) == len({i for p in pairs for i in p})  # no extra members


def test_aspect_histogram_and_trigger_edges():
    hist = aspect_histogram([(100, 1000), (1000, 100), (64, 64), (64, 65)])
    assert hist[0] == {"aspect": "< 0.25", "count": 1} and hist[-1] == {"aspect": ">= 4", "count": 1}
    assert sum(b["count"] for b in hist) == 4
    cov = trigger_coverage({"a": "sks dog", "b": "a sks-dog", "c": "asks", "d": "SKS."}, "sks")
    assert (cov["with"], cov["keys_without"]) == (3, ["c"])


def test_cli(folder, tmp_path, capsys):
    from flowtrain.cli import main

    assert main(["inspect", str(folder), "--out", str(tmp_path), "--trigger", "ohwx", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "9 item(s)" in out and "4 with problems" in out and "trigger 'ohwx': in 3 of 6 captions" in out
    assert "1 group(s), 3 images" in out
    assert (tmp_path / "inspect_report.json").is_file() and (tmp_path / "inspect_histogram.png").is_file()
    assert main(["inspect", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "does not exist; accepted kinds" in capsys.readouterr().err


def test_webdataset_and_hf_sources(tmp_path):
    """inspect reads every source kind prepare reads; here a tar shard and a saved HF dataset, each with a corrupt
    image and a missing caption."""
    import tarfile

    import datasets

    good, other = encode(smooth(64, 32, seed=21), "JPEG"), encode(smooth(32, 64, seed=22), "PNG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("0.jpg", good), ("0.txt", b"sks one"), ("1.png", other), ("2.jpg", b"\xff\xd8 bad"),
                           ("2.txt", b"broken")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s-0.tar").write_bytes(buf.getvalue())
    report = inspect_dataset(str(tmp_path / "s-0.tar"), trigger="sks", progress=False)
    assert (report["seen"], report["items_ok"], report["corrupt_images"], report["missing_captions"]) == (3, 1, 1, 1)
    assert report["trigger"]["with"] == 1 and report["images_measured"] == 2

    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": other, "path": None}, {"bytes": b"x", "path": None}],
         "text": ["sks one", None, "broken"]}, features=feats,
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "ds"))
    report = inspect_dataset(tmp_path / "ds", progress=False)
    assert (report["seen"], report["items_ok"], report["corrupt_images"], report["missing_captions"]) == (3, 1, 1, 1)


def test_cli_bucket_preview_uses_precomputes_bucket_settings(folder, tmp_path):
    """--bucket-sides / --max-aspect / --pixel-multiple shape the preview as they shape `precompute --buckets`:
    the counts are `data.buckets.bucket_counts` under the same BucketSpec, and a 4:1 image that the default 2:1
    limit crops into the widest 2:1 bucket gets a wider one at --max-aspect 4."""
    from flowtrain.cli import main
    from flowtrain.data.buckets import BucketSpec, bucket_counts

    def preview(*flags: str) -> dict:
        out = tmp_path / "-".join(flags or ("default",))
        assert main(["inspect", str(folder), "--out", str(out), "--resolution", "64", "--no-dedup", "--quiet",
                     *flags]) == 0  # fmt: skip
        return json.loads((out / "inspect_report.json").read_text())

    sizes = [(96, 64), (96, 64), (48, 32), (30, 120), (200, 50), (64, 64), (40, 80)]  # (w, h) of the readable images
    default, custom = preview(), preview("--max-aspect", "4", "--bucket-sides", "96", "--pixel-multiple", "8")
    for report, spec in ((default, BucketSpec((64,), 16, 2.0)), (custom, BucketSpec((64, 96), 8, 4.0))):
        want = {f"{w}x{h}": n for (h, w), n in bucket_counts([(h, w) for w, h in sizes], spec).items()}
        assert report["buckets"] == want
    assert default["bucket_settings"] == {"resolution": 64, "sides": [], "multiple": 16, "max_aspect": 2.0}
    assert custom["bucket_settings"] == {"resolution": 64, "sides": [96], "multiple": 8, "max_aspect": 4.0}
    assert "80x48" in default["buckets"] and default["buckets"] != custom["buckets"]
    assert max(int(b.split("x")[0]) / int(b.split("x")[1]) for b in custom["buckets"]) > 2  # 200x50 kept wider
