"""FLUX.1 through the training loop on its tiny pipeline (fp32, CPU): golden losses, exact resume, and validation
images equal to `flowtrain sample` with the run's config."""

from __future__ import annotations

import json

import pytest

from flowtrain.testing.training import assert_resume_exact, train_config
from flowtrain.train.loop import train

# First losses of the tiny FLUX.1 LoRA run (seed 0, lr 1e-3, batch 2, logit-normal σ, model.guidance 3.5, torch 2.13
# CPU). They change only when the numerics change: a refactor that is not meant to change numerics must keep them.
GOLDEN = [1.392082, 1.406372, 1.385225, 1.408236]


@pytest.fixture(scope="module")
def flux1_cache(flux1_dir, tmp_path_factory):
    from flowtrain.testing.data import make_tiny_cache

    return make_tiny_cache(tmp_path_factory.mktemp("flux1_data"), flux1_dir, family="flux1")[1]


def test_golden_losses(flux1_dir, flux1_cache, tmp_path):
    cfg = train_config(flux1_dir, flux1_cache, tmp_path / "run", family="flux1", train={"max_steps": 4})
    result = train(cfg, progress=False)
    got = [round(result.losses[s], 6) for s in sorted(result.losses)]
    assert got == pytest.approx(GOLDEN, abs=1e-6), got


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_equals_uninterrupted(flux1_dir, flux1_cache, tmp_path, mode):
    """6 steps straight == 3 steps, resume from the checkpoint, 3 more: losses and weights bitwise (caption dropout,
    LoRA dropout and latent sampling on: every random draw the step makes, with the guidance in the conditioning)."""
    extra = {"train_mode": mode, "lora": {"dropout": 0.1}, "train": {"max_steps": 6, "caption_dropout": 0.3},
             "dataset": {"latent_sampling": "sample"}}  # fmt: skip
    straight, interrupted = (train_config(flux1_dir, flux1_cache, tmp_path / d, family="flux1", **extra) for d in "ab")
    assert_resume_exact(straight, interrupted, stop=3)
    state = json.loads((tmp_path / "b" / "checkpoint-3" / "state.json").read_text())
    assert state["data"] == {"epoch": 0, "batch": 3, "seed": 0}  # 8 rows / batch 2: resumed mid-epoch


def test_validation_images_equal_flowtrain_sample_with_the_runs_config(flux1_dir, flux1_cache, tmp_path,
                                                                       validation_run, record_property):  # fmt: skip
    """Validation samples during training from the prompts' cached conditioning (T5 padded to the run's
    max_sequence_length, 32, with guidance_scale the distilled guidance value); `flowtrain sample --lora RUN` reads
    the run's config.yaml and gives the same images from the saved LoRA. Another max_sequence_length changes the
    padded T5 input every token of which is attended, hence the image: the run's value is the one used."""
    import numpy as np

    def config(run, validation):
        return train_config(flux1_dir, flux1_cache, run, family="flux1", validation=validation, train={"max_steps": 2})

    ours, sample = validation_run(flux1_dir, ["a photo of a dog", "an oil painting of a lighthouse"], tmp_path, config)
    same = sample("same")
    diffs = [int(np.abs(a - b).max()) for a, b in zip(ours, same, strict=True)]
    record_property("png_max_diff", diffs)
    assert max(diffs) <= 1  # uint8 PNGs of images equal to ~1e-6
    longer = sample("longer", "model.max_sequence_length=512")
    record_property("longer_png_diff", [int(np.abs(a - b).max()) for a, b in zip(ours, longer, strict=True)])
    assert all(np.abs(a - b).max() > 2 for a, b in zip(ours, longer, strict=True))


def test_memory_savers_leave_the_losses_bitwise(flux1_dir, flux1_cache, tmp_path):
    """Block swap plus checkpointing only the single-stream blocks (issue 19) on FLUX.1's blocks: the fp32 losses
    and the trained LoRA equal the run without them, bit for bit."""
    import torch
    from safetensors.torch import load_file

    runs = {}
    for name, opts in {"plain": {}, "savers": {"blocks_to_swap": 2, "gradient_checkpointing": "single"}}.items():
        cfg = train_config(flux1_dir, flux1_cache, tmp_path / name, family="flux1", train={"max_steps": 3, **opts})
        result = train(cfg, progress=False)
        runs[name] = (result.losses, load_file(tmp_path / name / "pytorch_lora_weights.safetensors"))
    assert runs["savers"][0] == runs["plain"][0]
    assert all(torch.equal(runs["savers"][1][k], v) for k, v in runs["plain"][1].items())


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_adapter_kinds_train_and_resume_exactly(flux1_dir, flux1_cache, tmp_path, kind):
    """Every `lora.kind` (issue 19) on FLUX.1's modules: 4 steps straight == 2, resume, 2 more, bitwise."""
    extra = {"lora": {"kind": kind, "rank": 4, "targets": "attention"}, "train": {"max_steps": 4},
             "checkpoint": {"every_steps": 2, "keep_last": None}}  # fmt: skip
    straight, interrupted = (train_config(flux1_dir, flux1_cache, tmp_path / d, family="flux1", **extra) for d in "ab")
    assert_resume_exact(straight, interrupted, stop=2)
