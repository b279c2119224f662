"""A flowtrain LoRA loads into a fresh diffusers pipeline and reproduces what was trained and sampled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.testing.data import TINY_RES, TINY_SEQ, tiny_config_dict, tiny_model
from flowtrain.train.loop import train

PROMPTS = ["a photo number 1", "a photo number 5"]
CALL = dict(height=TINY_RES, width=TINY_RES, num_inference_steps=4, guidance_scale=3.0, max_sequence_length=TINY_SEQ)


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_dir, tiny_cache, tmp_path_factory):
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path_factory.mktemp("lora") / "run")
    # alpha ≠ rank: a LoRA saved without its metadata would reload with alpha = rank and a different scale.
    d["lora"] = {"rank": 4, "alpha": 16, "targets": "attention+ff"}
    d["train"].update(max_steps=8, learning_rate=5e-3)
    return train(FlowtrainConfig.model_validate(d), progress=False)


def _reference_images(pipeline_dir, lora_dir=None) -> np.ndarray:
    """Plain diffusers, written independently of flowtrain.sample."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, p in enumerate(PROMPTS):
        g = torch.Generator().manual_seed(7 + i)
        out.append(pipe(prompt=p, generator=g, output_type="np", **CALL).images[0])
    return np.stack(out)


def test_lora_file_reproduces_trained_model(lora_run, tiny_pipeline_dir):
    """The diffusers-loaded LoRA transformer computes exactly what the trained peft model computes."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    pipe.load_lora_weights(lora_run.output_dir)
    cfg = pipe.transformer.peft_config["default_0"]
    assert (cfg.r, cfg.lora_alpha) == (4, 16)
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 64, 16, generator=g), torch.randn(1, TINY_SEQ, 96, generator=g)
    from flowtrain.models import get_family

    family = get_family("flux2_klein")
    sigma = torch.tensor([0.4])
    lora_run.transformer.eval()
    with torch.no_grad():
        trained = family.predict(lora_run.transformer, x, sigma, {"text_embeds": txt}, (8, 8))
        loaded = family.predict(pipe.transformer, x, sigma, {"text_embeds": txt}, (8, 8))
        base_model = Flux2KleinPipeline.from_pretrained(tiny_pipeline_dir).transformer
        base = family.predict(base_model, x, sigma, {"text_embeds": txt}, (8, 8))
    assert (trained - loaded).abs().max().item() <= 1e-6
    assert (trained - base).abs().max().item() > 1e-3  # the LoRA learned something


def test_sample_with_lora_equals_plain_diffusers_and_differs_from_base(lora_run, tiny_pipeline_dir, tmp_path):
    from flowtrain.sample import generate, load_sampling_pipeline

    model = tiny_model(tiny_pipeline_dir, max_sequence_length=TINY_SEQ)
    pipe = load_sampling_pipeline(model, lora=str(lora_run.output_dir), device="cpu")
    ours = np.stack(
        [
            generate(
                pipe,
                [p],
                model,
                seed=7 + i,
                steps=4,
                guidance_scale=3.0,
                height=TINY_RES,
                width=TINY_RES,
                output_type="np",
            )[0]
            for i, p in enumerate(PROMPTS)
        ]
    )
    ref = _reference_images(tiny_pipeline_dir, lora_run.output_dir)
    base = _reference_images(tiny_pipeline_dir)
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.abs(ours - base).max() > 1e-3


def test_sample_cli_writes_pngs_and_grid(lora_run, tiny_pipeline_dir, tmp_path):
    from PIL import Image

    from flowtrain.cli import main

    out = tmp_path / "samples"
    rc = main(
        [
            "sample",
            "--model",
            str(tiny_pipeline_dir),
            "--lora",
            str(lora_run.output_dir),
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--out",
            str(out),
            "--steps",
            "3",
            "--height",
            str(TINY_RES),
            "--width",
            str(TINY_RES),
            "--num-images",
            "2",
        ]
    )
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["000_00.png", "000_01.png", "001_00.png", "001_01.png"]
    assert Image.open(out / "grid.png").size == (2 * TINY_RES, 2 * TINY_RES)
    # max_sequence_length was taken from the run's config.yaml (32), not the 512 default: same image as direct.
    a = np.asarray(Image.open(out / "000_00.png"))
    from flowtrain.sample import generate, load_sampling_pipeline

    model = tiny_model(tiny_pipeline_dir, max_sequence_length=TINY_SEQ)
    pipe = load_sampling_pipeline(model, lora=str(lora_run.output_dir), device="cpu")
    b = np.asarray(
        generate(
            pipe,
            [PROMPTS[0]],
            model,
            seed=0,
            steps=3,
            height=TINY_RES,
            width=TINY_RES,
            images_per_prompt=2,
        )[0]
    )
    assert np.array_equal(a, b)
