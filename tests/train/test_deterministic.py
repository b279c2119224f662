"""Deterministic mode: the same seed and config give bitwise-identical losses and weights on CPU, with every random
draw of a step in play; the flag is on inside the run and restored after it; another seed differs."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def test_same_seed_same_config_is_bitwise_identical(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    from flowtrain.testing.training import RecordingLoss, train_config
    from flowtrain.train.loop import train

    RecordingLoss.calls.clear()
    before = torch.are_deterministic_algorithms_enabled()

    def run(name: str, seed: int = 5):
        cfg = train_config(
            tiny_pipeline_dir, tiny_cache[1], tmp_path / name,
            train={"max_steps": 3, "seed": seed, "deterministic": True, "caption_dropout": 0.5},
            dataset={"latent_sampling": "sample"}, lora={"dropout": 0.2},
            timesteps={"scheme": "mode", "shift_mode": "resolution"},
            loss={"name": "flowtrain.testing.training:RecordingLoss"}, checkpoint={"every_steps": 3},
        )  # fmt: skip
        result = train(cfg, progress=False)
        return result.losses, load_file(str(tmp_path / name / "checkpoint-3" / "trainable.safetensors"))

    (la, wa), (lb, wb), (lc, _) = run("a"), run("b"), run("c", seed=6)
    assert la == lb  # exact float equality
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert la != lc
    assert RecordingLoss.calls and all(c["deterministic"] for c in RecordingLoss.calls)
    assert torch.are_deterministic_algorithms_enabled() == before
