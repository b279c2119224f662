"""A LoRA trained through the family's training path loads into a fresh `FluxPipeline` with `load_lora_weights` and
samples the same image as flowtrain's sampling from cached conditioning; a different one from the base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowtrain.flow import interpolate, velocity_target
from flowtrain.models import get_family

FAM = get_family("flux1")
PROMPTS = ["a photo of a dog", "a photo of a cat on a red sofa"]
CALL = dict(height=32, width=32, num_inference_steps=4, guidance_scale=3.5)


@pytest.fixture(scope="module")
def trained(opts, encoders, cached_batch, tmp_path_factory):
    """A few AdamW steps of a peft LoRA (alpha ≠ rank, so missing metadata would show) on the tiny cache."""
    from peft import LoraConfig

    transformer = FAM.load_transformer(opts, dtype=torch.float32)
    transformer.requires_grad_(False)
    regex = "|".join(f"(?:.*\\.)?(?:{p})" for p in FAM.lora_presets["attention+ff"])  # as lora.targets joins them
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=regex)
    transformer.add_adapter(cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    norm = {k: torch.tensor(v) for k, v in FAM.latent_norm(encoders).items()}
    g = torch.Generator().manual_seed(0)
    transformer.train()
    for _ in range(5):
        x0, grid = FAM.training_latents(cached_batch, norm, g)
        sigma, noise = torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g)
        x_t, cond = interpolate(x0, noise, sigma), FAM.conditioning(cached_batch, opts)
        pred = FAM.predict(transformer, x_t, sigma, cond, grid)
        loss = F.mse_loss(pred, velocity_target(x0, noise))
        opt.zero_grad()
        loss.backward()
        opt.step()
    transformer.eval()
    out = tmp_path_factory.mktemp("flux1_lora")
    path = FAM.save_lora(out, transformer, cfg)
    assert path.exists() and path.name == "pytorch_lora_weights.safetensors"
    return transformer, out


def _fresh(flux1_dir, lora=None):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux1_dir, dtype=torch.float32)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, opts):
    """Plain diffusers: `pipe(prompt=...)`, one generator per prompt."""
    return np.stack(
        [
            pipe(
                prompt=p,
                generator=torch.Generator().manual_seed(7 + i),
                max_sequence_length=opts.max_sequence_length,
                output_type="np",
                **CALL,
            ).images[0]
            for i, p in enumerate(PROMPTS)
        ]
    )


def test_loaded_lora_equals_trained_model(trained, flux1_dir, opts, cached_batch, encoders):
    transformer, out = trained
    fresh = _fresh(flux1_dir, out)
    peft_cfg = fresh.transformer.peft_config["default_0"]
    assert (peft_cfg.r, peft_cfg.lora_alpha) == (4, 8)  # the metadata came through
    norm = {k: torch.tensor(v) for k, v in FAM.latent_norm(encoders).items()}
    x0, grid = FAM.training_latents(cached_batch, norm, None)
    sigma, cond = torch.tensor([0.2, 0.5, 0.8]), FAM.conditioning(cached_batch, opts)
    with torch.no_grad():
        ours = FAM.predict(transformer, x0, sigma, cond, grid)
        loaded = FAM.predict(fresh.transformer, x0, sigma, cond, grid)
        base = FAM.predict(_fresh(flux1_dir).transformer, x0, sigma, cond, grid)
    assert (ours - loaded).abs().max().item() <= 1e-6
    assert (ours - base).abs().max().item() > 1e-3  # the LoRA learned something


def test_sample_equals_fresh_pipeline_with_lora_and_differs_from_base(trained, flux1_dir, opts, encoders):
    transformer, out = trained
    ours = []
    for i, p in enumerate(PROMPTS):
        cond = FAM.encode_prompts(encoders, [p], opts)  # what the cache holds for the validation prompt
        image = FAM.sample(
            encoders, transformer, cond, None, height=32, width=32, steps=4, guidance_scale=3.5,
            generator=torch.Generator().manual_seed(7 + i), output_type="np",
        )  # fmt: skip
        ours.append(image)
    ours = np.stack(ours)
    ref = _reference(_fresh(flux1_dir, out), opts)
    base = _reference(_fresh(flux1_dir), opts)
    assert ours.shape == (2, 32, 32, 3)
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.abs(ours - base).max() > 1e-3
    # The default output is a PIL image, as validation writes it.
    pil = FAM.sample(encoders, transformer, FAM.encode_prompts(encoders, [PROMPTS[0]], opts), None, height=32,
                     width=32, steps=4, guidance_scale=3.5, generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert pil.size == (32, 32)


def test_sampling_pipeline_and_generate_equal_fresh_pipeline(trained, flux1_dir, opts):
    """`flowtrain sample`'s path (sampling_pipeline + generate, one batched call) == plain diffusers per prompt."""
    _, out = trained
    pipe = FAM.sampling_pipeline(opts, dtype=torch.float32, device="cpu", lora=str(out))
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
    images = FAM.generate(
        pipe, PROMPTS, opts, generators=gens, height=32, width=32, steps=4, guidance_scale=3.5, output_type="np"
    )
    ours = np.stack(images)
    ref = _reference(_fresh(flux1_dir, out), opts)
    assert np.abs(ours - ref).max() <= 1e-5
