"""Assembling a from-scratch Klein pipeline: derived widths, offline reload, prompts that stay distinct."""

from __future__ import annotations

import pytest
import torch

from flowtrain.config import ConfigError, resolve_config, validate_config
from flowtrain.models.flux2_klein.scratch import ScratchPipelineConfig, TransformerArchConfig, assemble_pipeline


@pytest.fixture(scope="module")
def scratch_dir(tmp_path_factory, tiny_pipeline_dir):
    cfg = ScratchPipelineConfig(
        transformer=TransformerArchConfig(num_layers=1, num_single_layers=1, num_attention_heads=2)
    )
    return assemble_pipeline(tmp_path_factory.mktemp("scratch") / "pipe", tiny_pipeline_dir / "vae", cfg)


def test_widths_are_derived_and_the_folder_loads_offline(scratch_dir, tiny_pipeline_dir):
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(scratch_dir)
    vae = AutoencoderKLFlux2.from_pretrained(tiny_pipeline_dir / "vae")
    tc = pipe.transformer.config
    assert tc.in_channels == 4 * vae.config.latent_channels
    assert tc.joint_attention_dim == 3 * pipe.text_encoder.config.hidden_size
    assert not tc.guidance_embeds and not pipe.config.is_distilled
    assert torch.equal(pipe.vae.bn.running_mean, vae.bn.running_mean)  # the given VAE, stats included
    assert not pipe.scheduler.config.use_dynamic_shifting


def test_digit_captions_get_distinct_embeddings(scratch_dir):
    """The random tiny Qwen3 still tells 'seven' from 'one': the transformer has something to learn from."""
    from flowtrain.models import get_family
    from flowtrain.testing.data import tiny_model

    family = get_family("flux2_klein")
    model = tiny_model(scratch_dir, max_sequence_length=8)
    pipe = family.load_encoders(model, dtype=torch.float32, device="cpu")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    emb = family.encode_prompts(pipe, [f"a handwritten digit {n}" for n in names], model)["text_embeds"]
    assert emb.shape == (10, 8, 96)
    flat = emb.reshape(10, -1)
    dist = torch.cdist(flat, flat)
    assert dist[~torch.eye(10, dtype=bool)].min() > 1e-3 * flat.norm(dim=1).mean()
    seven, one = flat[7], flat[1]
    assert not torch.allclose(seven, one)


def test_arch_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="sum to attention_head_dim"):
        TransformerArchConfig(attention_head_dim=32, axes_dims_rope=[8, 8, 8, 4])
    bad = tmp_path / "p.yaml"
    bad.write_text("transformer:\n  num_heads: 4\n")
    with pytest.raises(ConfigError, match="did you mean `transformer.num_attention_heads`"):
        validate_config(resolve_config(bad), ScratchPipelineConfig)
