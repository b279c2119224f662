"""Checkpoint writes are atomic, `latest` only ever names a complete and intact checkpoint, a failed write (disk
full) leaves the previous checkpoint intact and stops with a clear message, and saving follows every_steps /
every_minutes / keep_last / keep_every."""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flowtrain.cli import main
from flowtrain.train import checkpoint as ckpt
from flowtrain.train import control
from flowtrain.train.errors import EXIT_CHECKPOINT_WRITE, CheckpointWriteError
from flowtrain.train.loop import train


def _parts(lr: float = 0.1):
    p = torch.nn.Parameter(torch.arange(4.0))
    opt = torch.optim.AdamW([p], lr=lr)
    p.grad = torch.ones(4)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return p, opt, sched


def _write(out: Path, step: int, value: float = 0.0, **kw) -> Path:
    p, opt, sched = _parts()
    with torch.no_grad():
        p.fill_(value)
    return ckpt.write_checkpoint(out, step, trainable={"w": p}, optimizer=opt, lr_scheduler=sched,
                                 state={"data": {"epoch": 0, "batch": step, "seed": 0}}, **kw)  # fmt: skip


# ---- unit level ------------------------------------------------------------------------------------------------


def test_complete_checkpoint_round_trips_and_records_sizes(tmp_path):
    path = _write(tmp_path, 3, value=1.5, rank_state={"loss_acc": 0.25, "steps_acc": 1})
    assert path.name == "checkpoint-3" and ckpt.verify_checkpoint(path) is None
    marker = json.loads((path / ckpt.COMPLETE).read_text())
    assert marker["step"] == 3 and marker["files"]["trainable.safetensors"] > 0
    back = ckpt.load_checkpoint(path)
    assert torch.equal(back["trainable"]["w"], torch.full((4,), 1.5))
    assert back["state"]["step"] == 3 and back["loop"] == {"loss_acc": 0.25, "steps_acc": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_rng_state_round_trip_without_pickle(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_rng_state(tmp_path / "rng")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(tmp_path / "rng")
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


def test_latest_ignores_unfinished_and_damaged_checkpoints(tmp_path, caplog):
    _write(tmp_path, 2)
    good = _write(tmp_path, 4)
    # an interrupted write: a .tmp folder, and a folder with the right name but no COMPLETE marker
    shutil.copytree(good, tmp_path / ".checkpoint-6.tmp")
    (tmp_path / ".checkpoint-6.tmp" / ckpt.COMPLETE).unlink()
    shutil.copytree(good, tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / ckpt.COMPLETE).unlink()
    # a "complete" checkpoint whose file was later truncated (disk trouble, a bad copy)
    damaged = _write(tmp_path, 10)
    with open(damaged / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 10]
    assert "optimizer.pt has 10 bytes" in ckpt.verify_checkpoint(damaged)
    assert ckpt.resolve_resume(tmp_path, "latest") == good
    assert "skipping" in caplog.text and "checkpoint-10" in caplog.text
    for bad in (tmp_path / "checkpoint-8", damaged, tmp_path / "nope"):
        with pytest.raises(FileNotFoundError, match="not a usable flowtrain checkpoint"):
            ckpt.resolve_resume(tmp_path, str(bad))
    with pytest.raises(FileNotFoundError, match="optimizer.pt has 10 bytes"):
        ckpt.load_checkpoint(damaged)
    assert ckpt.resolve_resume(tmp_path / "empty", "latest") is None


def test_write_error_leaves_previous_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    prev = _write(tmp_path, 5, value=5.0)
    real = torch.save

    def full_disk(obj, f, *a, **kw):
        Path(f).write_bytes(b"half")  # part of the file reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as err:
        _write(tmp_path, 6, value=6.0)
    msg = str(err.value)
    assert "checkpoint-6" in msg and "No space left on device" in msg and f"{prev} is intact" in msg
    assert "resume_from_checkpoint latest" in msg
    monkeypatch.setattr(torch, "save", real)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5]
    assert not (tmp_path / ".checkpoint-6.tmp").exists()
    assert torch.equal(ckpt.load_checkpoint(ckpt.resolve_resume(tmp_path, "latest"))["trainable"]["w"],
                       torch.full((4,), 5.0))  # fmt: skip


def test_failure_on_another_process_fails_every_process(tmp_path):
    """`sync` is the all-reduce of the DDP loop: this process wrote its part, another did not."""
    calls = []

    def sync(failed_here: bool) -> bool:
        calls.append(failed_here)
        return len(calls) == 2  # the phase where ranks save their RNG state failed elsewhere

    with pytest.raises(CheckpointWriteError, match="another process failed"):
        _write(tmp_path, 1, sync=sync)
    assert calls == [False, False] and not (tmp_path / ".checkpoint-1.tmp").exists()
    assert ckpt.list_checkpoints(tmp_path) == []


def test_resave_of_a_step_replaces_it_whole(tmp_path):
    _write(tmp_path, 3, value=1.0)
    _write(tmp_path, 3, value=2.0)
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "checkpoint-3")["trainable"]["w"], torch.full((4,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


def test_prune_keep_last_and_keep_every_and_leftovers(tmp_path):
    for s in range(1, 11):
        _write(tmp_path, s)
    (tmp_path / ".checkpoint-11.tmp").mkdir()
    half = tmp_path / ".checkpoint-0.deleting"  # a deletion that was killed half-way
    shutil.copytree(tmp_path / "checkpoint-1", half)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_every=4)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8, 9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{s}" for s in (10, 4, 8, 9)]
    ckpt.prune_checkpoints(tmp_path, keep_last=None)
    assert len(ckpt.list_checkpoints(tmp_path)) == 4


def test_save_clock():
    clock = control.SaveClock(every_minutes=1.0)
    assert not clock.due()
    clock.last -= 61
    assert clock.due()
    clock.saved()
    assert not clock.due()
    assert not control.SaveClock(None).due()


# ---- in the training loop ------------------------------------------------------------------------------------


def test_disk_full_during_training_stops_cleanly_and_resume_is_exact(rel_cfg, tmp_path, monkeypatch, capsys):
    extra = {"train": {"max_steps": 6}, "checkpoint": {"every_steps": 2, "keep_last": None}}
    straight = train(rel_cfg(tmp_path / "a", **extra), progress=False)

    run = tmp_path / "b"
    cfg = rel_cfg(run, **extra)
    (tmp_path / "b.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    real = torch.save

    def disk_full_at_step_4(obj, f, *a, **kw):
        if ".checkpoint-4.tmp" in str(f):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    assert main(["train", str(tmp_path / "b.yaml"), "--quiet"]) == EXIT_CHECKPOINT_WRITE
    err = capsys.readouterr().err
    assert "could not write checkpoint-4" in err and "No space left on device" in err
    assert "checkpoint-2 is intact" in err and "Traceback" not in err
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert not [p for p in run.iterdir() if p.name.startswith(".checkpoint")]
    assert not (run / "pytorch_lora_weights.safetensors").exists()

    monkeypatch.setattr(torch, "save", real)  # space freed
    resumed = train(cfg, resume="latest", progress=False)
    assert resumed.step == 6
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())}
    assert losses == straight.losses
    a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint-6")["trainable"]
    b = ckpt.load_checkpoint(run / "checkpoint-6")["trainable"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_minutes_and_keep_every_in_the_loop(rel_cfg, tmp_path):
    # every_minutes tiny: a time-based save after every step, with step-based saves off
    timed = {"every_steps": None, "every_minutes": 1e-9, "keep_last": None}
    res = train(rel_cfg(tmp_path / "t", train={"max_steps": 4}, checkpoint=timed), progress=False)
    assert res.step == 4 and [s for s, _ in ckpt.list_checkpoints(tmp_path / "t")] == [1, 2, 3, 4]
    # keep the newest one, plus every 3rd for good
    kept = {"every_steps": 1, "keep_last": 1, "keep_every": 3}
    train(rel_cfg(tmp_path / "k", train={"max_steps": 7}, checkpoint=kept), progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "k")] == [3, 6, 7]
