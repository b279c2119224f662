"""flowtrain's FLUX.1 path equals diffusers' `FluxPipeline` (the reference) in fp32, on the tiny pipeline."""

from __future__ import annotations

import pytest
import torch

from flowtrain.models import get_family
from flowtrain.models.flux1 import latents as L

FAM = get_family("flux1")


@pytest.fixture(scope="module")
def pipe(flux1_dir):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(flux1_dir, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@torch.no_grad()  # as in the pipeline's __call__ (grad mode changes the last bits of T5's output)
def test_cached_conditioning_equals_pipeline_encode_prompt(pipe, cached_batch, encoders, opts, captions):
    embeds, pooled, text_ids = pipe.encode_prompt(captions, max_sequence_length=opts.max_sequence_length)
    assert cached_batch["prompt_embeds"].shape == embeds.shape == (3, opts.max_sequence_length, 32)
    assert cached_batch["pooled_prompt_embeds"].shape == pooled.shape == (3, 32)
    assert (cached_batch["prompt_embeds"] - embeds).abs().max().item() <= 1e-6
    assert (cached_batch["pooled_prompt_embeds"] - pooled).abs().max().item() <= 1e-6
    assert torch.equal(L.text_ids(opts.max_sequence_length), text_ids)
    # The "" prompt (caption dropout's replacement) is the pipeline's "" encoding for both encoders.
    e_embeds, e_pooled, _ = pipe.encode_prompt([""], max_sequence_length=opts.max_sequence_length)
    empty = FAM.conditioning(FAM.encode_prompts(encoders, [""], opts), opts)
    assert (empty["prompt_embeds"] - e_embeds).abs().max().item() <= 1e-6
    assert (empty["pooled_prompt_embeds"] - e_pooled).abs().max().item() <= 1e-6


def _pipeline_pixels(pipe, images):
    """The img2img pipeline's own preprocessing (default resize: equal to crop mode for square images)."""
    res = FAM.tiny_resolution
    return pipe.image_processor.preprocess(images, height=res, width=res)


def test_training_latents_equal_pipeline_image_encoding(pipe, cached_batch, encoders, images):
    """Cached moments → x0 == `FluxImg2ImgPipeline._encode_vae_image` (+ `_pack_latents`), sampled with the same
    generator, and == the posterior mode normalised the same way."""
    from diffusers import FluxImg2ImgPipeline
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

    norm = {k: torch.tensor(v) for k, v in FAM.latent_norm(encoders).items()}
    assert (norm["shift_factor"].item(), norm["scaling_factor"].item()) == pytest.approx((0.1159, 0.3611))
    i2i = FluxImg2ImgPipeline(**pipe.components)
    pixels = _pipeline_pixels(pipe, images)
    with torch.no_grad():
        sampled = i2i._encode_vae_image(pixels, generator=torch.Generator().manual_seed(3))
        mode = retrieve_latents(pipe.vae.encode(pixels), sample_mode="argmax")
    b, c, h, w = sampled.shape
    ref_sample = pipe._pack_latents(sampled, b, c, h, w)
    sf, sc = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    ref_mode = pipe._pack_latents((mode - sf) * sc, b, c, h, w)

    ours_sample, grid = FAM.training_latents(cached_batch, norm, torch.Generator().manual_seed(3))
    ours_mode, grid_mode = FAM.training_latents(cached_batch, norm, None)
    assert ours_mode.shape == (3, 64, 64) and grid == grid_mode == (h // 2, w // 2) == (8, 8)
    assert (ours_sample - ref_sample).abs().max().item() <= 1e-5
    assert (ours_mode - ref_mode).abs().max().item() <= 1e-5
    assert (ours_sample - ours_mode).abs().max().item() > 1e-3  # the draw really is a draw
    # ids equal the pipeline's
    assert torch.equal(L.image_ids(*grid), pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32))


def test_pack_unpack_equal_pipeline_static_methods(pipe):
    x = torch.randn(2, 16, 6, 8)
    assert torch.equal(L.pack(x), pipe._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(L.unpack(L.pack(x), 3, 4), x)
    # the pipeline's unpack takes pixel sizes: 6×8 latents at VAE factor 2 are 12×16 px
    assert torch.equal(pipe._unpack_latents(L.pack(x), 12, 16, pipe.vae_scale_factor), x)
    assert torch.allclose(L.denormalize(L.normalize(x, 0.1159, 0.3611), 0.1159, 0.3611), x, atol=1e-6)


def test_step_loss_equals_reference_against_diffusers_components(flux1_dir, pipe, cached_batch, opts, images, captions):
    """flowtrain's training step (config → `make_inputs` → `step_loss`) == the step written directly against
    diffusers, as examples/dreambooth/train_dreambooth_lora_flux.py does it, for the same σ, ε and the configured
    `model.guidance`: the guidance value reaches the transformer, and another value gives another loss."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from flowtrain.config import FlowtrainConfig
    from flowtrain.losses import loss_from_config
    from flowtrain.testing.data import tiny_config_dict
    from flowtrain.train.step import make_inputs, step_loss

    transformer = FluxTransformer2DModel.from_pretrained(flux1_dir, subfolder="transformer")
    norm = {k: torch.tensor(v) for k, v in FAM.latent_norm(pipe).items()}
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(captions, max_sequence_length=opts.max_sequence_length)
        z = pipe.vae.encode(_pipeline_pixels(pipe, images)).latent_dist.mode()
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    b, c, h, w = z.shape
    f = pipe.vae_scale_factor
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    losses = {}
    for guidance in (3.5, 1.0):
        d = tiny_config_dict(flux1_dir, flux1_dir / "no-cache", flux1_dir / "no-run", family="flux1")
        d["model"]["guidance"] = guidance
        d["timesteps"] = {"scheme": "uniform", "shift_mode": "resolution"}
        d["dataset"]["latent_sampling"], d["train"]["caption_dropout"] = "mode", 0.0  # x0 the posterior mode
        cfg = FlowtrainConfig.model_validate(d)
        inputs = make_inputs(cached_batch, cfg, FAM, norm, None, torch.Generator().manual_seed(1), torch.device("cpu"))
        with torch.no_grad():
            ours, _ = step_loss(transformer, FAM, inputs, loss_from_config(cfg, family=FAM))

            # Reference: diffusers components and static methods only, with the step's σ and ε.
            sigma = inputs.sigma
            ref_noise = pipe._unpack_latents(inputs.noise, h * f, w * f, f)  # the script draws ε unpacked
            s = sigma.view(-1, 1, 1, 1)
            noisy = (1.0 - s) * z + s * ref_noise
            timesteps = sigma * 1000  # the scheduler's t; the training script passes t / 1000
            ref_pred = transformer(
                hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
                timestep=timesteps / 1000,
                guidance=torch.tensor([guidance]).expand(b),  # the script's --guidance_scale, for guidance_embeds
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            ref_pred = pipe._unpack_latents(ref_pred, h * f, w * f, f)
            ref = ((ref_pred.float() - (ref_noise - z).float()) ** 2).mean()
        assert abs(ours.item() - ref.item()) <= 1e-6, guidance
        assert ours.item() > 0.1  # a real loss
        losses[guidance] = ours.item()
    assert abs(losses[3.5] - losses[1.0]) > 1e-4, losses  # the configured value is the one the model sees


def test_resolution_shift_equals_the_pipeline_schedule(pipe, opts):
    """The fixed shift s at N tokens reproduces the scheduler's dynamically shifted σ for that N."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from flowtrain.flow import shift_sigmas

    for n in (64, 1024, 4096):
        s = FAM.resolution_shift(opts, n)
        sched = pipe.scheduler
        mu = calculate_shift(n, 256, 4096, 0.5, 1.15)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
        base = torch.linspace(1.0, 1 / 8, 8)
        torch.testing.assert_close(shift_sigmas(base, s), sched.sigmas[:-1].float(), atol=1e-6, rtol=0)
    assert FAM.resolution_shift(opts, 4096) == pytest.approx(3.1582, abs=1e-4)  # e^1.15 at 1024² px
    assert FAM.resolution_shift(opts, 1024) == pytest.approx(1.8776, abs=1e-4)  # 512² px


def test_pixel_multiple_and_resolution_check(opts, encoders):
    assert FAM.pixel_multiple(opts) == 4  # tiny VAE: 2× down, × 2×2 packing (16 for FLUX.1-dev)
    with pytest.raises(ValueError, match="multiple of 4"):
        FAM.cache_columns(encoders, opts, resolution=30)


@pytest.mark.parametrize("size", [(64, 96), (70, 100), (100, 70), (20, 24)])
def test_preprocess_images_is_the_pipelines_image_processor(pipe, encoders, size):
    """A non-square image of another size than the resolution: the pixels precompute feeds the VAE are what
    FluxPipeline's own `VaeImageProcessor` makes of it in crop mode (scale to cover, centre-crop)."""
    import numpy as np
    from PIL import Image

    h, w = size
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8))
    res = FAM.tiny_resolution
    ours = FAM.preprocess_images(encoders, [image], resolution=res)
    ref = pipe.image_processor.preprocess(image, height=res, width=res, resize_mode="crop")
    assert ours.shape == ref.shape == (1, 3, res, res)
    assert (ours - ref).abs().max().item() <= 1e-5
