"""A LoRA trained through the family loads into a fresh `WanPipeline` with `load_lora_weights` and gives the video
flowtrain samples; a full fine-tune round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

RES, STEPS, CFG, FRAMES = 32, 3, 3.0, 9


def _lora_regex(presets, name: str) -> str:
    """The preset as one full-match regex, each entry also matching as a name suffix (the generic LoRA setup's)."""
    return "|".join(f"(?:.*\\.)?(?:{p})" for p in presets[name])


@pytest.fixture(scope="module")
def trained(fam, options, cached, norm, make_batch, step, tmp_path_factory):
    """A few Adam steps of peft LoRA (alpha ≠ rank) on video batches through training_latents / conditioning /
    predict, saved with `save_lora`. Returns (transformer, lora_dir)."""
    from peft import LoraConfig

    transformer = fam.load_transformer(options, dtype=torch.float32)
    transformer.requires_grad_(False)
    cfg = LoraConfig(
        r=4, lora_alpha=16, target_modules=_lora_regex(fam.lora_presets, "attention+ff"), init_lora_weights="gaussian"
    )
    transformer.add_adapter(cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = make_batch(cached, [0, 1, 2])
    for _ in range(4):
        sigma, noise = torch.rand(3, generator=g), torch.randn(3, 48, 16, generator=g)
        loss = step(transformer, batch, norm, sigma, noise)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    transformer.eval()
    out = tmp_path_factory.mktemp("lora")
    path = fam.save_lora(out, transformer, cfg)
    assert path.exists() and path.name == "pytorch_lora_weights.safetensors"
    return transformer, out


def _fresh(wan_dir, lora=None):
    from diffusers import WanPipeline

    p = WanPipeline.from_pretrained(wan_dir, dtype=torch.float32)
    if lora is not None:
        p.load_lora_weights(lora)
    p.set_progress_bar_config(disable=True)
    return p


def _diffusers_video(p, prompt, seed, options):
    return p(
        prompt=prompt, negative_prompt="", guidance_scale=CFG, height=RES, width=RES, num_frames=FRAMES,
        num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
        max_sequence_length=options.max_sequence_length, output_type="np",
    ).frames[0]  # fmt: skip


def test_lora_loads_into_a_fresh_pipeline_and_gives_flowtrains_video(
    fam, encoders, options, cached, prompts, make_batch, trained, wan_dir, record_property
):
    transformer, lora_dir = trained
    fresh = _fresh(wan_dir, lora_dir)
    cfg = fresh.transformer.peft_config["default_0"]
    assert (cfg.r, cfg.lora_alpha) == (4, 16)  # the metadata travelled: alpha is not reset to the rank
    base = _fresh(wan_dir)
    negative = fam.conditioning(make_batch({**cached, "prompt_embeds": [cached["empty"]]}, [0]), options)
    for i, prompt in enumerate(prompts[:2]):
        cond = fam.conditioning(make_batch(cached, [i]), options)
        ours = fam.sample(
            encoders, transformer, cond, negative, height=RES, width=RES, steps=STEPS, guidance_scale=CFG,
            generator=torch.Generator().manual_seed(7 + i), output_type="np",
        )  # fmt: skip
        ref = _diffusers_video(fresh, prompt, 7 + i, options)
        from_base = float(np.abs(ours - _diffusers_video(base, prompt, 7 + i, options)).max())
        record_property(f"video_diff_{i}", float(np.abs(ours - ref).max()))
        record_property(f"diff_from_base_{i}", from_base)
        assert ours.shape == (FRAMES, RES, RES, 3)
        assert np.abs(ours - ref).max() <= 1e-5
        assert from_base > 1e-3


def test_sampling_pipeline_and_generate_equal_plain_diffusers(fam, options, prompts, trained, wan_dir,
                                                              record_property):  # fmt: skip
    _, lora_dir = trained
    ours_pipe = fam.sampling_pipeline(options, dtype=torch.float32, device="cpu", lora=str(lora_dir))
    gens = [torch.Generator().manual_seed(11 + i) for i in range(2)]
    ours = fam.generate(
        ours_pipe, prompts[:2], options, generators=gens, height=RES, width=RES, steps=STEPS, guidance_scale=CFG,
        output_type="np",
    )  # fmt: skip
    fresh = _fresh(wan_dir, lora_dir)
    for i, p in enumerate(prompts[:2]):
        diff = float(np.abs(ours[i] - _diffusers_video(fresh, p, 11 + i, options)).max())
        record_property(f"video_diff_{i}", diff)
        assert diff <= 1e-5


def test_full_weights_round_trip(fam, options, tmp_path):
    """save_full writes a diffusers transformer folder; sampling_pipeline(transformer=...) loads it."""
    transformer = fam.load_transformer(options, dtype=torch.float32)
    with torch.no_grad():
        transformer.proj_out.bias.add_(0.5)
    folder = fam.save_full(tmp_path, transformer)
    p = fam.sampling_pipeline(options, dtype=torch.float32, device="cpu", transformer=str(tmp_path))
    assert folder.name == "transformer"
    assert torch.equal(p.transformer.proj_out.bias, transformer.proj_out.bias)
