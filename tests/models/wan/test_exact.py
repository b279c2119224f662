"""flowtrain's Wan path equals diffusers' `WanPipeline` (the reference) in fp32: text, video latents, the training
step, the shift, and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtrain.models.wan import latents as L

RES, FRAMES = 32, 9


def test_cached_text_is_encode_prompt_cut_to_the_true_length(fam, pipe, cached, prompts, options, record_property):
    n = options.max_sequence_length
    ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=n)
    lengths = pipe.tokenizer(prompts, padding="max_length", max_length=n, truncation=True).attention_mask
    lengths = [sum(m) for m in lengths]
    rows = cached["prompt_embeds"]
    assert [tuple(r.shape) for r in rows] == [(k, 32) for k in lengths]  # each row its own length: no pad stored
    assert len(set(lengths)) == 3 and max(lengths) < n
    assert all(ref[i, k:].abs().max().item() == 0 for i, k in enumerate(lengths))  # the pipeline pads with zeros
    worst = max((r - ref[i, : len(r)]).abs().max().item() for i, r in enumerate(rows))
    record_property("max_abs_diff", worst)
    assert worst <= 1e-6
    # The pipeline's own (padded) last_hidden_state is nonzero past the true length: trimming is not a no-op.
    ids = pipe.tokenizer(prompts[2:], padding="max_length", max_length=n, return_tensors="pt")
    raw = pipe.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state
    assert raw[0, lengths[2] :].abs().max().item() > 1e-3


def test_training_text_is_the_pipelines_padded_embedding(fam, pipe, cached, prompts, options, make_batch):
    """The batch (rows padded to the batch's longest + mask) → `conditioning` → (B, max_sequence_length, D), equal
    to the pipeline's `prompt_embeds` for the raw prompts: what the transformer sees when sampling."""
    n = options.max_sequence_length
    ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=n)
    cond = fam.conditioning(make_batch(cached, [0, 1, 2]), options)
    assert list(cond) == ["encoder_hidden_states"] and cond["encoder_hidden_states"].shape == (3, n, 32)
    assert (cond["encoder_hidden_states"] - ref).abs().max().item() <= 1e-6
    empty, _ = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=n)
    assert cached["empty"].shape == (1, 32)  # "" is just </s>
    assert (L.pad_text(cached["empty"][None], None, n) - empty).abs().max().item() <= 1e-6


def test_prompt_cleaning_is_the_pipelines(fam, encoders, pipe, options):
    """`prompt_clean` (HTML unescape, whitespace) runs before the lengths are counted, as in the pipeline."""
    messy = ["  a   handwritten\n digit &amp; seven  "]
    row = fam.encode_prompts(encoders, messy, options)["prompt_embeds"][0]
    ref, _ = pipe.encode_prompt(messy, do_classifier_free_guidance=False, max_sequence_length=32)
    clean = len(pipe.tokenizer("a handwritten digit & seven").input_ids)
    assert row.shape[0] == clean and (row - ref[0, :clean]).abs().max().item() <= 1e-6


def test_video_latents_are_5d_with_the_vaes_compression(fam, encoders, cached, videos):
    moments = cached["latent_moments"]
    assert moments.shape == (3, 32, (FRAMES - 1) // 4 + 1, RES // 8, RES // 8) and moments.dtype == torch.float32
    image = fam.encode_pixels(encoders, videos[:, :, 0])  # (B, 3, H, W): an image is a one-frame video
    assert image["latent_moments"].shape == (3, 32, 1, 4, 4)
    # The VAE is causal in time: the first latent frame depends on the first pixel frame only.
    assert (image["latent_moments"][:, :, 0] - moments[:, :, 0]).abs().max().item() <= 1e-5


def test_training_latents_equal_the_video2video_pipelines_encoding(
    fam, pipe, cached, videos, norm, make_batch, record_property
):
    """x0 (mode) == WanVideoToVideoPipeline.prepare_latents' encoding (VAE mode per clip, `(z - mean) * (1 / std)`),
    and x_σ from flowtrain's interpolation == the noisy latent it builds with the pipeline's scheduler `add_noise`
    at one of its timesteps, from the same generator."""
    from diffusers import UniPCMultistepScheduler, WanVideoToVideoPipeline

    from flowtrain.flow import interpolate

    sched = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    t, sigma = sched.timesteps[1], float(sched.sigmas[1])
    parts = {k: pipe.components[k] for k in ("tokenizer", "text_encoder", "vae", "transformer")}
    v2v = WanVideoToVideoPipeline(**parts, scheduler=sched)
    ref = v2v.prepare_latents(
        videos, 3, 16, RES, RES, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3),
        timestep=t.repeat(3),
    )  # fmt: skip
    batch = make_batch(cached, [0, 1, 2])
    x0, grid = fam.training_latents(batch, norm, None)
    assert grid == (3, 4, 4) and x0.shape == (3, 48, 16)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    ours = L.from_tokens(interpolate(x0, L.to_tokens(noise)[0], torch.full((3,), sigma)), grid)
    diff = (ours - ref).abs().max().item()
    record_property("max_abs_diff", diff)
    assert diff <= 1e-5
    # Normalisation matters in the tiny VAE: leaving it out would fail above.
    assert (x0 - L.to_tokens(batch["latent_moments"][:, :16])[0]).abs().max().item() > 0.1


def test_a_posterior_draw_is_diffusers_draw(fam, pipe, cached, videos, norm, make_batch, record_property):
    from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_latents

    batch = make_batch(cached, [0, 1, 2])
    ours, _ = fam.training_latents(batch, norm, torch.Generator().manual_seed(5))
    z = retrieve_latents(pipe.vae.encode(videos), torch.Generator().manual_seed(5), sample_mode="sample")
    ref = L.to_tokens(L.normalize(z, norm["latents_mean"], norm["latents_std"]))[0]
    record_property("max_abs_diff", (ours - ref).abs().max().item())
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - fam.training_latents(batch, norm, None)[0]).abs().max().item() > 1e-2


def test_the_pipelines_output_path_inverts_training_latents(fam, pipe, cached, norm, make_batch):
    """x0 → `WanPipeline.__call__`'s post-denoising step (`latents / (1 / std) + mean`) → the cached VAE mean."""
    batch = make_batch(cached, [0, 1])
    x0, grid = fam.training_latents(batch, norm, None)
    c = pipe.vae.config.z_dim
    std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, c, 1, 1, 1)
    lat = L.from_tokens(x0, grid) / std + torch.tensor(pipe.vae.config.latents_mean).view(1, c, 1, 1, 1)
    assert (lat - batch["latent_moments"][:, :c]).abs().max().item() <= 1e-5


def test_step_loss_equals_a_reference_written_against_diffusers(
    fam, pipe, wan_dir, cached, videos, prompts, options, norm, make_batch, step, record_property
):
    """flowtrain's step (cache → training_latents → conditioning → predict) == the Wan objective written out on the
    raw prompts and pixels with diffusers' components: x_σ = (1-σ)·x0 + σ·ε, target ε - x0, the transformer called
    as the pipeline calls it (5-D latents, t = 1000·σ, the padded prompt embeddings)."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer")
    batch = make_batch(cached, [0, 1, 2])
    sigma = torch.tensor([0.25, 0.6, 0.95])
    noise_5d = torch.randn(3, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ours_pred = step(transformer, batch, norm, sigma, L.to_tokens(noise_5d)[0])
        ours = ours.mean()

        prompt_embeds, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=options.max_sequence_length
        )
        vae = pipe.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
        x0 = (vae.encode(videos).latent_dist.mode() - mean) * inv_std
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise_5d
        ref_pred = transformer(
            hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds, return_dict=False
        )[0]
        ref = ((ref_pred - (noise_5d - x0)) ** 2).reshape(3, -1).mean(1).mean()
    record_property("abs_diff", abs(ours.item() - ref.item()))
    pred_diff = (L.from_tokens(ours_pred, (3, 4, 4)) - ref_pred).abs().max().item()
    record_property("pred_abs_diff", pred_diff)
    assert abs(ours.item() - ref.item()) <= 1e-6 and pred_diff <= 1e-6
    assert ours.item() > 0.1  # a real loss
    # The timestep scale matters: the transformer's output changes if σ were passed unscaled.
    with torch.no_grad():
        wrong = transformer(hidden_states=noisy, timestep=sigma, encoder_hidden_states=prompt_embeds)[0]
    assert (wrong - ref_pred).abs().max().item() > 1e-3


def test_the_shift_is_the_schedulers_flow_shift(fam, options, pipe):
    """Wan's shift is static: `flow_shift` of the scheduler config (3.0 in the real and the tiny pipeline), and
    shifting a ladder by it reproduces the pipeline scheduler's σ."""
    from flowtrain.flow import shift_sigmas

    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler.config.use_flow_sigmas
    assert fam.resolution_shift(options, 48) == fam.resolution_shift(options, 99_000) == 3.0
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    ladder = torch.tensor(np.linspace(1, 1 / 1000, 11)[:-1])
    ours = shift_sigmas(ladder, 3.0)
    assert torch.allclose(sched.sigmas[1:-1].double(), ours[1:], atol=1e-6)  # [0] is nudged below 1 by 1e-6
    assert torch.equal(sched.timesteps, (sched.sigmas[:-1].double() * 1000).to(torch.int64))  # t = 1000·σ


def test_sample_from_the_cache_equals_the_pipeline_called_with_the_prompt(
    fam, encoders, pipe, cached, prompts, options, make_batch, record_property
):
    """`sample` (cached conditioning, real CFG against the cached empty prompt) == `WanPipeline(prompt=...,
    negative_prompt="")`, frame for frame; and `generate` is the same call."""
    transformer = pipe.transformer
    negative = fam.conditioning(make_batch({**cached, "prompt_embeds": [cached["empty"]]}, [0]), options)
    cond = fam.conditioning(make_batch(cached, [0]), options)
    kw = {"height": RES, "width": RES, "steps": 3, "guidance_scale": 4.0, "output_type": "np"}
    ours = fam.sample(encoders, transformer, cond, negative, generator=torch.Generator().manual_seed(7), **kw)
    ref = pipe(
        prompt=prompts[0], negative_prompt="", height=RES, width=RES, num_frames=FRAMES, num_inference_steps=3,
        guidance_scale=4.0, generator=torch.Generator().manual_seed(7), output_type="np",
        max_sequence_length=options.max_sequence_length,
    ).frames[0]  # fmt: skip
    assert ours.shape == ref.shape == (FRAMES, RES, RES, 3)
    record_property("max_abs_diff", float(np.abs(ours - ref).max()))
    assert np.abs(ours - ref).max() <= 1e-5
    gen = fam.generate(pipe, prompts[:1], options, generators=[torch.Generator().manual_seed(7)], **kw)[0]
    assert np.abs(gen - ref).max() <= 1e-5
    assert encoders.transformer is None  # `sample` lent the transformer for the call only


def test_preprocess_images_is_the_pipelines_video_processor(fam, encoders, pipe):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 100, 3), dtype=np.uint8))
    ours = fam.preprocess_images(encoders, [image], resolution=RES)
    ref = pipe.video_processor.preprocess(image, height=RES, width=RES, resize_mode="crop")
    assert ours.shape == (1, 3, RES, RES) and torch.equal(ours, ref)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        fam.preprocess_images(encoders, [image], resolution=40)


def test_frame_counts_must_be_4k_plus_1(wan_dir):
    from pydantic import ValidationError

    from flowtrain.testing.data import tiny_model

    with pytest.raises(ValidationError, match=r"model.num_frames=8 is not 4k\+1.*use 5 or 9"):
        tiny_model(wan_dir, "wan", num_frames=8)
    assert tiny_model(wan_dir, "wan", num_frames=1).num_frames == 1
