"""Tiny, randomly initialised `WanPipeline`s, built offline: Wan 2.1 (one transformer) and a Wan 2.2 A14B-like
two-expert pipeline (`transformer` + `transformer_2` + `boundary_ratio`).

Every component is the class the real Wan-AI/Wan2.1-T2V-1.3B-Diffusers `model_index.json` names, with a tiny
config, saved with `save_pretrained`; `WanPipeline.from_pretrained(path)` loads it with `HF_HUB_OFFLINE=1`.

What keeps the tiny model honest:
- the VAE keeps the real compression: 8× in space, 4× in time (three downsamplings, the last two temporal), and
  the real latent width 16, so latents are (B, 16, (F-1)/4+1, H/8, W/8) exactly as for the real model;
- non-trivial `latents_mean` / `latents_std`, so a missing or inverted normalisation is caught;
- the scheduler is the real one (UniPCMultistepScheduler, flow sigmas, flow_shift 3.0), so the shift the trainer
  reads and the sampler uses are the real model's;
- a `T5TokenizerFast` (UMT5's class) with T5's fixed ids (pad 0, eos 1, unk 2), so prompts have true lengths
  shorter than the padded length and the trim-and-zero-pad of the text path is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (UniPC with flow sigmas; flow_shift 3.0,
# the value the diffusers docs give for 480p).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
_CORPUS = [
    "a handwritten digit zero one two three four five six seven eight nine",
    "moving left right up down across a small black canvas",
    "a photo of a dog running on the beach",
    "a photo number 0 1 2 3 4 5 6 7 8 9",
    "a red square, a blue circle, a green triangle",
]
TINY_RESOLUTION = 32  # pixels: latents 4×4 per frame → a 2×2 patch grid in the transformer
TINY_SEQ = 32  # UMT5 tokens per prompt in tests (the pipeline pads to max_sequence_length)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny Wan pipeline (about 0.2M parameters in all)."""

    te_hidden: int = 32
    te_layers: int = 2
    z_dim: int = 16  # the real latent width
    vae_base_dim: int = 8
    dit_layers: int = 2
    dit_heads: int = 2
    dit_head_dim: int = 12  # RoPE splits it into (t, h, w) = (4, 4, 4)
    boundary_ratio: float | None = None  # set: a Wan 2.2 A14B-like pipeline with two experts


def build_tokenizer() -> Any:
    """A `T5TokenizerFast` over a Unigram vocabulary written here: T5's fixed ids, "▁", each corpus word as one
    "▁word" piece, each character alone and word-initial (unknown words fall back to characters). Deterministic."""
    from transformers import T5TokenizerFast

    words = sorted({w for line in _CORPUS for w in line.replace(",", " ,").split()})
    chars = sorted({c for w in words for c in w})
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in words]
    vocab += [("▁" + c, -4.0) for c in chars if "▁" + c not in {"▁" + w for w in words}]
    vocab += [(c, -5.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_transformer(spec: TinySpec) -> Any:
    """A tiny `WanTransformer3DModel` (patch (1, 2, 2), qk RMSNorm across heads, cross-attention norm: the real
    T2V settings)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=spec.dit_heads,
        attention_head_dim=spec.dit_head_dim,
        in_channels=spec.z_dim,
        out_channels=spec.z_dim,
        text_dim=spec.te_hidden,
        freq_dim=32,
        ffn_dim=2 * spec.dit_heads * spec.dit_head_dim,
        num_layers=spec.dit_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


def build_components(spec: TinySpec = TinySpec(), seed: int = 0) -> dict[str, Any]:
    """Every pipeline component, randomly initialised from `seed`; kwargs for `WanPipeline`."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=spec.te_hidden,
            d_kv=8,
            d_ff=2 * spec.te_hidden,
            num_layers=spec.te_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    # Non-trivial statistics (the real ones span -0.95..1.55 and 1.1..3.3), so a missing normalisation is caught.
    latents_mean = (torch.rand(spec.z_dim, generator=g) - 0.5).mul(2.0).round(decimals=4).tolist()
    latents_std = (torch.rand(spec.z_dim, generator=g) * 2.0 + 0.5).round(decimals=4).tolist()
    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim,
        z_dim=spec.z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],  # the real layout: 8× space, 4× time
        latents_mean=latents_mean,
        latents_std=latents_std,
    ).eval()
    parts: dict[str, Any] = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
        transformer=build_transformer(spec),
    )
    if spec.boundary_ratio is not None:
        parts |= {"transformer_2": build_transformer(spec), "boundary_ratio": spec.boundary_ratio}
    return parts


def build_tiny_pipeline(spec: TinySpec = TinySpec(), seed: int = 0) -> Any:
    """A `WanPipeline` with tiny random components."""
    from diffusers import WanPipeline

    return WanPipeline(**build_components(spec, seed))


def save_tiny_pipeline(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Write a tiny pipeline folder loadable with `WanPipeline.from_pretrained(path)` offline; an existing folder
    (with model_index.json) is kept."""
    from flowtrain.models.common import save_pipeline_once

    return save_pipeline_once(path, lambda: build_tiny_pipeline(spec, seed))


if __name__ == "__main__":  # python -m flowtrain.models.wan.tiny OUT_DIR [--experts]
    import sys

    args = [a for a in sys.argv[1:] if a != "--experts"]
    spec = TinySpec(boundary_ratio=0.875) if "--experts" in sys.argv else TinySpec()
    print(save_tiny_pipeline(args[0] if args else "runs/tiny-wan", spec))
