"""flowtrain's Klein path equals diffusers' `Flux2KleinPipeline` (the reference) in fp32."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flowtrain.data.cache import CacheDataset
from flowtrain.models import get_family
from flowtrain.models.common import resize_to_cover
from flowtrain.models.flux2_klein.latents import (
    latent_ids,
    pack,
    patchify,
    text_ids,
    training_latents,
    unpack,
    unpatchify,
)
from flowtrain.testing.data import TINY_RES, TINY_SEQ, tiny_model


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def cache_rows(tiny_cache):
    raw, cache = tiny_cache
    ds = CacheDataset(cache)
    table = pq.read_table(raw / "raw-00000.parquet")
    captions, images = table.column("caption").to_pylist(), table.column("image").to_pylist()
    return ds, captions, [Image.open(io.BytesIO(b)).convert("RGB") for b in images]


def test_text_embeddings_equal_pipeline_encode_prompt(pipe, cache_rows):
    ds, captions, _ = cache_rows
    ref, ref_ids = pipe.encode_prompt(captions, max_sequence_length=TINY_SEQ, text_encoder_out_layers=(9, 18, 27))
    cached = torch.stack([ds[i]["text_embeds"] for i in range(len(ds))])
    assert cached.shape == ref.shape == (len(captions), TINY_SEQ, 3 * 32)
    assert (cached - ref).abs().max().item() <= 1e-6
    assert torch.equal(text_ids(len(captions), TINY_SEQ), ref_ids)
    # Empty-prompt embedding (caption dropout / CFG's negative) is the pipeline's "" encoding.
    empty, _ = pipe.encode_prompt([""], max_sequence_length=TINY_SEQ)
    assert (ds.empty_batch()["text_embeds"] - empty).abs().max().item() <= 1e-6


def test_layers_other_than_default_are_honoured(pipe, cache_rows):
    _, captions, _ = cache_rows
    model = tiny_model("unused", text_encoder_layers=[3, 27])
    ours = get_family("flux2_klein").encode_prompts(pipe, captions[:2], model)["text_embeds"]
    ref, _ = pipe.encode_prompt(captions[:2], max_sequence_length=TINY_SEQ, text_encoder_out_layers=(3, 27))
    assert ours.shape[-1] == 64 and torch.equal(ours, ref)


def test_packed_latents_equal_pipeline_image_path(pipe, cache_rows):
    """Cache moments → flowtrain x0 == the pipeline's own `_encode_vae_image` + `_pack_latents`."""
    ds, _, images = cache_rows
    norm = ds.latent_norm
    moments = torch.stack([ds[i]["latent_moments"] for i in range(len(ds))])
    ours, h, w = training_latents(moments, norm["bn_mean"], norm["bn_std"])
    for i, im in enumerate(images):
        im = resize_to_cover(im, TINY_RES)  # our one step before the pipeline's processor (see its docstring)
        pixels = pipe.image_processor.preprocess(im, height=TINY_RES, width=TINY_RES, resize_mode="crop")
        ref = pipe._pack_latents(pipe._encode_vae_image(pixels, generator=None))
        assert (ours[i : i + 1] - ref).abs().max().item() <= 1e-5
    # ids match the pipeline's
    grid = torch.zeros(1, 4, h, w)
    assert torch.equal(latent_ids(1, h, w), pipe._prepare_latent_ids(grid))


def test_unpack_and_decode_invert_the_training_latents(pipe, cache_rows):
    ds, _, _ = cache_rows
    norm = ds.latent_norm
    stats = (norm["bn_mean"], norm["bn_std"])
    moments = torch.stack([ds[i]["latent_moments"] for i in range(2)])
    x0, h, w = training_latents(moments, *stats)
    # Inverse exactly as the pipeline does after denoising: unpack, de-normalise, unpatchify.
    z = unpack(x0, h, w) * stats[1].view(1, -1, 1, 1) + stats[0].view(1, -1, 1, 1)
    z = unpatchify(z)
    mean = moments.chunk(2, dim=1)[0]
    assert (z - mean).abs().max().item() <= 1e-5
    assert torch.equal(pipe._unpatchify_latents(patchify(mean)), mean)
    ids = pipe._prepare_latent_ids(torch.zeros(2, 1, h, w))
    assert torch.equal(pipe._unpack_latents_with_ids(pack(patchify(mean)), ids, h, w), patchify(mean))
    decoded = pipe.vae.decode(z).sample
    assert decoded.shape == (2, 3, TINY_RES, TINY_RES)
    torch.testing.assert_close(decoded, pipe.vae.decode(mean).sample, atol=1e-5, rtol=0)


def test_patchify_pack_equal_pipeline_static_methods():
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(patchify(x), pipe_cls()._patchify_latents(x))
    assert torch.equal(pack(patchify(x)), pipe_cls()._pack_latents(patchify(x)))
    assert torch.equal(unpatchify(patchify(x)), x)
    assert torch.equal(unpack(pack(x), 6, 8), x)


def pipe_cls():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def test_step_loss_equals_reference_against_diffusers_components(tiny_pipeline_dir, cache_rows):
    """flowtrain's micro-step loss == a computation written directly against diffusers for the same σ, ε."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    from flowtrain.config import FlowtrainConfig
    from flowtrain.losses import build_loss
    from flowtrain.train.step import make_inputs, step_loss

    ds, _, _ = cache_rows
    cfg = FlowtrainConfig.model_validate(
        {"model": {"pretrained": str(tiny_pipeline_dir), "max_sequence_length": TINY_SEQ, "dtype": "float32"}}
    )
    assert cfg.model.family == "flux2_klein"  # detected from the pipeline's model_index.json
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    batch = {k: torch.stack([ds[i][k] for i in range(3)]) for k in ("latent_moments", "text_embeds")}
    family = get_family("flux2_klein")
    inputs = make_inputs(batch, cfg, family, ds.latent_norm, None, torch.Generator().manual_seed(1), "cpu")
    with torch.no_grad():
        ours, _ = step_loss(transformer, family, inputs, build_loss("flow_matching"))

        # Reference: pipeline static methods + the raw transformer call of the pipeline's denoising loop.
        P = Flux2KleinPipeline
        mean = batch["latent_moments"][:, :4]
        lat = P._patchify_latents(mean)
        bn = pipe_vae_bn_std(tiny_pipeline_dir).view(1, -1, 1, 1)
        lat = (lat - pipe_vae_bn_mean(tiny_pipeline_dir).view(1, -1, 1, 1)) / bn
        ids = P._prepare_latent_ids(lat)
        x0 = P._pack_latents(lat)
        sigma, noise = inputs.sigma, inputs.noise
        x_t = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
        t = sigma * 1000  # the scheduler's timestep; the pipeline passes t / 1000
        pred = transformer(
            hidden_states=x_t,
            timestep=t / 1000,
            guidance=None,
            encoder_hidden_states=batch["text_embeds"],
            txt_ids=P._prepare_text_ids(batch["text_embeds"]),
            img_ids=ids,
            return_dict=False,
        )[0]
        ref = ((pred.float() - (noise - x0).float()) ** 2).mean()
    assert abs(ours.item() - ref.item()) <= 1e-6
    assert ours.item() > 0.1  # a real loss, not a degenerate zero


def test_precompute_scales_images_rather_than_cropping_a_corner(pipe):
    """A 64×96 image at resolution 32 keeps its whole content (scaled 2×), minus the long side's excess;
    the pipeline's crop-only processor alone would keep the central 32×32 pixels."""
    import numpy as np

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    ours = get_family("flux2_klein").preprocess_images(pipe, [big], resolution=TINY_RES)
    scaled = big.resize((48, 32), Image.Resampling.LANCZOS).crop((8, 0, 40, 32))
    expected = torch.from_numpy(np.asarray(scaled)).permute(2, 0, 1).float() / 127.5 - 1
    assert ours.shape == (1, 3, TINY_RES, TINY_RES)
    assert (ours[0] - expected).abs().max().item() < 1e-5
    small = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    assert resize_to_cover(small, TINY_RES).size == (38, 32)  # upscaled to cover, never padded with black


@pytest.mark.parametrize(("size", "scaled", "box"), [((64, 96), (48, 32), (8, 0, 40, 32)),
                                                     ((70, 100), (46, 32), (7, 0, 39, 32)),
                                                     ((100, 70), (32, 46), (0, 7, 32, 39))])  # fmt: skip
def test_preprocess_images_is_the_pipelines_processor_after_scaling_to_cover(pipe, size, scaled, box):
    """Klein's documented exception: `Flux2ImageProcessor` in crop mode only crops, so a non-square image of another
    size is first scaled to cover (Lanczos, long side rounded: 100×70 → 46×32), then the pipeline's own processor
    centre-crops it; the pixels equal that and the plain PIL computation."""
    import numpy as np

    h, w = size
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8))
    ours = get_family("flux2_klein").preprocess_images(pipe, [image], resolution=TINY_RES)
    scaled_image = resize_to_cover(image, TINY_RES)
    assert scaled_image.size == scaled
    ref = pipe.image_processor.preprocess(scaled_image, height=TINY_RES, width=TINY_RES, resize_mode="crop")
    crop = image.resize(scaled, Image.Resampling.LANCZOS).crop(box)
    by_hand = torch.from_numpy(np.asarray(crop)).permute(2, 0, 1).float() / 127.5 - 1
    assert ours.shape == ref.shape == (1, 3, TINY_RES, TINY_RES)
    assert (ours - ref).abs().max().item() <= 1e-5 and (ours[0] - by_hand).abs().max().item() <= 1e-5


def _vae(path):
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2.from_pretrained(path, subfolder="vae")


def pipe_vae_bn_mean(path) -> torch.Tensor:
    """The reference's normalisation statistics, read from the VAE itself (not from our cache manifest)."""
    return _vae(path).bn.running_mean


def pipe_vae_bn_std(path) -> torch.Tensor:
    vae = _vae(path)
    return torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)


def test_sampling_defaults_are_the_pipelines():
    """steps and guidance_scale (real CFG) default to `Flux2KleinPipeline.__call__`'s."""
    import inspect

    params = inspect.signature(pipe_cls().__call__).parameters
    assert dict(get_family("flux2_klein").sampling_defaults) == {
        "steps": params["num_inference_steps"].default,
        "guidance_scale": params["guidance_scale"].default,
    }
