"""Assemble a FLUX.2 Klein pipeline folder for training a transformer *from scratch*.

    trained VAE (`flowtrain autoencoder`) + text encoder/tokenizer + randomly initialised transformer sized by
    config + FlowMatchEulerDiscreteScheduler → `save_pretrained` → a folder that `precompute`, `train`
    (`train_mode: full`) and `sample` load like any Klein checkpoint.

The transformer's input width (4 × VAE latent channels, after 2×2 patchify) and text width (number of stacked
hidden-state layers × text-encoder hidden size) are derived, never configured, so they cannot disagree.

Text encoder: a tiny random Qwen3 (`flowtrain.models.flux2_klein.tiny`): distinct prompts still give distinct embeddings
(its BPE vocabulary covers the words it was trained on), and the transformer learns what they mean. Or any
Qwen3ForCausalLM folder via `text_encoder.pretrained` (e.g. a real Qwen3 checkpoint; its tokenizer comes along).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field, model_validator

from flowtrain.config.section import Section
from flowtrain.models.paths import subfolder_if_exists

log = logging.getLogger(__name__)


class TransformerArchConfig(Section):
    """`Flux2Transformer2DModel` size. Inner width = heads × head_dim; RoPE axes must sum to head_dim."""

    num_layers: int = Field(2, ge=0, description="Double-stream (MM-DiT) blocks.")
    num_single_layers: int = Field(4, ge=0, description="Single-stream blocks.")
    num_attention_heads: int = Field(4, gt=0)
    attention_head_dim: int = Field(32, gt=0)
    mlp_ratio: float = Field(3.0, gt=0)
    timestep_guidance_channels: int = Field(64, gt=0)
    axes_dims_rope: list[int] = Field(default_factory=lambda: [8, 8, 8, 8], min_length=4, max_length=4)

    @model_validator(mode="after")
    def _rope_fits(self) -> TransformerArchConfig:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim={self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope entries must be even, got {self.axes_dims_rope}")
        return self


class TextEncoderConfig(Section):
    pretrained: str | None = Field(
        None, description="A Qwen3ForCausalLM folder (with its tokenizer); null builds a tiny random one."
    )
    hidden_size: int = Field(32, gt=0, description="Tiny random encoder only.")
    num_layers: int = Field(27, gt=0, description="Tiny random encoder only; 27 keeps layers (9, 18, 27) valid.")
    vocab_size: int = Field(512, gt=0, description="Tiny BPE tokenizer size.")


class SchedulerConfig(Section):
    """Sampling schedule. Klein's dynamic shifting is tuned for thousands of tokens; a fixed shift suits tiny grids."""

    shift: float = Field(1.0, gt=0)
    use_dynamic_shifting: bool = False


class ScratchPipelineConfig(Section):
    transformer: TransformerArchConfig = Field(default_factory=TransformerArchConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    seed: int = Field(0, description="Seed of the random init (transformer, tiny text encoder).")


def _text_encoder(cfg: TextEncoderConfig):
    if cfg.pretrained is not None:
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        te = Qwen3ForCausalLM.from_pretrained(cfg.pretrained, use_safetensors=True).eval()
        return AutoTokenizer.from_pretrained(cfg.pretrained), te
    from flowtrain.models.flux2_klein.tiny import build_text_encoder, build_tokenizer

    tokenizer = build_tokenizer(cfg.vocab_size)
    return tokenizer, build_text_encoder(tokenizer, cfg.hidden_size, cfg.num_layers)


def assemble_pipeline(
    out: str | Path, vae_dir: str | Path, cfg: ScratchPipelineConfig, text_encoder_layers: Sequence[int] = (9, 18, 27)
) -> Path:
    """Write a `Flux2KleinPipeline` folder at `out` with the VAE from `vae_dir` and a fresh random transformer.

    `text_encoder_layers`: the hidden states the prompt embedding stacks (the training config's
    `model.text_encoder_layers`); their count sets the transformer's text width.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    torch.manual_seed(cfg.seed)
    vae_path = Path(vae_dir)
    sub = subfolder_if_exists(vae_path, "vae")
    vae = AutoencoderKLFlux2.from_pretrained(vae_path, subfolder=sub, dtype=torch.float32, use_safetensors=True)
    tokenizer, text_encoder = _text_encoder(cfg.text_encoder)
    n_layers = text_encoder.config.num_hidden_layers
    if not text_encoder_layers or max(text_encoder_layers) > n_layers or min(text_encoder_layers) < 0:
        raise ValueError(f"text_encoder_layers {list(text_encoder_layers)} out of range for {n_layers} hidden layers")
    arch = cfg.transformer
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,
        num_layers=arch.num_layers,
        num_single_layers=arch.num_single_layers,
        attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.num_attention_heads,
        joint_attention_dim=len(text_encoder_layers) * text_encoder.config.hidden_size,
        timestep_guidance_channels=arch.timestep_guidance_channels,
        mlp_ratio=arch.mlp_ratio,
        axes_dims_rope=tuple(arch.axes_dims_rope),
        guidance_embeds=False,  # Klein base: CFG at inference, no guidance embedding
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=cfg.scheduler.shift, use_dynamic_shifting=cfg.scheduler.use_dynamic_shifting
    )
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    out = Path(out)
    pipe.save_pretrained(out)
    n = sum(p.numel() for p in transformer.parameters())
    log.info("pipeline → %s (random transformer: %.2fM parameters)", out, n / 1e6)
    return out
