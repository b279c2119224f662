"""`dataset.buckets` in the config: validated at load, used by `precompute --config` and `train CONFIG --from SRC`,
with precompute's flags over it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flowtrain.cli import _bucket_spec, main, parse_args
from flowtrain.config.buckets import BucketsConfig
from flowtrain.config.schema import DatasetConfig
from flowtrain.data.buckets import BucketSpec
from flowtrain.testing.buckets import make_mixed_image_folder
from flowtrain.testing.data import TINY_SEQ, tiny_model


def test_bucket_settings_are_validated():
    assert DatasetConfig().buckets == BucketsConfig(enabled=False, sides=[], max_aspect=2.0)
    with pytest.raises(ValidationError, match="set dataset.buckets.enabled: true"):
        DatasetConfig(buckets={"sides": [64]})
    with pytest.raises(ValidationError, match=r"dataset.buckets.max_aspect shapes .* set dataset.buckets.enabled"):
        DatasetConfig(buckets={"max_aspect": 3.0})
    dumped = DatasetConfig().model_dump()  # a run's saved config holds every default: read back as it was
    assert DatasetConfig(**dumped).buckets.enabled is False
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        BucketsConfig(enabled=True, max_aspect=0.5)
    with pytest.raises(ValidationError, match="greater than 0"):
        BucketsConfig(enabled=True, sides=[0])
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DatasetConfig(buckets={"enabled": True, "max_ratio": 3})


def test_precompute_flags_override_the_config(tiny_pipeline_dir):
    model = tiny_model(tiny_pipeline_dir)  # pixel multiple 4
    conf = BucketsConfig(enabled=True, sides=[48], max_aspect=3.0)

    def spec(*flags):
        return _bucket_spec(parse_args(["precompute", "raw", "--resolution", "32", *flags]), model, conf)

    assert spec() == BucketSpec((32, 48), 4, 3.0)
    assert spec("--bucket-sides", "40", "--max-aspect", "1.5") == BucketSpec((32, 40), 4, 1.5)
    assert spec("--no-buckets") is None
    assert _bucket_spec(parse_args(["precompute", "raw"]), model, None) is None  # no config, no flag: square
    with pytest.raises(ValueError, match="add --buckets"):
        _bucket_spec(parse_args(["precompute", "raw", "--max-aspect", "3"]), model, BucketsConfig())


def test_train_from_a_mixed_shape_folder_makes_a_bucketed_cache(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    """`train CONFIG --from SRC` with dataset.buckets on: prepare → bucketed precompute → train; a rerun reuses the
    bucketed cache (its fingerprint, buckets included, is the one the config would write)."""
    monkeypatch.chdir(tmp_path)
    make_mixed_image_folder(tmp_path / "src")
    cfg = {
        "model": {"pretrained": str(tiny_pipeline_dir), "max_sequence_length": TINY_SEQ, "dtype": "float32"},
        "dataset": {"cache_dir": "data/cache", "buckets": {"enabled": True, "max_aspect": 2.0}},
        "train": {"batch_size": 2, "learning_rate": 2e-3, "mixed_precision": "no", "max_steps": 4},
        "lora": {"rank": 4},
        "checkpoint": {"every_steps": 4, "keep_last": 1},
        "tracking": {"report_to": ["jsonl"], "graphs": False},
        "output_dir": "runs/a",
    }
    Path("tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "tiny.yaml", "--from", "src", "--resolution", "32", "--quiet"]) == 0
    manifest = json.loads(Path("data/cache/manifest.json").read_text())
    assert manifest["fingerprint"]["buckets"] == {"targets": [32], "multiple": 4, "max_aspect": 2.0}
    assert sorted({tuple(s["bucket"]) for s in manifest["shards"]}) == [(24, 40), (32, 32), (36, 28), (40, 24)]
    assert sum(s["rows"] for s in manifest["shards"]) == 16
    losses = [json.loads(x).get("loss") for x in Path("runs/a/logs/metrics.jsonl").read_text().splitlines()]
    losses = [v for v in losses if v is not None]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    capsys.readouterr()
    rerun = ["train", "tiny.yaml", "--from", "src", "--resolution", "32", "--quiet", "--output_dir", "runs/b"]
    assert main(rerun) == 0
    assert "precompute: reusing data/cache" in capsys.readouterr().out
