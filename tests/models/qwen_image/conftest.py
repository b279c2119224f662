"""One tiny Qwen-Image pipeline folder for this folder's tests, built offline once; batches collated by the generic
cache reader's `Collate` (fixtures, because test modules cannot import a conftest under --import-mode=importlib)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Three prompts of different lengths (10, 20 and 9 tokens after the template is dropped).
PROMPTS = [
    "a photo of a dog",
    "a red square on a white background, a blue circle and a green triangle",
    "the quick brown fox",
]
RES = 32  # the family's tiny_resolution


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    from flowtrain.models.qwen_image.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("qwen") / "pipeline")


@pytest.fixture(scope="session")
def fam():
    from flowtrain.models import get_family

    return get_family("qwen_image")


@pytest.fixture(scope="session")
def options(qwen_dir):
    """The validated `model:` section for the tiny pipeline: fp32, the family's tiny_options."""
    from flowtrain.testing.data import tiny_model

    return tiny_model(qwen_dir, "qwen_image")


@pytest.fixture(scope="session")
def pipe(qwen_dir):
    """The reference: diffusers' pipeline, loaded on its own (never modified by a test)."""
    from diffusers import QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(qwen_dir, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def encoders(fam, options):
    return fam.load_encoders(options, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def images():
    """Random RGB images of different sizes and aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 48), (32, 32), (56, 36)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="session")
def cached(fam, encoders, options, images):
    """What precompute stores per row: {"prompt_embeds": [(L_i, D)], "latent_moments": (B, 32, 1, h, w)}, and the
    empty prompt's row."""
    text = fam.encode_prompts(encoders, PROMPTS, options)
    pixels = fam.preprocess_images(encoders, images, resolution=RES)
    moments = fam.encode_pixels(encoders, pixels)
    empty = fam.encode_prompts(encoders, [""], options)
    return {**text, **moments, "pixels": pixels, "empty": empty["prompt_embeds"][0]}


@pytest.fixture(scope="session")
def prompts():
    return PROMPTS


@pytest.fixture(scope="session")
def make_batch():
    return _make_batch


@pytest.fixture(scope="session")
def norm(fam, encoders):
    return {k: torch.tensor(v) for k, v in fam.latent_norm(encoders).items()}


@pytest.fixture(scope="session")
def per_sample_loss(fam, options):
    return lambda *a: _step(fam, options, *a)[0]


@pytest.fixture(scope="session")
def step(fam, options):
    """(per-sample loss (B,), velocity prediction (B, N, 64))."""
    return lambda *a: _step(fam, options, *a)


def _make_batch(cached: dict, rows: list[int]) -> dict[str, torch.Tensor]:
    """Rows of the cache collated as the cache reader collates them: fixed columns stacked, the variable-length text
    column padded to the batch's longest row with a bool `prompt_embeds_mask`."""
    from flowtrain.data.cache import Collate

    return Collate(variable=("prompt_embeds",))(
        [{"latent_moments": cached["latent_moments"][i], "prompt_embeds": cached["prompt_embeds"][i]} for i in rows]
    )


def _step(fam, options, transformer, batch, norm, sigma, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """flowtrain's training step: latents → interpolate → predict → per-sample MSE against the velocity target."""
    from flowtrain.flow import interpolate, velocity_target

    x0, shape = fam.training_latents(batch, norm, None)
    cond = fam.conditioning(batch, options)
    pred = fam.predict(transformer, interpolate(x0, noise, sigma), sigma, cond, shape)
    return ((pred.float() - velocity_target(x0, noise).float()) ** 2).mean(dim=(1, 2)), pred
