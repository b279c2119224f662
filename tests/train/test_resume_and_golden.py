"""Golden losses and resume equivalence on the tiny model (fp32, CPU)."""

from __future__ import annotations

import pytest

from flowtrain.testing.training import assert_resume_exact
from flowtrain.testing.training import train_config as _cfg
from flowtrain.train.loop import train

# First losses of the tiny LoRA run (seed 0, lr 1e-3, batch 2, logit-normal σ, torch 2.13 CPU). They change only
# when the numerics change: a refactor that is not meant to change numerics must keep them.
GOLDEN = [1.668452, 1.57211, 1.612449, 1.629254]


def test_golden_losses(tiny_pipeline_dir, tiny_cache, tmp_path):
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", train={"max_steps": 4})
    result = train(cfg, progress=False)
    got = [round(result.losses[s], 6) for s in sorted(result.losses)]
    assert got == pytest.approx(GOLDEN, abs=1e-6), got


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_equals_uninterrupted(tiny_pipeline_dir, tiny_cache, tmp_path, mode):
    """6 steps straight == 3 steps, resume from the checkpoint, 3 more: losses and weights bitwise."""
    extra = {"train_mode": mode, "lora": {"dropout": 0.1}, "train": {"max_steps": 6, "caption_dropout": 0.3}}
    extra["dataset"] = {"latent_sampling": "sample"}  # exercise every random draw the step makes
    a, b = (_cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / run, **extra) for run in "ab")
    assert_resume_exact(a, b, stop=3)
    # 8 rows / batch 2 = 4 batches an epoch: step 6 is mid-epoch 1, so the data position was resumed mid-epoch.
    import json

    state = json.loads((tmp_path / "b" / "checkpoint-3" / "state.json").read_text())
    assert state["data"] == {"epoch": 0, "batch": 3, "seed": 0}


def test_resume_refuses_changed_essentials(tiny_pipeline_dir, tiny_cache, tmp_path):
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "r", train={"max_steps": 3})
    train(cfg, progress=False)
    cfg.lora.rank = 8
    cfg.train.max_steps = 6
    with pytest.raises(ValueError, match="lora"):
        train(cfg, resume="latest", progress=False)
