"""Hugging Face `datasets` as a source: a `save_to_disk` folder and `hf-dataset:NAME` (a local data folder, the same
`load_dataset` call a Hub id takes), with configurable columns, a corrupt image and a missing caption."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flowtrain.data.prepare import prepare
from flowtrain.data.sources import count_items, detect_kind, iter_source
from flowtrain.data.sources_hf import with_options

_rng = np.random.default_rng(5)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rows() -> dict[str, list]:
    return {
        "picture": [{"bytes": png(24, 16), "path": None}, {"bytes": png(16, 24), "path": None},
                    {"bytes": b"not an image at all", "path": None}, {"bytes": png(20, 20), "path": None}],
        "words": ["first", "second", "corrupt one", None],
        "id": ["p0", "p1", "bad", "nocap"],
    }  # fmt: skip


def features() -> datasets.Features:
    return datasets.Features(
        {"picture": datasets.Image(), "words": datasets.Value("string"), "id": datasets.Value("string")}
    )


def check(report, out) -> None:
    reasons = {s["key"]: s["reason"] for s in report.skipped_items}
    assert reasons == {"bad": "not a recognised image file", "nocap": "missing caption"}
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["written"] + saved["skipped"] == saved["seen"] == 4
    table = pq.read_table(out / "raw-00000.parquet")
    assert table.column("key").to_pylist() == ["p0", "p1"]
    assert table.column("caption").to_pylist() == ["first", "second"]
    assert table.column("width").to_pylist() == [24, 16]


def test_save_to_disk_folder_with_named_columns(tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(rows(), features=features()).save_to_disk(str(folder))
    assert detect_kind(folder) == "hf-datasets"
    with pytest.raises(ValueError, match=r"no caption column among \['picture', 'words', 'id'\].*--caption-column"):
        iter_source(with_options(str(folder), image="picture"))
    src = with_options(str(folder), image="picture", caption="words")
    assert count_items(src) == 4
    check(prepare(src, tmp_path / "raw", progress=False), tmp_path / "raw")


def test_dataset_dict_needs_a_split(tmp_path):
    folder = tmp_path / "dd"
    ds = datasets.Dataset.from_dict(rows(), features=features())
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"holds splits \['test', 'train'\]; choose one with --split"):
        iter_source(with_options(str(folder), image="picture", caption="words"))
    src = with_options(str(folder), split="test", image="picture", caption="words")
    assert [i.key for i in iter_source(src)] == ["p0"]


def test_hf_dataset_name_through_load_dataset(tmp_path):
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_dict(rows(), features=features()).to_parquet(str(data / "train-00000-of-00001.parquet"))
    src = with_options(f"hf-dataset:{tmp_path / 'repo'}", image="picture", caption="words")
    assert detect_kind(src) == "hf-datasets"
    check(prepare(src, tmp_path / "raw", progress=False), tmp_path / "raw")


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        iter_source("hf-dataset:x?colour=red")
    with pytest.raises(ValueError, match="--image-column apply to Hugging Face dataset sources only"):
        with_options(str(tmp_path), image="img")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(rows(), features=features()).save_to_disk(str(folder))
    with pytest.raises(ValueError, match="no image column 'img'"):
        iter_source(with_options(str(folder), image="img"))


def test_cli_column_flags(tmp_path, capsys):
    from flowtrain.cli import main

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(rows(), features=features()).save_to_disk(str(folder))
    args = ["prepare", str(folder), "--image-column", "picture", "--caption-column", "words", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "raw")]) == 0
    assert "wrote 2, skipped 2" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "raw"), "--split", "x", "--out", str(tmp_path / "o")]) == 2
    assert "--split apply to Hugging Face dataset sources only" in capsys.readouterr().err


def test_signature_sees_a_resaved_dataset(tmp_path):
    from flowtrain.data.prepare import source_signature

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(rows(), features=features()).save_to_disk(str(folder))
    src = with_options(str(folder), image="picture", caption="words")
    before = source_signature(src)
    datasets.Dataset.from_dict(rows(), features=features()).save_to_disk(str(tmp_path / "ds2"))
    for f in (tmp_path / "ds2").iterdir():  # new pixels, same keys and captions
        (folder / f.name).write_bytes(f.read_bytes())
    assert source_signature(src) != before
