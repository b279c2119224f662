"""`flowtrain train CONFIG --from SRC`: images → LoRA in one process, each stage's output as its own verb writes it,
and a second run that reuses what is current and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flowtrain.cli import main
from flowtrain.testing.data import TINY_RES, TINY_SEQ, make_image_folder

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def _table(folder: Path) -> dict[str, list]:
    """Every shard of a raw folder or cache, in manifest order, as columns of Python values."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows: dict[str, list] = {}
    for shard in manifest["shards"]:
        for name, values in pq.read_table(folder / shard["file"]).to_pydict().items():
            rows.setdefault(name, []).extend(values)
    return rows


@pytest.fixture
def work(tmp_path, tiny_pipeline_dir) -> Path:
    make_image_folder(tmp_path / "src", n=6)
    cfg = {
        "model": {"pretrained": str(tiny_pipeline_dir), "max_sequence_length": TINY_SEQ, "dtype": "float32"},
        "dataset": {"cache_dir": "data/cache"},
        "train": {"batch_size": 2, "learning_rate": 2e-3, "mixed_precision": "no", "max_steps": 4},
        "lora": {"rank": 4},
        "checkpoint": {"every_steps": None},
        "tracking": {"report_to": ["jsonl"], "graphs": False},
        "output_dir": "runs/a",
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def test_from_images_in_one_process_then_reused(work, monkeypatch, capsys):
    chain = ["train", "tiny.yaml", "--from", "src", "--resolution", str(TINY_RES), "--quiet"]
    exe = Path(sys.executable).parent / "flowtrain"
    proc = subprocess.run([str(exe), *chain], cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prepare: wrote 6, skipped 0 (duplicates dropped: 0)" in proc.stdout
    assert "precompute: 6 rows" in proc.stdout and "train: step 4" in proc.stdout
    raw, cache, run = work / "data" / "cache-raw", work / "data" / "cache", work / "runs" / "a"
    assert {"manifest.json", "prepare_report.json", "raw-00000.parquet"} <= {p.name for p in raw.iterdir()}
    assert (cache / "manifest.json").exists() and (run / "pytorch_lora_weights.safetensors").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in [*raw.iterdir(), *cache.iterdir()]}

    # Again, into another run folder and without --resolution (the cache's is taken): both stages are current,
    # reused (nothing rewritten), and it says so.
    monkeypatch.chdir(work)
    assert main(["train", "tiny.yaml", "--from", "src", "--quiet", "--output_dir", "runs/b"]) == 0
    out = capsys.readouterr().out
    assert "prepare: reusing data/cache-raw" in out and "precompute: reusing data/cache" in out
    assert {p.name: p.stat().st_mtime_ns for p in [*raw.iterdir(), *cache.iterdir()]} == stamps
    assert [m["loss"] for m in _metrics(work / "runs" / "b")] == [m["loss"] for m in _metrics(run)]

    # The separate verbs write the same raw shards and the same cache.
    assert main(["prepare", "src", "--out", "raw2", "--quiet"]) == 0
    pre = ["precompute", "raw2", "--config", "tiny.yaml", "--out", "cache2", "--resolution", str(TINY_RES)]
    assert main([*pre, "--quiet"]) == 0
    assert _table(work / "raw2") == _table(raw)
    assert _table(work / "cache2") == _table(cache)
    report = json.loads((raw / "prepare_report.json").read_text())
    assert json.loads((work / "raw2" / "prepare_report.json").read_text()) == report


def test_changed_source_is_refused_without_overwrite_and_nothing_is_lost(work, monkeypatch, capsys):
    """The chain keeps the verbs' rule: earlier output that is not current is replaced only with --overwrite."""
    monkeypatch.chdir(work)
    assert main(["prepare", "src", "--out", "data/cache-raw", "--quiet"]) == 0
    before = (work / "data" / "cache-raw" / "manifest.json").read_bytes()
    make_image_folder(work / "more", n=1, seed=5)
    for p in (work / "more").iterdir():
        p.rename(work / "src" / f"new_{p.name}")
    assert main(["train", "tiny.yaml", "--from", "src", "--resolution", str(TINY_RES), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data/cache-raw holds raw shards" in err and "--overwrite" in err
    assert (work / "data" / "cache-raw" / "manifest.json").read_bytes() == before
    assert not (work / "runs" / "a").exists() and not (work / "data" / "cache").exists()


def test_from_flags_need_from(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    assert main(["train", "tiny.yaml", "--raw-dir", "somewhere"]) == 2
    assert "give --from" in capsys.readouterr().err


@pytest.mark.parametrize("frozen", [False, True], ids=["called-from-python", "console-entry"])
def test_encoders_are_freed_before_the_transformer_loads(work, monkeypatch, frozen):
    """One process must not hold the text encoder and VAE while it trains: their memory is the transformer's. Also
    as the `flowtrain` command runs it, where what loading left is frozen (`flowtrain.gc_pause`): only reference
    counting frees the encoders then, so they must hold no reference cycle."""
    import gc
    import weakref

    from flowtrain import gc_pause

    if frozen:
        monkeypatch.setattr(gc_pause, "_freeze", True)
        before = gc.get_freeze_count()

    from flowtrain.models.flux2_klein.family import Flux2Klein

    encoders: list[weakref.ref] = []
    alive_when_transformer_loads: list[list[bool]] = []
    real_encoders, real_transformer = Flux2Klein.load_encoders, Flux2Klein.load_transformer

    def recording(self, *args, **kwargs):  # observes; the real loading runs
        pipe = real_encoders(self, *args, **kwargs)
        encoders.extend([weakref.ref(pipe.text_encoder), weakref.ref(pipe.vae)])
        return pipe

    def checking(self, *args, **kwargs):
        alive_when_transformer_loads.append([ref() is not None for ref in encoders])
        return real_transformer(self, *args, **kwargs)

    monkeypatch.setattr(Flux2Klein, "load_encoders", recording)
    monkeypatch.setattr(Flux2Klein, "load_transformer", checking)
    monkeypatch.chdir(work)
    try:
        assert main(["train", "tiny.yaml", "--from", "src", "--resolution", str(TINY_RES), "--quiet"]) == 0
    finally:
        if frozen:
            assert gc.get_freeze_count() > before
            gc.unfreeze()  # this test process is pytest's: give its objects back to the collector
    assert alive_when_transformer_loads == [[False, False]]
