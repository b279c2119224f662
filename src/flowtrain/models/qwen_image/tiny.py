"""A tiny, randomly initialised `QwenImagePipeline`, built offline.

Every component is the class the real Qwen/Qwen-Image `model_index.json` names, with a tiny config, saved with
`save_pretrained`: `Qwen2Tokenizer`, `Qwen2_5_VLForConditionalGeneration` (text + a one-block vision tower),
`AutoencoderKLQwenImage`, `QwenImageTransformer2DModel` and `FlowMatchEulerDiscreteScheduler` with Qwen-Image's real
scheduler config. `QwenImagePipeline.from_pretrained(path)` loads it with `HF_HUB_OFFLINE=1`.

What keeps the tiny model honest:
- the tokenizer is trained so that the pipeline's system+user template prefix is exactly 34 tokens, the number the
  pipeline drops (`prompt_template_encode_start_idx`), just as with the real Qwen2.5 tokenizer; `build_tokenizer`
  checks it, so dropping too few or too many tokens shows up in the exactness tests;
- latent width 16 (the real z_dim), so packed tokens are 64 wide as in the real model;
- non-trivial `latents_mean` / `latents_std`, so a missing or inverted normalisation is caught.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The pipeline's template (pipeline_qwenimage.py, `prompt_template_encode`) and the number of leading tokens it drops.
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_DROP = 34
TEMPLATE_PREFIX = TEMPLATE.split("{}")[0]

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen/Qwen-Image scheduler/scheduler_config.json (the values every peer trainer copies; see docs/models/qwen_image.md).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}

_CORPUS = [
    TEMPLATE.replace("{}", "a photo of a dog"),
    "a photo of a dog, a red square on a white background, a blue circle, a green triangle",
    "a handwritten digit zero one two three four five six seven eight nine",
    "the quick brown fox jumps over the lazy dog",
    "a photo number 0 1 2 3 4 5 6 7 8 9",
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny Qwen-Image pipeline (about 0.3M parameters in all)."""

    te_hidden: int = 32
    te_layers: int = 2
    z_dim: int = 16  # the real latent width: packed tokens are 4·16 = 64 wide
    vae_base_dim: int = 8
    dit_layers: int = 2
    dit_heads: int = 2
    dit_head_dim: int = 16
    vocab_size: int = 600


def build_tokenizer(vocab_size: int = 600):
    """A byte-level BPE trained on a tiny corpus, wrapped as `Qwen2Tokenizer` (the class the pipeline loads).

    The BPE is trained with the same pre-tokenizer `Qwen2Tokenizer` uses, on a corpus containing the template, so
    each template word is one token: the template prefix is then exactly `TEMPLATE_DROP` tokens, as with the real
    tokenizer. Raises if that does not hold.
    """
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from flowtrain.models.common import train_bpe

    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab, merges = train_bpe(_CORPUS * 4, vocab_size, SPECIAL_TOKENS, split)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    ids = tok(TEMPLATE_PREFIX).input_ids
    if len(ids) != TEMPLATE_DROP or tok.decode(ids) != TEMPLATE_PREFIX:
        raise RuntimeError(
            f"the tiny tokenizer splits the template prefix into {len(ids)} tokens, not {TEMPLATE_DROP}: the "
            "pipeline's prompt_template_encode_start_idx would not drop exactly the template"
        )
    return tok


def build_text_encoder(tokenizer, hidden: int = 32, layers: int = 2):
    """A random tiny `Qwen2_5_VLForConditionalGeneration` (text model + a one-block vision tower), eval mode."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads, head_dim = 2, hidden // 2
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            # M-RoPE sections sum to head_dim / 2 (the 7B: [16, 24, 24] for head_dim 128).
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    assert head_dim == 2 * sum(config.text_config.rope_parameters["mrope_section"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_components(spec: TinySpec = TinySpec(), seed: int = 0) -> dict:
    """Every pipeline component, randomly initialised from `seed`; kwargs for `QwenImagePipeline`."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.vocab_size)
    text_encoder = build_text_encoder(tokenizer, spec.te_hidden, spec.te_layers)
    g = torch.Generator().manual_seed(seed + 1)
    # Non-trivial statistics (the real ones span -0.95..1.55 and 1.1..3.3), so a missing normalisation is caught.
    latents_mean = (torch.rand(spec.z_dim, generator=g) - 0.5).mul(2.0).round(decimals=4).tolist()
    latents_std = (torch.rand(spec.z_dim, generator=g) * 2.0 + 0.5).round(decimals=4).tolist()
    vae = AutoencoderKLQwenImage(
        base_dim=spec.vae_base_dim,
        z_dim=spec.z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False],  # one 2× spatial downsampling; vae_scale_factor = 2 ** len(...) = 2
        latents_mean=latents_mean,
        latents_std=latents_std,
    ).eval()
    rope_axes = (spec.dit_head_dim // 4, 3 * spec.dit_head_dim // 8, 3 * spec.dit_head_dim // 8)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * spec.z_dim,
        out_channels=spec.z_dim,
        num_layers=spec.dit_layers,
        attention_head_dim=spec.dit_head_dim,
        num_attention_heads=spec.dit_heads,
        joint_attention_dim=spec.te_hidden,
        guidance_embeds=False,
        axes_dims_rope=rope_axes,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def build_tiny_pipeline(spec: TinySpec = TinySpec(), seed: int = 0):
    """A `QwenImagePipeline` with tiny random components."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**build_components(spec, seed))


def save_tiny_pipeline(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Write a tiny pipeline folder loadable with `QwenImagePipeline.from_pretrained(path)` offline; an existing
    folder (with model_index.json) is kept."""
    from flowtrain.models.common import save_pipeline_once

    return save_pipeline_once(path, lambda: build_tiny_pipeline(spec, seed))


if __name__ == "__main__":  # python -m flowtrain.models.qwen_image.tiny OUT_DIR
    import sys

    print(save_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-qwen-image"))
