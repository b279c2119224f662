"""flowtrain's Qwen-Image path equals diffusers' `QwenImagePipeline` (the reference) in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtrain.models.qwen_image import latents as L
from flowtrain.models.qwen_image.tiny import TEMPLATE, TEMPLATE_DROP

RES = 32


def test_cached_text_equals_encode_prompt_at_the_true_length(fam, pipe, cached, prompts, options, record_property):
    rows = cached["prompt_embeds"]
    ref, ref_mask = pipe.encode_prompt(prompts, max_sequence_length=options.max_sequence_length)
    lengths = ref_mask.sum(1).tolist()
    assert [r.shape for r in rows] == [(n, 32) for n in lengths]  # each row its own length: no pad stored
    assert len(set(lengths)) == 3 and max(lengths) < options.max_sequence_length
    worst = max((r - ref[i, : lengths[i]]).abs().max().item() for i, r in enumerate(rows))
    record_property("max_abs_diff", worst)
    assert worst <= 1e-6
    # The pipeline pads with zeros; nothing past a row's length is lost.
    assert all(ref[i, n:].abs().max().item() == 0 for i, n in enumerate(lengths) if n < ref.shape[1])
    # Each prompt alone (no padding in the text encoder at all) gives the same row.
    alone_worst = 0.0
    for p, r in zip(prompts, rows, strict=True):
        alone, mask = pipe.encode_prompt([p], max_sequence_length=options.max_sequence_length)
        assert mask is None
        alone_worst = max(alone_worst, (alone[0] - r).abs().max().item())
    record_property("max_abs_diff_alone", alone_worst)
    assert alone_worst <= 1e-6


def test_template_drop_removes_exactly_the_template(pipe, cached, prompts):
    """The tiny tokenizer makes the pipeline's 34-token drop meaningful: the cached rows start at the prompt's first
    token and end with the template's suffix (`<|im_end|>\\n<|im_start|>assistant\\n`)."""
    tok = pipe.tokenizer
    assert pipe.prompt_template_encode == TEMPLATE and pipe.prompt_template_encode_start_idx == TEMPLATE_DROP
    for p, row in zip(prompts, cached["prompt_embeds"], strict=True):
        ids = tok(TEMPLATE.format(p)).input_ids
        assert tok.decode(ids[:TEMPLATE_DROP]) == TEMPLATE.split("{}")[0]
        assert tok.decode(ids[TEMPLATE_DROP:]) == p + "<|im_end|>\n<|im_start|>assistant\n"
        assert row.shape[0] == len(ids) - TEMPLATE_DROP


def test_max_sequence_length_cuts_rows_like_the_pipeline(fam, encoders, pipe, prompts, options):
    short = options.model_copy(update={"max_sequence_length": 12})
    rows = fam.encode_prompts(encoders, prompts, short)["prompt_embeds"]
    ref, mask = pipe.encode_prompt(prompts, max_sequence_length=12)
    assert [r.shape[0] for r in rows] == mask.sum(1).tolist() == [10, 12, 9]
    assert max((r - ref[i, : r.shape[0]]).abs().max().item() for i, r in enumerate(rows)) <= 1e-6


def test_empty_prompt_is_the_pipelines(cached, pipe, options):
    ref, _ = pipe.encode_prompt([""], max_sequence_length=options.max_sequence_length)
    assert cached["empty"].shape == ref[0].shape == (5, 32)  # <|im_end|> \n <|im_start|> assistant \n
    assert (cached["empty"] - ref[0]).abs().max().item() <= 1e-6


def test_pack_and_unpack_equal_the_pipeline_static_methods():
    from diffusers import QwenImagePipeline as P

    z = torch.randn(2, 16, 1, 6, 8)
    tokens = L.pack(z)
    assert torch.equal(tokens, P._pack_latents(z, 2, 16, 6, 8))
    assert torch.equal(L.unpack(tokens, 3, 4), P._unpack_latents(tokens, 6 * 8, 8 * 8, 8))
    assert torch.equal(L.unpack(tokens, 3, 4), z)


def test_training_latents_equal_the_pipeline_image_encoding(fam, pipe, cached, norm, make_batch, record_property):
    """Cached moments → x0 == the Qwen-Image img2img pipeline's own `_encode_vae_image` (VAE posterior draw,
    `latents_mean` / `latents_std` normalisation) + `_pack_latents`, with the same generator; the mode likewise."""
    from diffusers import QwenImageImg2ImgPipeline, QwenImagePipeline

    ref_pipe = QwenImageImg2ImgPipeline(**pipe.components)
    batch = make_batch(cached, [0, 1, 2])
    pixels = cached["pixels"].unsqueeze(2)  # (B, 3, 1, H, W), as the img2img pipeline feeds its VAE
    b, c, h, w = 3, 16, RES // 2, RES // 2

    ours, grid = fam.training_latents(batch, norm, torch.Generator().manual_seed(5))
    ref = ref_pipe._encode_vae_image(pixels, generator=torch.Generator().manual_seed(5))
    assert grid == (h // 2, w // 2) and ours.shape == (b, h // 2 * w // 2, 64)
    drawn = (ours - QwenImagePipeline._pack_latents(ref, b, c, h, w)).abs().max().item()
    record_property("max_abs_diff_sample", drawn)
    assert drawn <= 1e-5

    mode, _ = fam.training_latents(batch, norm, None)
    dist = pipe.vae.encode(pixels).latent_dist
    std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, c, 1, 1, 1)
    ref_mode = (dist.mode() - torch.tensor(pipe.vae.config.latents_mean).view(1, c, 1, 1, 1)) * std
    mode_diff = (mode - QwenImagePipeline._pack_latents(ref_mode, b, c, h, w)).abs().max().item()
    record_property("max_abs_diff_mode", mode_diff)
    assert mode_diff <= 1e-5
    assert (mode - ours).abs().max().item() > 1e-2  # the draw is a draw; the mean is the mean
    # The normalisation is not the identity in the tiny VAE, so leaving it out would fail above.
    assert (mode - L.pack(dist.mode())).abs().max().item() > 0.1


def test_the_pipeline_output_path_inverts_training_latents(fam, pipe, cached, norm, make_batch, record_property):
    """x0 → the pipeline's post-denoising steps (`_unpack_latents`, `latents / (1/std) + mean`) → the VAE mean."""
    batch = make_batch(cached, [0, 1])
    x0, _ = fam.training_latents(batch, norm, None)
    lat = pipe._unpack_latents(x0, RES, RES, pipe.vae_scale_factor)
    c = pipe.vae.config.z_dim
    std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, c, 1, 1, 1)
    lat = lat / std + torch.tensor(pipe.vae.config.latents_mean).view(1, c, 1, 1, 1)
    record_property("max_abs_diff", (lat - batch["latent_moments"][:, :c]).abs().max().item())
    assert (lat - batch["latent_moments"][:, :c]).abs().max().item() <= 1e-5


def test_step_loss_equals_a_reference_written_against_diffusers(
    fam, pipe, qwen_dir, cached, prompts, options, norm, make_batch, step, record_property
):
    """flowtrain's step (cache → training_latents → conditioning → predict) == diffusers' Qwen-Image LoRA training
    script's computation (examples/dreambooth/train_dreambooth_lora_qwen_image.py) on the raw prompts and pixels,
    for the same σ and noise."""
    from diffusers import QwenImagePipeline as P
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(qwen_dir, subfolder="transformer")
    batch = make_batch(cached, [0, 1, 2])
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.25, 0.6, 0.95])
    noise = torch.randn(3, 64, 64, generator=g)
    with torch.no_grad():
        ours, ours_pred = step(transformer, batch, norm, sigma, noise)
        ours = ours.mean()

        # Reference, line by line as the training script (with latents from the VAE mode, our default).
        prompt_embeds, prompt_embeds_mask = pipe.encode_prompt(prompts, max_sequence_length=options.max_sequence_length)
        vae = pipe.vae
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
        model_input = vae.encode(cached["pixels"].unsqueeze(2)).latent_dist.mode()
        model_input = (model_input - latents_mean) * latents_std
        vae_scale_factor = 2 ** len(vae.temperal_downsample)
        noise_5d = P._unpack_latents(noise, RES, RES, vae_scale_factor)  # the same ε, in the script's layout
        timesteps = sigma * 1000
        sigmas = sigma.view(-1, 1, 1, 1, 1)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise_5d
        latent_height, latent_width = model_input.shape[3], model_input.shape[4]
        img_shapes = [(1, latent_height // 2, latent_width // 2)] * 3
        noisy_model_input = noisy_model_input.permute(0, 2, 1, 3, 4)
        packed = P._pack_latents(noisy_model_input, 3, model_input.shape[1], latent_height, latent_width)
        model_pred = transformer(
            hidden_states=packed,
            encoder_hidden_states=prompt_embeds,
            encoder_hidden_states_mask=prompt_embeds_mask,
            timestep=timesteps / 1000,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        ref_pred = model_pred
        model_pred = P._unpack_latents(
            model_pred, latent_height * vae_scale_factor, latent_width * vae_scale_factor, vae_scale_factor
        )
        target = noise_5d - model_input
        ref = torch.mean(((model_pred.float() - target.float()) ** 2).reshape(3, -1), 1).mean()
    assert prompt_embeds_mask is not None  # prompts of different lengths: the padded reference batch has a mask
    record_property("abs_diff", abs(ours.item() - ref.item()))
    record_property("pred_abs_diff", (ours_pred - ref_pred).abs().max().item())
    assert abs(ours.item() - ref.item()) <= 1e-6
    assert (ours_pred - ref_pred).abs().max().item() <= 1e-6
    assert ours.item() > 0.1  # a real loss


def test_resolution_shift_is_the_samplers_shift(fam, options, pipe):
    """s from `resolution_shift` reproduces the pipeline's scheduler σ ladder at that token count (shift_terminal
    off: it stretches the inference ladder only), and is Qwen-Image's: the tiny scheduler has the real config."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from flowtrain.flow import shift_sigmas

    cfg = dict(pipe.scheduler.config)
    assert (cfg["base_shift"], cfg["max_shift"], cfg["max_image_seq_len"], cfg["shift_terminal"]) == (
        0.5,
        0.9,
        8192,
        0.02,
    )
    sched = FlowMatchEulerDiscreteScheduler.from_config({**cfg, "shift_terminal": None})
    for n in (64, 1024, 4096, 6889):
        s = fam.resolution_shift(options, n)
        ladder = np.linspace(1.0, 1 / 20, 20)
        mu = calculate_shift(n, 256, 8192, 0.5, 0.9)
        sched.set_timesteps(sigmas=ladder, mu=mu)
        assert torch.allclose(sched.sigmas[:-1].double(), shift_sigmas(torch.tensor(ladder), s), atol=1e-6)
    assert fam.resolution_shift(options, 4096) == pytest.approx(2.0009, abs=1e-4)  # 1024² px
    assert fam.resolution_shift(options, 1024) == pytest.approx(1.7138, abs=1e-4)  # 512² px
    assert fam.resolution_shift(options, 6889) == pytest.approx(2.3033, abs=1e-4)  # 1328² px, Qwen-Image native


def test_diffusers_training_script_trains_unshifted(qwen_dir):
    """What the reference trainer does: it loads the scheduler with shift=3.0, but with use_dynamic_shifting the
    scheduler never applies the static shift, so its training σ are the unshifted ladder 1.000, 0.999, … (the
    reason docs/models/qwen_image.md gives for flowtrain's own choice)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(qwen_dir, subfolder="scheduler", shift=3.0)
    assert sched.config.shift == 3.0 and sched.config.use_dynamic_shifting
    assert torch.allclose(sched.sigmas, torch.linspace(1.0, 0.001, 1000), atol=1e-6)


@pytest.mark.parametrize("size", [(64, 96), (70, 100), (100, 70), (20, 24)])
def test_preprocess_images_is_the_pipelines_image_processor(fam, encoders, pipe, size, record_property):
    """A non-square image of another size than the resolution (larger, not a whole multiple, portrait, smaller):
    the pixels precompute feeds the VAE are what QwenImagePipeline's own `VaeImageProcessor` makes of it in crop mode
    (scale to cover, its own rounding, centre-crop). A second resize of our own before it would differ at 70×100."""
    from PIL import Image

    h, w = size
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8))
    ours = fam.preprocess_images(encoders, [image], resolution=RES)
    ref = pipe.image_processor.preprocess(image, height=RES, width=RES, resize_mode="crop")
    assert ours.shape == ref.shape == (1, 3, RES, RES)
    diff = (ours - ref).abs().max().item()
    record_property("max_abs_diff", diff)
    assert diff <= 1e-5
