"""The four verbs end to end, as a user runs them: prepare → precompute → train → resume → sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flowtrain.cli import main
from flowtrain.testing.data import TINY_RES, TINY_SEQ, make_image_folder

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def flowtrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed console script in a real subprocess."""
    exe = Path(sys.executable).parent / "flowtrain"
    proc = subprocess.run([str(exe), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"flowtrain {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """A source folder with one corrupt image and one image without caption, prepared and precomputed."""
    work = tmp_path_factory.mktemp("e2e")
    src = make_image_folder(work / "src", n=6)
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (src / "corrupt.txt").write_text("a broken file")
    Image.new("RGB", (40, 40), "red").save(src / "uncaptioned.png")
    flowtrain("prepare", "src", "--out", "raw", "--quiet", cwd=work)
    report = json.loads((work / "raw" / "prepare_report.json").read_text())
    assert (report["written"], report["skipped"]) == (6, 2)
    reasons = {item["key"]: item["reason"] for item in report["skipped_items"]}
    assert "caption" in reasons["uncaptioned"] and reasons["corrupt"]

    cfg = {
        "model": {"pretrained": str(tiny_pipeline_dir), "max_sequence_length": TINY_SEQ, "dtype": "float32"},
        "dataset": {"cache_dir": "cache"},
        "train": {"batch_size": 2, "learning_rate": 2e-3, "mixed_precision": "no", "max_steps": 20},
        "lora": {"rank": 4},
        "checkpoint": {"every_steps": 5, "keep_last": 2},
        "output_dir": "runs/unused",
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    flowtrain("precompute", "raw", "--config", "tiny.yaml", "--resolution", str(TINY_RES), "--quiet", cwd=work)
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    assert manifest["num_rows"] == 6 and manifest["fingerprint"]["settings"]["text_encoder_layers"] == [9, 18, 27]
    return work


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_lora_train_resume_sample_via_console_script(workdir, tiny_pipeline_dir):
    run = workdir / "runs" / "lora"
    flowtrain(*["train", "tiny.yaml", "--output_dir", "runs/lora", "--max_train_steps", "10", "--quiet"], cwd=workdir)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    resume = ["--resume_from_checkpoint", "latest"]
    flowtrain(*["train", "tiny.yaml", "--output_dir", "runs/lora", *resume, "--quiet"], cwd=workdir)
    # keep_last=2 pruned the older ones; steps 1..20 logged once each
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]
    assert [m["step"] for m in _metrics(run)] == list(range(1, 21))
    assert (run / "pytorch_lora_weights.safetensors").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 20
    sample = f"sample --model {tiny_pipeline_dir} --lora runs/lora --out samples/lora --steps 3 --height 32 --width 32"
    flowtrain(*sample.split(), "--prompt", "a photo number 2", cwd=workdir)
    assert Image.open(workdir / "samples/lora/000_00.png").size == (32, 32)


def test_full_finetune_train_resume_sample(workdir, tiny_pipeline_dir, monkeypatch):
    monkeypatch.chdir(workdir)
    base = "train tiny.yaml train_mode=full --output_dir runs/full --quiet"
    assert main(f"{base} --max_train_steps 10".split()) == 0
    assert main(f"{base} --resume_from_checkpoint latest".split()) == 0
    run = workdir / "runs" / "full"
    assert [m["step"] for m in _metrics(run)] == list(range(1, 21))
    from diffusers import Flux2Transformer2DModel

    Flux2Transformer2DModel.from_pretrained(run / "transformer")  # a loadable diffusers folder
    sample = f"sample --model {tiny_pipeline_dir} --transformer runs/full/transformer --out samples/full --steps 3"
    assert main([*sample.split(), "--height", "32", "--width", "32", "--prompt", "a photo number 2"]) == 0
    assert (workdir / "samples/full/grid.png").exists()


def test_help_is_instant_and_lists_verbs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flowtrain", "--help"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0
    for verb in ("prepare", "precompute", "train", "check", "sample"):
        assert verb in proc.stdout
    # --help must not import the heavy stack
    code = "import sys, flowtrain.cli as c; c.build_parser(); print('diffusers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV).stdout.split()
    assert out == ["False", "False"]


def test_config_error_is_one_clear_message(tmp_path, capsys, tiny_pipeline_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  pretrained: {tiny_pipeline_dir}\ntrain:\n  learning_rat: 1e-4\n")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rat" in err and "learning_rate" in err and "Traceback" not in err


def test_check_prints_the_resolved_config_with_extends_and_overrides(tmp_path, capsys, tiny_pipeline_dir):
    (tmp_path / "base.yaml").write_text(f"model:\n  pretrained: {tiny_pipeline_dir}\ntrain:\n  batch_size: 4\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  learning_rate: 3e-4\n")
    assert main(["check", str(tmp_path / "child.yaml"), "lora.rank=8"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["batch_size"] == 4 and resolved["train"]["learning_rate"] == 3e-4
    assert resolved["lora"]["rank"] == 8 and resolved["model"]["pretrained"] == str(tiny_pipeline_dir)
