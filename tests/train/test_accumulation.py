"""Gradient accumulation and clipping, checked against a hand-made step: the update is the clipped mean gradient of
the micro-batches, the logged loss is their mean, and the logged grad_norm is the norm before clipping."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

LR, MAX_NORM = 0.5, 1e-4


def test_accumulated_clipped_step_matches_a_manual_one(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    from accelerate.utils import set_seed

    from flowtrain.data.cache import CacheDataset, ResumableSampler
    from flowtrain.losses.flow_matching import FlowMatchingLoss
    from flowtrain.models import get_family
    from flowtrain.testing.training import train_config
    from flowtrain.track import read_metrics
    from flowtrain.train.loop import train
    from flowtrain.train.step import make_inputs, step_loss, step_seed
    from flowtrain.train.trainable import build_transformer

    cfg = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "run",
        train={"max_steps": 1, "batch_size": 1, "gradient_accumulation_steps": 2, "learning_rate": LR,
               "max_grad_norm": MAX_NORM},
        optimizer={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
        lora={"rank": 4, "targets": "attention", "init": "default"},  # non-zero B and A: all LoRA weights move
        dataset={"shuffle": False},
    )  # fmt: skip
    train(cfg, progress=False)
    trained = load_file(str(tmp_path / "run" / "checkpoint-1" / "trainable.safetensors"))
    row = read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl")[-1]

    # The same step by hand: same init (seeded like the loop), the first two rows, the loop's per-micro generators.
    family = get_family("flux2_klein")
    dataset = CacheDataset(cfg.dataset.cache_dir)
    set_seed(cfg.train.seed)
    model, _ = build_transformer(cfg, family)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    init = {n: p.detach().clone() for n, p in params.items()}
    stats = dataset.latent_norm
    rows = iter(ResumableSampler(len(dataset), 1, seed=0, shuffle=False))
    losses = []
    for micro in range(2):
        batch = dataset.collate([dataset[next(rows)]])
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, 0, micro, 0))
        inputs = make_inputs(batch, cfg, family, stats, None, gen, torch.device("cpu"))
        loss, _ = step_loss(model, family, inputs, FlowMatchingLoss())
        (loss / 2).backward()
        losses.append(loss.item())
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params.values()])).item()
    scale = min(1.0, MAX_NORM / (norm + 1e-6))

    assert row["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)  # the mean of the micro-batch losses
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)  # before clipping
    assert norm > 10 * MAX_NORM  # so clipping did act
    assert trained.keys() == params.keys()
    for n, p in params.items():
        expected = init[n] - LR * scale * p.grad
        assert torch.allclose(trained[n], expected, atol=1e-7, rtol=1e-5), n
