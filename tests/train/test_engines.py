"""The engine-neutral calls (train/engines) and a sharding engine's checkpoint layout, in one process.

The 2-process DeepSpeed runs themselves are tests/dist/test_deepspeed_cpu.py (slow)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from flowtrain.train import checkpoint as ckpt
from flowtrain.train import engines


def _engine_shards(tmp):
    """What a sharding engine writes on each process: a sub-folder of its own files."""
    (tmp / "deepspeed" / "state").mkdir(parents=True)
    (tmp / "deepspeed" / "state" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"x" * 100)
    (tmp / "deepspeed" / "latest").write_text("state")


def test_a_sharded_checkpoint_lists_its_engine_files_and_loads_without_trainable_or_optimizer(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"data": {"epoch": 0, "batch": 2, "seed": 0}}
    path = ckpt.write_checkpoint(
        tmp_path, 2, trainable=None, optimizer=None, lr_scheduler=sched, state=state, rank_files=_engine_shards
    )
    files = json.loads((path / ckpt.COMPLETE).read_text())["files"]
    assert files["deepspeed/state/zero_pp_rank_0_optim_states.pt"] == 100 and "deepspeed/latest" in files
    assert "trainable.safetensors" not in files and "optimizer.pt" not in files
    back = ckpt.load_checkpoint(path)
    assert back["trainable"] is None and back["optimizer"] is None and back["state"]["step"] == 2
    # A damaged shard makes the checkpoint unusable, like any other file it lists.
    (path / "deepspeed" / "state" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"x")
    assert "zero_pp_rank_0_optim_states.pt has 1 bytes" in ckpt.verify_checkpoint(path)
    assert ckpt.resolve_resume(tmp_path, "latest") is None


def test_a_failed_shard_write_keeps_nothing(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def broken(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointWriteError, match="No space left"):
        ckpt.write_checkpoint(
            tmp_path, 2, trainable=None, optimizer=None, lr_scheduler=sched, state={}, rank_files=broken
        )
    assert list(tmp_path.iterdir()) == []


def test_without_deepspeed_the_engine_calls_keep_plain_and_ddp_behaviour(monkeypatch):
    from accelerate.utils import DistributedType

    class Ddp:  # what the calls read of an Accelerator
        distributed_type = DistributedType.MULTI_CPU
        no_sync_called = False

        def no_sync(self, model):
            Ddp.no_sync_called = True
            return contextlib.nullcontext()

    acc, model = Ddp(), torch.nn.Linear(2, 2)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert engines.process_group_kwargs() == {}
    assert not engines.engine_checkpoint(acc)
    assert isinstance(engines.micro_batch(acc, model, last=True), contextlib.nullcontext) and not Ddp.no_sync_called
    engines.micro_batch(acc, model, last=False)
    assert Ddp.no_sync_called  # gradients stay local until the last micro-batch
    assert isinstance(engines.full_parameters(acc, model), contextlib.nullcontext)
    assert isinstance(engines.whole_model(acc, model), contextlib.nullcontext)
    assert engines.nonfinite_policy(acc, "skip") == "skip"


def test_deepspeed_without_a_gpu_starts_a_gloo_group(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engines.process_group_kwargs() == {"backend": "gloo"}
