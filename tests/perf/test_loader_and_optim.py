"""Speed options that must stay on by default: fused optimizer kernels, pinned memory and prefetching in the
loader, batches kept in the cache's storage dtype until they reach the device, cached position ids."""

from __future__ import annotations

import threading

import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.config.schema import OptimizerConfig
from flowtrain.data.cache import CacheDataset, ResumableSampler
from flowtrain.data.loader import (
    BatchPrefetcher,
    MainProcessLoader,
    batch_iterator,
    build_loader,
    use_prefetch_thread,
)
from flowtrain.testing.data import tiny_config_dict
from flowtrain.testing.synthetic import write_synthetic_cache
from flowtrain.train.optim import build_optimizer
from flowtrain.train.perf import hot_autocast, hot_backward, hot_clip, hot_optimizer, optimizer_kwargs


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]


def test_fused_kernels_by_default_where_torch_has_them():
    assert optimizer_kwargs(_params()) == {"fused": True}  # torch ships fused Adam/AdamW/SGD for CPU
    for name in ("adamw", "adam", "sgd"):
        assert build_optimizer(_params(), OptimizerConfig(name=name), 1e-3).defaults["fused"] is True, name
    assert optimizer_kwargs(_params(), "foreach") == {"foreach": True}
    assert optimizer_kwargs(_params(), "for_loop") == {"foreach": False}
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]  # no fused kernels there: foreach
    assert optimizer_kwargs(meta) == {"foreach": True}
    with pytest.raises(ValueError, match="implementation"):
        optimizer_kwargs(_params(), "fast")


def test_plain_accelerate_setups_step_the_torch_optimizer_directly():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    params = _params()
    opt = accelerator.prepare(torch.optim.AdamW(params, lr=0.1, fused=True))
    hot = hot_optimizer(opt, accelerator)
    assert hot is opt.optimizer  # no AcceleratedOptimizer indirection on the hot path
    for p in params:
        p.grad = torch.ones_like(p)
    before = params[0].detach().clone()
    hot.step()
    assert not torch.equal(before, params[0])
    hot.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


def test_plain_accelerate_setups_call_backward_directly_with_the_same_gradients():
    """accelerate's `backward` divides by its accumulation steps (1) first: `Tensor.backward` gives the same bits."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert hot_backward(accelerator) is torch.Tensor.backward
    grads = []
    for backward in (accelerator.backward, hot_backward(accelerator)):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, 3))
        backward((torch.randn(7, 5) @ w).tanh().square().mean())
        grads.append(w.grad)
    assert torch.equal(*grads)


def test_plain_accelerate_setups_clip_with_torch_and_the_same_bits():
    """accelerate's clip groups parameters by DTensor mesh and returns the norm of the one group's norm: the same
    norm and the same clipped gradients as torch's `clip_grad_norm_`, bit for bit."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert hot_clip(accelerator) is torch.nn.utils.clip_grad_norm_
    torch.manual_seed(0)
    grads = [torch.randn(64, 16) * 3, torch.randn(16) * 1e-3, torch.randn(300) * 7]
    out = []
    for clip in (accelerator.clip_grad_norm_, hot_clip(accelerator)):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        out.append((clip(params, 1.0), [p.grad for p in params]))
    (norm_a, grads_a), (norm_b, grads_b) = out
    assert torch.equal(norm_a, norm_b) and norm_a > 1.0  # clipping happened
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_autocast_is_a_null_context_without_mixed_precision_and_accelerates_with_it():
    """Without mixed precision accelerate's autocast is a `nullcontext` too (built anew each call); with bf16 the loop
    keeps accelerate's, and the forward inside it runs in bf16."""
    import contextlib

    from accelerate import Accelerator

    from flowtrain.testing.training import fresh_accelerator_state

    plain = Accelerator(cpu=True)
    assert hot_autocast(plain) is contextlib.nullcontext
    with plain.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with fresh_accelerator_state():
        bf16 = Accelerator(cpu=True, mixed_precision="bf16")
        assert hot_autocast(bf16) == bf16.autocast
        with hot_autocast(bf16)():
            assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16


def _dataset_and_sampler(cache, batch=2):
    ds = CacheDataset(cache)
    return ds, ResumableSampler(len(ds), batch, seed=0, **ds.shuffle_blocks(None))


def test_loader_pins_memory_for_cuda_and_prefetches_with_workers(tiny_cache):
    ds, sampler = _dataset_and_sampler(tiny_cache[1])
    kw = {"batch_size": 2, "collate_fn": ds.collate, "pin_memory": True, "prefetch_factor": 3}
    cuda = build_loader(ds, sampler, num_workers=2, device=torch.device("cuda"), **kw)  # not iterated: no GPU needed
    assert cuda.pin_memory and cuda.prefetch_factor == 3 and cuda.persistent_workers and cuda.num_workers == 2
    cpu = build_loader(ds, sampler, num_workers=0, device=torch.device("cpu"), **kw)
    assert not cpu.pin_memory and cpu.prefetch_factor is None  # pinning buys nothing on CPU


def test_main_process_loader_reads_what_a_dataloader_reads(tmp_path):
    """Without workers or pinning the loop reads through `MainProcessLoader`: the DataLoader's batches, in its order,
    the short last one of a finite sampler included."""
    from torch.utils.data import DataLoader

    cache = write_synthetic_cache(tmp_path / "c", 7, text_shape=(6, 12))
    ds, sampler = _dataset_and_sampler(cache, batch=3)
    kw = {"batch_size": 3, "collate_fn": ds.collate, "pin_memory": True, "prefetch_factor": 2, "num_workers": 0}
    loader = build_loader(ds, sampler, device=torch.device("cpu"), **kw)
    assert isinstance(loader, MainProcessLoader)
    assert isinstance(build_loader(ds, sampler, device=torch.device("cuda"), **kw), DataLoader)  # pins: torch's
    ours, torchs = iter(loader), iter(DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=ds.collate))
    for _ in range(8):  # across epochs
        a, b = next(ours), next(torchs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finite = list(MainProcessLoader(ds, range(7), batch_size=3, collate_fn=ds.collate))
    assert [b["index"].tolist() for b in finite] == [[0, 1, 2], [3, 4, 5], [6]]


def test_prefetch_thread_reads_ahead_in_order(tiny_pipeline_dir, tiny_cache, tmp_path):
    cfg = FlowtrainConfig.model_validate(tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "r"))
    assert cfg.dataset.prefetch is None and cfg.optimizer.implementation == "auto"  # the defaults: auto
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_prefetch_thread(None, 0, cuda) and not use_prefetch_thread(None, 0, cpu)  # auto: accelerators only
    assert use_prefetch_thread(True, 0, cpu) and not use_prefetch_thread(False, 0, cuda)
    assert not use_prefetch_thread(True, 2, cuda)  # worker processes prefetch on their own
    ds, sampler = _dataset_and_sampler(tiny_cache[1])
    loader = build_loader(ds, sampler, batch_size=2, collate_fn=ds.collate, num_workers=0, pin_memory=True,
                          prefetch_factor=2, device=torch.device("cpu"))  # fmt: skip
    batches = batch_iterator(loader, prefetch=True, depth=2)
    assert isinstance(batches, BatchPrefetcher)
    direct = iter(loader)
    for _ in range(6):  # same batches, same order as reading the loader directly
        a, b = next(batches), next(direct)
        assert all(torch.equal(a[k], b[k]) for k in a)
    batches.close()
    assert not batches._thread.is_alive()


def test_training_with_the_prefetch_thread_is_exact(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    """`dataset.prefetch: true` (what auto picks on a GPU) trains on the same batches as reading inline: the same
    losses, bitwise; the thread is used and stopped at the end."""
    from flowtrain.data import loader as loader_module
    from flowtrain.testing.training import fresh_accelerator_state, train_config
    from flowtrain.train.loop import train

    made: list[BatchPrefetcher] = []

    class Recorded(BatchPrefetcher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(loader_module, "BatchPrefetcher", Recorded)  # the real class, recorded so the test can see it
    losses = {}
    for prefetch in (False, True):
        cfg = train_config(tiny_pipeline_dir, tiny_cache[1], tmp_path / str(prefetch), train={"max_steps": 6},
                           dataset={"prefetch": prefetch})  # fmt: skip
        with fresh_accelerator_state():
            losses[prefetch] = train(cfg, progress=False).losses
    assert len(made) == 1 and not made[0]._thread.is_alive()
    assert losses[True] == losses[False] and len(losses[True]) == 6


def test_prefetcher_reraises_errors_at_the_batch_that_failed():
    def source():
        yield 1
        yield 2
        raise OSError("disk gone")

    it = BatchPrefetcher(source(), depth=4)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_prefetcher_close_does_not_hang_on_an_endless_source():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = BatchPrefetcher(endless(), depth=1)
    assert next(it) == 0
    it.close()
    assert not it._thread.is_alive()
    assert it._thread not in threading.enumerate()


def test_rows_stay_bf16_until_the_device_and_workers_collate_into_shared_memory(tmp_path):
    from flowtrain.models import get_family
    from flowtrain.train.step import make_inputs

    cache = write_synthetic_cache(tmp_path / "c", 12, text_shape=(6, 12), text_dtype="bfloat16")
    ds, sampler = _dataset_and_sampler(cache, batch=3)
    assert ds[0]["text_embeds"].dtype == torch.bfloat16  # half the bytes to collate, pin and copy
    kw = {
        "batch_size": 3,
        "collate_fn": ds.collate,
        "pin_memory": True,
        "prefetch_factor": 2,
        "device": torch.device("cpu"),
    }
    in_process = iter(build_loader(ds, sampler, num_workers=0, **kw))
    worker = iter(build_loader(ds, sampler, num_workers=1, **kw))
    for _ in range(3):
        a, b = next(in_process), next(worker)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert b["text_embeds"].is_shared()  # stacked straight into shared memory in the worker
    cfg = FlowtrainConfig.model_validate(tiny_config_dict("unused", cache, tmp_path / "o"))
    stats = {"bn_mean": torch.zeros(16), "bn_std": torch.ones(16)}  # 4C for moments of 2C = 8 channels
    inputs = make_inputs(a, cfg, get_family("flux2_klein"), stats, None, torch.Generator().manual_seed(0),
                         torch.device("cpu"))  # fmt: skip
    assert inputs.cond["text_embeds"].dtype == torch.float32
    assert torch.equal(inputs.cond["text_embeds"], a["text_embeds"].float())


def test_position_ids_are_built_once_per_shape():
    from flowtrain.models.flux2_klein.latents import latent_ids, position_ids, text_ids

    a = position_ids(2, 4, 6, 9, torch.device("cpu"))
    assert a[0] is position_ids(2, 4, 6, 9, torch.device("cpu"))[0]
    assert torch.equal(a[0], latent_ids(2, 4, 6)) and torch.equal(a[1], text_ids(2, 9))
