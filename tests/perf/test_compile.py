"""train.compile: torch.compile of the transformer (regional by default) runs on CPU, matches eager, keeps the
parameter names, and does not recompile across steps at a fixed shape."""

from __future__ import annotations

import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.data.cache import CacheDataset
from flowtrain.losses import build_loss
from flowtrain.models import get_family
from flowtrain.testing.data import tiny_config_dict
from flowtrain.train.step import make_inputs, step_loss
from flowtrain.train.trainable import build_transformer


def _cfg(pipeline, cache, out, **train) -> FlowtrainConfig:
    return FlowtrainConfig.model_validate(tiny_config_dict(pipeline, cache, out, **train))


def _losses(model, cfg, steps: int, counters: list | None = None) -> list[float]:
    """`steps` LoRA steps on the first batch; appends dynamo's compile counters after each step to `counters`."""
    import torch._dynamo.utils as dynamo_utils

    family = get_family("flux2_klein")
    ds = CacheDataset(cfg.dataset.cache_dir)
    batch = ds.collate([ds[0], ds[1]])
    stats = ds.latent_norm
    loss_fn = build_loss("flow_matching")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = []
    for step in range(steps):
        inputs = make_inputs(batch, cfg, family, stats, None, torch.Generator().manual_seed(step), torch.device("cpu"))
        loss, _ = step_loss(model, family, inputs, loss_fn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
        if counters is not None:
            counters.append((dynamo_utils.counters["frames"]["total"], dynamo_utils.counters["stats"]["unique_graphs"]))
    return out


def _check(tiny_pipeline_dir, tiny_cache, tmp_path, backend: str, atol: float) -> None:
    family = get_family("flux2_klein")
    torch.manual_seed(0)
    eager, _ = build_transformer(_cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path), family)
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path, compile=True, compile_backend=backend)
    torch.manual_seed(0)  # the same LoRA init
    compiled, _ = build_transformer(cfg, family)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: checkpoints and exports unchanged
    torch._dynamo.reset()
    counters: list = []
    got = _losses(compiled, cfg, 4, counters)
    assert counters[1] == counters[-1], f"recompiled after the first step: {counters}"
    assert counters[0][1] == 2  # one graph per block kind (double, single), shared by every block of that kind
    assert got == pytest.approx(_losses(eager, cfg, 4), abs=atol)


def test_regional_compile_matches_eager_without_recompiles(tiny_pipeline_dir, tiny_cache, tmp_path):
    _check(tiny_pipeline_dir, tiny_cache, tmp_path, "aot_eager", 1e-5)


@pytest.mark.slow
def test_inductor_compile_on_cpu(tiny_pipeline_dir, tiny_cache, tmp_path):
    """The real backend (C++ codegen through the system compiler): minutes on a cold cache."""
    _check(tiny_pipeline_dir, tiny_cache, tmp_path, "inductor", 1e-4)


def test_train_runs_compiled(tiny_pipeline_dir, tiny_cache, tmp_path):
    from flowtrain.train.loop import train

    torch._dynamo.reset()
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", max_steps=2, compile=True,
               compile_backend="aot_eager")  # fmt: skip
    cfg.tracking.report_to = ["jsonl"]
    result = train(cfg, progress=False)
    assert result.step == 2 and all(v == v for v in result.losses.values())
    # The golden test's first two losses (same seed, config and data): compiling does not change the numerics.
    assert [result.losses[1], result.losses[2]] == pytest.approx([1.668452, 1.57211], abs=1e-4)
