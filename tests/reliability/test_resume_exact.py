"""Exact resume beyond the basic case, and what resume refuses / allows (in-process, tiny model)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from flowtrain.train import loop as loop_mod
from flowtrain.train.checkpoint import list_checkpoints, load_checkpoint
from flowtrain.train.loop import train


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(out)[-1][1])["trainable"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_resume_exact_with_workers_accumulation_and_unaligned_logging(rel_cfg, tmp_path, monkeypatch):
    """DataLoader workers, gradient accumulation, and a log window (2 steps) that a checkpoint (every 3) splits:
    the resumed run logs the same means and ends with the same weights."""
    extra = {
        "train": {"max_steps": 8, "gradient_accumulation_steps": 2, "log_every": 2, "batch_size": 1},
        "dataset": {"num_workers": 2},
        "checkpoint": {"every_steps": 3, "keep_last": None},
    }
    straight = train(rel_cfg(tmp_path / "a", **extra), progress=False)
    cfg = rel_cfg(tmp_path / "b", **extra)
    # Stop the run after step 5 (a SIGTERM from inside step index 4): its checkpoint splits the window 5-6.
    real = loop_mod.step_seed

    def step_seed(seed, step, micro, rank):
        if (step, micro) == (4, 0):
            signal.raise_signal(signal.SIGTERM)
        return real(seed, step, micro, rank)

    monkeypatch.setattr(loop_mod, "step_seed", step_seed)
    first = train(cfg, progress=False)
    monkeypatch.undo()
    assert first.interrupted == "SIGTERM" and [s for s, _ in list_checkpoints(tmp_path / "b")] == [3, 5]
    assert load_checkpoint(tmp_path / "b" / "checkpoint-5")["loop"]["steps_acc"] == 1  # half a log window
    second = train(cfg, resume="latest", progress=False)
    assert {**first.losses, **second.losses} == straight.losses
    assert sorted(straight.losses) == [2, 4, 6, 8]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_lr_and_max_steps_are_allowed_logged_and_applied(rel_cfg, tmp_path, caplog):
    extra = {"lr_scheduler": {"name": "cosine", "warmup_steps": 1}, "checkpoint": {"every_steps": 3}}
    cfg = rel_cfg(tmp_path / "r", train={"max_steps": 3, "learning_rate": 1e-3}, **extra)
    train(cfg, progress=False)
    cfg.train.learning_rate, cfg.train.max_steps = 4e-3, 10
    with caplog.at_level(logging.INFO):
        train(cfg, resume="latest", progress=False)
    assert "train.learning_rate changed 0.001 → 0.004" in caplog.text
    assert "train.max_steps changed 3 → 10" in caplog.text
    # The new schedule from the resumed step on: cosine over 10 steps with 1 warmup step, peak 4e-3.
    from diffusers.optimization import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    ref = get_cosine_schedule_with_warmup(torch.optim.SGD([p], lr=4e-3), 1, 10)
    want = []
    for _ in range(10):
        ref.optimizer.step()
        ref.step()
        want.append(ref.get_last_lr()[0])
    got = {r["step"]: r["lr"] for r in _rows(tmp_path / "r")}
    assert [got[s] for s in range(4, 11)] == pytest.approx(want[3:], rel=1e-12)


def test_unchanged_resume_keeps_the_restored_lr_state(rel_cfg, tmp_path):
    cfg = rel_cfg(tmp_path / "r", train={"max_steps": 3}, lr_scheduler={"name": "linear", "warmup_steps": 2})
    train(cfg, progress=False)
    state = load_checkpoint(tmp_path / "r" / "checkpoint-3")["lr_scheduler"]
    cfg.train.max_steps = 3  # same config: resuming at the end does nothing and changes nothing
    res = train(cfg, resume="latest", progress=False)
    assert res.step == 3 and load_checkpoint(tmp_path / "r" / "checkpoint-3")["lr_scheduler"] == state


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"model": {"pretrained": "OTHER-WEIGHTS"}}, "transformer"),
        ({"train_mode": "full"}, "train_mode"),
        ({"lora": {"rank": 8}}, "lora"),
        ({"lora": {"targets": "all"}}, "lora"),
        ({"dataset": {"cache_dir": "OTHER-CACHE"}}, "cache_fingerprint"),
    ],
)
def test_resume_refuses_changed_essentials(tiny_pipeline_dir, tiny_cache, rel_cfg, tmp_path, change, key):
    train(rel_cfg(tmp_path / "r", train={"max_steps": 2}), progress=False)
    section, values = next(iter(change.items()))
    if values == {"pretrained": "OTHER-WEIGHTS"}:  # the same folder layout, another transformer's weights
        other = tmp_path / "other-model"
        shutil.copytree(tiny_pipeline_dir, other)
        from safetensors.torch import load_file, save_file

        for f in (other / "transformer").glob("*.safetensors"):
            save_file({k: v + 0.01 for k, v in load_file(str(f)).items()}, str(f))
        values = {"pretrained": str(other)}
    if values == {"cache_dir": "OTHER-CACHE"}:  # a cache made with other settings (resolution) for the same model
        other = tmp_path / "other-cache"
        shutil.copytree(tiny_cache[1], other)
        manifest = json.loads((other / "manifest.json").read_text())
        manifest["fingerprint"].update(resolution=64, id="0123456789abcdef")
        (other / "manifest.json").write_text(json.dumps(manifest))
        values = {"cache_dir": str(other)}
    cfg = rel_cfg(tmp_path / "r", train={"max_steps": 4}, **{section: values})
    with pytest.raises(ValueError, match=f"cannot resume from .*checkpoint-2.*\\n  {key}: checkpoint") as err:
        train(cfg, resume="latest", progress=False)
    assert "Start a new output_dir" in str(err.value)


def test_a_moved_model_folder_resumes(tiny_pipeline_dir, rel_cfg, tmp_path):
    """The model is identified by its files, not its path: a run resumes from a moved (here: symlinked) folder."""
    train(rel_cfg(tmp_path / "r", train={"max_steps": 2}), progress=False)
    os.symlink(tiny_pipeline_dir, tmp_path / "alias")
    cfg = rel_cfg(tmp_path / "r", train={"max_steps": 3}, model={"pretrained": str(tmp_path / "alias")})
    assert train(cfg, resume="latest", progress=False).step == 3


def test_resume_with_another_batch_size_continues_in_samples(rel_cfg, tmp_path, caplog):
    cfg = rel_cfg(tmp_path / "r", train={"max_steps": 3, "batch_size": 2}, checkpoint={"every_steps": 1})
    train(cfg, progress=False)  # 3 batches of 2 = 6 of the 8 samples of epoch 0
    cfg.train.batch_size, cfg.train.max_steps = 4, 4
    with caplog.at_level(logging.INFO):
        train(cfg, resume="latest", progress=False)
    assert "global batch 2 → 4; going on at epoch 0, batch 1" in caplog.text  # sample 4: repeats 2, skips none
    assert json.loads((tmp_path / "r" / "checkpoint-4" / "state.json").read_text())["data"]["epoch"] == 1
