"""train.engines.fsdp and the EMA on FSDP2 shards, in one process (a real gloo process group of size 1, so it runs in
seconds; tests/dist/test_fsdp2_cpu.py runs them on 2 processes against DDP)."""

from __future__ import annotations

import pytest
import torch

from flowtrain.train.ema import EMA
from flowtrain.train.engines.fsdp import (
    copy_into_shards,
    gather_weights,
    is_shard,
    load_shards,
    read_shards,
    save_shards,
    state_dict_view,
)


@pytest.fixture
def process_group(monkeypatch):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29748")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_model(seed: int = 0) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)  # a frozen part, like a LoRA's base
    fully_shard(model[2])
    fully_shard(model)
    return model


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_ema_on_shards_updates_locally_and_swaps_into_what_fsdp_gathers(process_group):
    model = _sharded_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(is_shard(p) for p in trainable)
    opt = torch.optim.SGD(trainable, lr=0.5)
    ema = EMA(model, decay=0.5)
    assert all(is_shard(s) for s in ema.shadow.values())
    x = torch.randn(3, 4)
    before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
    _step(model, opt, x)
    ema.update(1)  # 0.5 · before + 0.5 · after
    after = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, s in ema.shadow.items():
        torch.testing.assert_close(s.full_tensor(), 0.5 * before[n] + 0.5 * after[n])

    trained_out = model(x).detach()
    with ema.swapped_in(model):  # the forward (FSDP's all-gather) sees the EMA weights...
        swapped_out = model(x).detach()
        assert all(torch.equal(p.detach().full_tensor(), ema.shadow[n].full_tensor())
                   for n, p in model.named_parameters() if p.requires_grad)  # fmt: skip
    assert not torch.equal(swapped_out, trained_out)
    assert torch.equal(model(x).detach(), trained_out)  # ...and the trained ones again afterwards
    assert all(torch.equal(p.detach().full_tensor(), after[n]) for n, p in model.named_parameters() if n in after)


def test_shards_round_trip_through_a_checkpoint_folder(process_group, tmp_path):
    model = _sharded_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(3, 4)
    _step(model, opt, x)
    ema = {n: p.detach().clone() * 2 for n, p in model.named_parameters() if p.requires_grad}
    save_shards(tmp_path, model, opt, ema)
    saved = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
    saved_moment = {k: v["exp_avg"].full_tensor().clone() for k, v in enumerate(opt.state.values())}
    # Only the trainable tensors are written: the frozen ones come from the model files.
    whole = read_shards(tmp_path)
    assert set(whole["model"]) == set(saved) and set(whole["ema"]) == set(saved)
    assert all(torch.equal(whole["model"][n], saved[n]) for n in saved)

    _step(model, opt, x)  # move away, then read the checkpoint back into a fresh model and optimizer
    fresh = _sharded_model(seed=1)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    got_ema = load_shards(tmp_path, fresh, fresh_opt)
    assert all(torch.equal(p.detach().full_tensor(), saved[n]) for n, p in fresh.named_parameters() if n in saved)
    assert all(torch.equal(got_ema[n].full_tensor(), ema[n].full_tensor()) for n in ema)
    moments = {k: v["exp_avg"].full_tensor() for k, v in enumerate(fresh_opt.state.values())}
    assert all(torch.equal(moments[k], saved_moment[k]) for k in saved_moment)
    # The frozen layer was not touched by the load (seed 1's weights stay).
    assert not torch.equal(fresh[0].weight.detach().full_tensor(), model[0].weight.detach().full_tensor())


def test_gathered_weights_are_whole_tensors_that_the_writers_see(process_group):
    model = _sharded_model()
    full = gather_weights(model, trainable_only=True)
    assert set(full) == {"2.weight", "2.bias"} and not any(is_shard(t) for t in full.values())
    with state_dict_view(model, full):
        assert model.state_dict() is full
    assert is_shard(next(iter(model.state_dict().values())))  # the method is back


def test_copy_into_shards_returns_the_previous_values(process_group):
    model = _sharded_model()
    params = [p for p in model.parameters() if p.requires_grad]
    zeros = [torch.zeros_like(p) for p in params]
    old = copy_into_shards(params, zeros)
    assert all(p.detach().full_tensor().abs().sum() == 0 for p in params)
    copy_into_shards(params, old)
    assert all(torch.equal(p.detach().full_tensor(), o.full_tensor()) for p, o in zip(params, old, strict=True))
