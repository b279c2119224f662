"""Tiny, randomly initialised FLUX.2 Klein pipelines built offline.

Tests and the demo need a real `Flux2KleinPipeline` folder (tokenizer, Qwen3 text encoder, VAE, transformer,
scheduler) without downloading anything. Every component here is the real diffusers/transformers class with a
tiny config, saved with `save_pretrained`, so the code path that loads it is the one real users run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# A Qwen3-style chat template that honours `enable_thinking` the way the real one does for Klein prompts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_CORPUS = [
    "a photo of a dog",
    "a handwritten digit zero one two three four five six seven eight nine",
    "a red square on a white background, a blue circle, a green triangle",
    "the quick brown fox jumps over the lazy dog",
    "user assistant system",
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny Klein pipeline.

    `te_layers=27` keeps the real hidden-state indices (9, 18, 27) valid while staying ~0.3M parameters.
    """

    te_hidden: int = 32
    te_layers: int = 27
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 16)
    dit_heads: int = 2
    dit_head_dim: int = 16
    dit_double_layers: int = 1
    dit_single_layers: int = 2
    vocab_size: int = 512


def build_tokenizer(vocab_size: int = 512):
    """Train a byte-level BPE on a tiny corpus and wrap it as the `Qwen2TokenizerFast` Klein uses."""
    from transformers import Qwen2TokenizerFast

    from flowtrain.models.common import train_bpe

    vocab, merges = train_bpe(_CORPUS, vocab_size, SPECIAL_TOKENS)
    tok = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_text_encoder(tokenizer, hidden: int = 32, layers: int = 27):
    """A random tiny `Qwen3ForCausalLM` for `tokenizer` (init from torch's global RNG), in eval mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    te_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(te_config).eval()


def build_components(spec: TinySpec = TinySpec(), seed: int = 0) -> dict:
    """Build every pipeline component, randomly initialised from `seed`. Returns kwargs for the pipeline."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.vocab_size)
    text_encoder = build_text_encoder(tokenizer, spec.te_hidden, spec.te_layers)
    n_blocks = len(spec.vae_channels)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=4,
        sample_size=32,
        patch_size=(2, 2),
    )
    # Non-trivial BatchNorm statistics, so tests notice a missing or wrong normalisation.
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    vae.eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=spec.dit_double_layers,
        num_single_layers=spec.dit_single_layers,
        attention_head_dim=spec.dit_head_dim,
        num_attention_heads=spec.dit_heads,
        joint_attention_dim=3 * spec.te_hidden,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def build_tiny_pipeline(spec: TinySpec = TinySpec(), seed: int = 0):
    """A `Flux2KleinPipeline` with tiny random components (base, i.e. not distilled)."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline(**build_components(spec, seed), is_distilled=False)


def save_tiny_pipeline(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Write a tiny pipeline folder loadable with `Flux2KleinPipeline.from_pretrained(path)` offline."""
    from flowtrain.models.common import save_pipeline_once

    return save_pipeline_once(path, lambda: build_tiny_pipeline(spec, seed))


if __name__ == "__main__":  # python -m flowtrain.models.flux2_klein.tiny OUT_DIR
    import sys

    print(save_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-klein"))
