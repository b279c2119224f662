"""A tiny, randomly initialised FLUX.1 (dev-type) pipeline folder, built offline.

Every component is the real class `FluxPipeline` loads, with a tiny config, saved with `save_pretrained`, so
`FluxPipeline.from_pretrained(path)` reads it through the same code as black-forest-labs/FLUX.1-dev:

    tokenizer      CLIPTokenizer      a byte-level BPE learned here from a few sentences (`</w>` word ends, like CLIP's)
    text_encoder   CLIPTextModel      hidden 32 (real: 768); its pooler_output is the pooled prompt embedding
    tokenizer_2    T5TokenizerFast    a Unigram vocabulary written here (pad 0, eos 1, unk 2, like T5's); 512 tokens
    text_encoder_2 T5EncoderModel     d_model 32 (real: 4096), gated-GELU feed-forward like T5 v1.1
    vae            AutoencoderKL      16 latent channels (as real), 2× downsampling, FLUX.1's shift / scaling factor
    transformer    FluxTransformer2DModel  guidance_embeds=True (dev-type), 1 double + 2 single blocks, 64 in-channels
    scheduler      FlowMatchEulerDiscreteScheduler with FLUX.1-dev's scheduler_config.json values

Nothing is downloaded, and the same seed gives the same folder: the tokenizers are built deterministically and
wrapped in transformers' `tokenizers`-backed classes (no sentencepiece needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowtrain.models.common import save_pipeline_once

# FLUX.1-dev's scheduler/scheduler_config.json (dynamic, resolution-dependent shift; `shift` unused then).
FLUX1_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# FLUX.1's VAE (ae.safetensors / vae/config.json): latents are (z - shift_factor) * scaling_factor.
FLUX1_VAE_SHIFT, FLUX1_VAE_SCALE = 0.1159, 0.3611

CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]

_CORPUS = [
    "a photo of a dog",
    "a photo of a cat on a red sofa",
    "a handwritten digit zero one two three four five six seven eight nine",
    "a red square on a white background, a blue circle, a green triangle",
    "the quick brown fox jumps over the lazy dog",
    "an oil painting of a lighthouse at night, stars in the sky",
]

TINY_RESOLUTION = 32  # pixels: 16×16 latents → an 8×8 grid of 64-channel tokens
TINY_SEQ = 32  # T5 tokens per prompt in tests (the tokenizer itself allows 512, like the real one)


def _clip_words() -> list[str]:
    """The corpus as CLIP's pre-tokeniser splits it (lower-cased, byte-level characters)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return [w for line in _CORPUS for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))]


def build_clip_tokenizer(num_merges: int = 64) -> Any:
    """A `CLIPTokenizer` (77 tokens, like CLIP-L) over a byte-level BPE learned here from a tiny corpus.

    The merges are learned by a few lines of deterministic BPE (most frequent pair, ties by name) rather than with
    `tokenizers`' trainer, whose tie-breaking differs from run to run: the same seed gives the same folder.
    """
    from collections import Counter

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # Every byte alone and as a word end (`x</w>`), as in CLIP's vocabulary: any word tokenises.
    vocab = {tok: i for i, tok in enumerate(CLIP_SPECIALS + alphabet + [c + "</w>" for c in alphabet])}
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in _clip_words())
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",  # FLUX.1-dev's CLIP tokenizer pads with the end token too
        model_max_length=77,
    )


def build_t5_tokenizer() -> Any:
    """A `T5TokenizerFast` (512 tokens max, like FLUX.1's) over a Unigram vocabulary written down here.

    T5's fixed ids (pad 0, eos 1, unk 2), then "▁", every corpus word as a "▁word" piece, and every character alone
    and word-initial. Whole words score higher than their characters, so known words are one token and unknown
    ones fall back to characters. Deterministic (no trainer).
    """
    from transformers import T5TokenizerFast

    words = sorted({w for line in _CORPUS for w in line.replace(",", " ,").split()})
    chars = sorted({c for w in words for c in w})
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in words]
    vocab += [("▁" + c, -4.0) for c in chars if ("▁" + c, -2.0) not in vocab]
    vocab += [(c, -5.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_components(seed: int = 0, *, guidance_embeds: bool = True) -> dict[str, Any]:
    """Every `FluxPipeline` component, randomly initialised from `seed`; kwargs for `FluxPipeline(...)`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # pooled output = the first end token's hidden state
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=FLUX1_VAE_SCALE,
        shift_factor=FLUX1_VAE_SHIFT,
        use_quant_conv=False,  # as FLUX.1's VAE
        use_post_quant_conv=False,
    ).eval()
    transformer = tiny_transformer(guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX1_DEV_SCHEDULER)
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_transformer(*, guidance_embeds: bool = True) -> Any:
    """A tiny `FluxTransformer2DModel` fitting the tiny encoders (from torch's global RNG).

    in_channels 64 = 16 latent channels × the 2×2 patch; joint_attention_dim = T5's d_model; pooled_projection_dim
    = CLIP's hidden size; rope axes (t, h, w) sum to the head dim.
    """
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def build_tiny_pipeline(seed: int = 0, *, guidance_embeds: bool = True) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline(**build_components(seed, guidance_embeds=guidance_embeds))


def save_tiny_pipeline(path: str | Path, seed: int = 0, *, guidance_embeds: bool = True) -> Path:
    """Write the tiny pipeline folder (loadable offline with `FluxPipeline.from_pretrained(path)`); an existing
    folder is kept as is."""
    return save_pipeline_once(path, lambda: build_tiny_pipeline(seed, guidance_embeds=guidance_embeds))


if __name__ == "__main__":  # python -m flowtrain.models.flux1.tiny OUT_DIR
    import sys

    print(save_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-flux1"))
