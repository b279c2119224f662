"""A verb never destroys or mixes with earlier output unless asked (`flowtrain.outputs`, docs/reliability.md).

Earlier output of the same verb is refused with the choices (continue / a new folder / --overwrite); another
verb's output is refused outright; `--overwrite` replaces a folder only once the new output is complete, and puts
the earlier output back when the new run fails. Every case runs through the CLI; the two data-loss reports of
issue 11 run exactly as they were reported, through the installed console script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowtrain.cli import main
from flowtrain.testing.data import TINY_RES, TINY_SEQ, make_image_folder, tiny_config_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def flowtrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script in a real subprocess; the caller checks the exit code."""
    exe = Path(sys.executable).parent / "flowtrain"
    return subprocess.run([str(exe), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`: equal snapshots mean nothing was touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def unusable_folder(root: Path, n: int = 3) -> Path:
    """Captioned files that are not images: `prepare` skips every one of them and fails."""
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"x{i}.png").write_bytes(b"not an image at all")
        (root / f"x{i}.txt").write_text(f"caption {i}")
    return root


def _refusal(err: str, folder: str, *choices: str) -> None:
    assert f" {folder} holds " in err and "Traceback" not in err, err
    for choice in choices:
        assert choice in err, (choice, err)


# ---- issue 11, case 1: a failed prepare deleted the earlier good output -------------------------------------------


def test_failed_prepare_keeps_the_earlier_output_as_reported(tmp_path):
    make_image_folder(tmp_path / "good", n=4)
    unusable_folder(tmp_path / "bad")
    assert flowtrain("prepare", "good/", "--out", "raw", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path / "raw")
    assert {"manifest.json", "raw-00000.parquet"} <= set(before)

    proc = flowtrain("prepare", "bad/", "--out", "raw", cwd=tmp_path)  # exactly as reported
    assert proc.returncode == 2
    _refusal(proc.stderr, "raw", "--overwrite", "a new --out", "manifest.json")
    assert snapshot(tmp_path / "raw") == before

    # Asked to replace it, with input that fails: the earlier output is put back as it was.
    proc = flowtrain("prepare", "bad/", "--out", "raw", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 2 and "no usable images" in proc.stderr and "back in place" in proc.stderr
    assert snapshot(tmp_path / "raw") == before
    assert not (tmp_path / ".raw.replaced").exists()

    # Asked to replace it, with good input: replaced, and nothing of the old output is left anywhere.
    make_image_folder(tmp_path / "other", n=3, seed=1)
    assert flowtrain("prepare", "other/", "--out", "raw", "--overwrite", cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text())["num_rows"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "other", "raw"]


# ---- issue 11, case 2: train into a finished run's folder clobbered it ---------------------------------------------


def _train_config(path: Path, pipeline: Path, cache: Path, run: Path, **train) -> Path:
    cfg = tiny_config_dict(pipeline, cache, run, max_steps=4, **train)
    cfg["checkpoint"] = {"every_steps": 2, "keep_last": None}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_pipeline_dir, tiny_cache) -> Path:
    """A finished 4-step LoRA run (checkpoints 2 and 4); tests copy it before touching it."""
    root = tmp_path_factory.mktemp("finished")
    cfg = _train_config(root / "cfg.yaml", tiny_pipeline_dir, tiny_cache[1], root / "run")
    assert main(["train", str(cfg), "--quiet"]) == 0
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path, tiny_pipeline_dir, tiny_cache) -> tuple[Path, Path]:
    """(config, run folder): a copy of the finished run and a config that trains into it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return _train_config(tmp_path / "cfg.yaml", tiny_pipeline_dir, tiny_cache[1], run), run


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))


def test_train_into_a_finished_run_is_refused_as_reported(run_copy, tmp_path):
    cfg, run = run_copy
    before = snapshot(run)
    proc = flowtrain("train", str(cfg), "--quiet", cwd=tmp_path)  # no --resume_from_checkpoint, as reported
    assert proc.returncode == 2
    choices = ("--resume_from_checkpoint latest", "a new output_dir", "--overwrite", "checkpoint-4")
    _refusal(proc.stderr, str(run), *choices)
    assert snapshot(run) == before

    # A checkpoint of another folder would start another history inside this run: refused too.
    shutil.copytree(run / "checkpoint-2", tmp_path / "elsewhere" / "checkpoint-2")
    assert main(["train", str(cfg), "--resume_from_checkpoint", str(tmp_path / "elsewhere" / "checkpoint-2")]) == 2
    assert main(["train", str(cfg), "--overwrite", "--resume_from_checkpoint", "latest"]) == 2
    assert snapshot(run) == before


def test_train_overwrite_replaces_the_whole_run(run_copy, tmp_path):
    cfg, run = run_copy
    assert main(["train", str(cfg), "--quiet", "--overwrite", "train.max_steps=2"]) == 0
    # Nothing of the old run is left to be mistaken for this one: `latest` is this run's own checkpoint.
    assert _steps(run) == [2]
    assert json.loads((run / "checkpoint-2" / "state.json").read_text())["train"]["max_steps"] == 2
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "run"]


def test_train_resume_latest_continues_the_run_in_place(run_copy):
    cfg, run = run_copy
    assert main(["train", str(cfg), "--quiet", "--resume_from_checkpoint", "latest", "train.max_steps=6"]) == 0
    assert _steps(run) == [2, 4, 6]


def test_failed_overwrite_puts_the_earlier_run_back(run_copy, tmp_path, capsys):
    cfg, run = run_copy
    before = snapshot(run)
    missing = tmp_path / "no-such-model"
    assert main(["train", str(cfg), "--quiet", "--overwrite", f"model.pretrained={missing}"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert snapshot(run) == before and not (tmp_path / ".run.replaced").exists()


def test_overwrite_that_fails_after_a_checkpoint_keeps_both_runs(run_copy, tmp_path, capsys):
    cfg, run = run_copy
    before = snapshot(run)
    diverge = ["train.learning_rate=1e30", "train.nonfinite=stop", "checkpoint.every_steps=1"]
    assert main(["train", str(cfg), "--quiet", "--overwrite", *diverge]) == 3  # NaN at step 2, after checkpoint-1
    err = capsys.readouterr().err
    aside = tmp_path / ".run.replaced"
    assert str(aside) in err and "resume" in err
    assert _steps(run) == [1] and snapshot(aside) == before  # the new run can be resumed, the old one is whole
    # Until the user settles it, another --overwrite is refused rather than losing one of the two.
    assert main(["train", str(cfg), "--quiet", "--overwrite"]) == 2
    assert "did not finish" in capsys.readouterr().err and snapshot(aside) == before


# ---- the other verbs -------------------------------------------------------------------------------------------


def test_precompute_refuses_a_finished_cache_and_continues_an_unfinished_one(tiny_pipeline_dir, tiny_cache, tmp_path):
    raw, cache = tiny_cache[0], tmp_path / "cache"
    shutil.copytree(tiny_cache[1], cache)
    before = snapshot(cache)
    args = ["precompute", str(raw), "--model", str(tiny_pipeline_dir), "--out", str(cache), "--quiet"]
    args += ["--resolution", str(TINY_RES), f"model.max_sequence_length={TINY_SEQ}", "--dtype", "float32"]
    assert main(args) == 2
    assert snapshot(cache) == before

    (cache / "manifest.json").unlink()  # an interrupted run: continued without --overwrite, its shards reused
    assert main(args) == 0
    after = snapshot(cache)
    assert after.pop("manifest.json") and {k: v for k, v in before.items() if k != "manifest.json"} == after

    assert main([*args, "--overwrite"]) == 0
    assert (cache / "manifest.json").exists() and not (tmp_path / ".cache.replaced").exists()


def test_sample_refuses_earlier_images(tiny_pipeline_dir, tmp_path, capsys):
    args = ["sample", "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "s"), "--steps", "1"]
    args += ["--height", str(TINY_RES), "--width", str(TINY_RES), f"model.max_sequence_length={TINY_SEQ}"]
    assert main([*args, "--prompt", "a photo number 1"]) == 0
    before = snapshot(tmp_path / "s")
    assert main([*args, "--prompt", "a photo number 2"]) == 2
    _refusal(capsys.readouterr().err, str(tmp_path / "s"), "--overwrite", "grid.png")
    assert snapshot(tmp_path / "s") == before
    assert main([*args, "--prompt", "a photo number 2", "--prompt", "a photo number 3", "--overwrite"]) == 0
    assert (tmp_path / "s" / "prompts.txt").read_text() == "a photo number 2\na photo number 3\n"


def test_autoencoder_refuses_an_earlier_run(tiny_cache, tmp_path, capsys):
    repo = Path(__file__).resolve().parents[2]
    args = ["autoencoder", str(repo / "configs/demo/autoencoder.yaml"), f"data.raw_dir={tiny_cache[0]}"]
    args += ["data.resolution=16", "model.block_out_channels=[8, 16]", "model.norm_num_groups=4"]
    args += ["train.max_steps=2", "train.batch_size=4", "tracking.report_to=[jsonl]", "tracking.graphs=false"]
    args += ["stats.max_images=4", f"output_dir={tmp_path / 'ae'}", "--quiet"]
    assert main(args) == 0
    before = snapshot(tmp_path / "ae")
    assert main(args) == 2
    _refusal(capsys.readouterr().err, str(tmp_path / "ae"), "--overwrite", "vae")
    assert snapshot(tmp_path / "ae") == before
    assert main([*args, "--overwrite"]) == 0 and not (tmp_path / ".ae.replaced").exists()


def test_no_verb_writes_over_another_verbs_output(tiny_pipeline_dir, tiny_cache, finished_run, tmp_path, capsys):
    raw, cache = tiny_cache
    before = {p: snapshot(p) for p in (raw, cache, finished_run)}
    cfg = _train_config(tmp_path / "cfg.yaml", tiny_pipeline_dir, cache, cache)
    calls = [
        ["train", str(cfg), "--overwrite"],
        ["prepare", str(raw), "--out", str(cache), "--overwrite"],
        ["precompute", str(raw), "--model", str(tiny_pipeline_dir), "--out", str(raw), "--overwrite"],
        ["sample", "--model", str(tiny_pipeline_dir), "--prompt", "x", "--out", str(finished_run), "--overwrite"],
        ["demo", "--out", str(finished_run), "--overwrite"],
    ]
    for call in calls:
        assert main(call) == 2, call
        assert "never writes over another verb's output" in capsys.readouterr().err, call
    assert {p: snapshot(p) for p in before} == before


def test_odd_output_folders_get_one_message(tmp_path, capsys):
    make_image_folder(tmp_path / "good", n=2)
    (tmp_path / "a-file").write_text("x")
    assert main(["prepare", str(tmp_path / "good"), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "good"), "--out", str(tmp_path / "a-file" / "raw")]) == 2
    assert "is a file, so no folder can be made there" in capsys.readouterr().err
    # An --overwrite that was killed left the earlier output aside: the next one must not delete it.
    assert main(["prepare", str(tmp_path / "good"), "--out", str(tmp_path / "raw"), "--quiet"]) == 0
    shutil.copytree(tmp_path / "raw", tmp_path / ".raw.replaced")
    assert main(["prepare", str(tmp_path / "good"), "--out", str(tmp_path / "raw"), "--overwrite"]) == 2
    assert f"is in {tmp_path / '.raw.replaced'}" in capsys.readouterr().err
