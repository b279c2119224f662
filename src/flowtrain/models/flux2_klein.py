"""FLUX.2 Klein (4B / 9B base): everything that must match diffusers' `Flux2KleinPipeline` exactly.

Reference: diffusers `pipelines/flux2/pipeline_flux2_klein.py`.
  text  : Qwen3 hidden states at layers (9, 18, 27), chat template, padded to max_length → (B, L, 3·D)
  image : VAE mean → 2×2 patchify (B, 4C, h/2, w/2) → BatchNorm-stat normalise → pack (B, h/2·w/2, 4C)
  ids   : text (0, 0, 0, l); image (0, h, w, 0)
  model : x_σ = (1-σ)·x0 + σ·ε, target ε - x0, `timestep=σ` (the model scales by 1000), `guidance=None`.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from flowtrain.models.base import MODELS, ModelPathError

log = logging.getLogger(__name__)

# LoRA targets. Double blocks hold attention (+ the text stream's add_* projections), ff and ff_context; single
# blocks hold one fused qkv+mlp projection and a plain Linear `attn.to_out` (a ModuleList in double blocks,
# hence regexes anchored on the block kind). Single blocks fuse attention and MLP in those two Linears, so
# `attention` already adapts the single blocks' MLP; `attention+ff` adds the double blocks' ff / ff_context;
# `all` adds every remaining Linear: the input embedders (x_embedder, context_embedder), the timestep embedding
# MLP, the shared AdaLN modulation projections, and the output layer (norm_out.linear, proj_out).
_DOUBLE_ATTN = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_FF = r"transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)"
_SINGLE_ATTN = r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
_GLOBAL = (
    r"x_embedder|context_embedder|proj_out|norm_out\.linear|time_guidance_embed\.\w+\.linear_[12]"
    r"|(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear"
)
LORA_PRESETS: dict[str, list[str]] = {
    "attention": [_DOUBLE_ATTN, _SINGLE_ATTN],
    "attention+ff": [_DOUBLE_ATTN, _DOUBLE_FF, _SINGLE_ATTN],
    "all": [_DOUBLE_ATTN, _DOUBLE_FF, _SINGLE_ATTN, _GLOBAL],
}


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 4C, H/2, W/2): each 2×2 spatial patch becomes channels (channel-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`: (B, 4C, h, w) → (B, C, 2h, 2w)."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h·w, C) tokens in row-major order."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h·w, C) → (B, C, h, w); inverse of `pack`."""
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def latent_ids(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, h·w, 4) int64 position ids (t=0, h, w, l=0) for a packed h×w token grid."""
    h = torch.arange(height).repeat_interleave(width)
    w = torch.arange(width).repeat(height)
    zeros = torch.zeros_like(h)
    return torch.stack([zeros, h, w, zeros], dim=-1).unsqueeze(0).expand(batch, -1, -1)


def text_ids(batch: int, length: int) -> torch.Tensor:
    """(B, L, 4) int64 position ids (t=0, h=0, w=0, l) for L text tokens."""
    ell = torch.arange(length)
    zeros = torch.zeros_like(ell)
    return torch.stack([zeros, zeros, zeros, ell], dim=-1).unsqueeze(0).expand(batch, -1, -1)


@functools.lru_cache(maxsize=32)
def _position_ids(batch: int, height: int, width: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(latent_ids, text_ids) on `device`, built once per shape: a training run sees one or a few shapes, and
    rebuilding them cost a few small CPU ops and two host→device copies every step. The transformer only reads them."""
    return latent_ids(batch, height, width).to(device), text_ids(batch, length).to(device)


def normalize_latents(patched: torch.Tensor, bn_mean: torch.Tensor, bn_std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with the VAE BatchNorm running stats; patched (B, 4C, h, w), stats (4C,)."""
    return (patched - bn_mean.view(1, -1, 1, 1).to(patched)) / bn_std.view(1, -1, 1, 1).to(patched)


def training_latents(
    moments: torch.Tensor,
    bn_mean: torch.Tensor,
    bn_std: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Cached VAE moments → the packed, normalised x0 the transformer is trained on.

    Args:
        moments: (B, 2C, H, W) posterior mean ‖ logvar, as stored in the cache.
        bn_mean, bn_std: (4C,) the VAE's BatchNorm statistics (std = sqrt(running_var + eps)).
        generator: None → posterior mode (the reference); else one sample mean + std·ε drawn from it.
    Returns:
        x0 (B, H/2·W/2, 4C), and the token grid height H/2 and width W/2.
    """
    mean, logvar = moments.chunk(2, dim=1)
    z = mean
    if generator is not None:
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        z = mean + std * eps
    patched = normalize_latents(patchify(z), bn_mean, bn_std)
    return pack(patched), patched.shape[2], patched.shape[3]


@MODELS.register("flux2_klein")
class Flux2KleinAdapter:
    """Adapter for `Flux2KleinPipeline` checkpoints (FLUX.2 Klein base 4B / 9B)."""

    family = "flux2_klein"
    lora_presets = LORA_PRESETS

    # ---- precompute side -------------------------------------------------------------------------------------
    def load_pipeline(
        self,
        pretrained: str,
        *,
        dtype: torch.dtype,
        with_transformer: bool = False,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> Any:
        """Load the diffusers pipeline; without the transformer unless asked (precompute never needs it)."""
        from diffusers import Flux2KleinPipeline

        # use_safetensors=True: weights never come from pickle files (diffusers would fall back to them otherwise).
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "revision": revision,
            "trust_remote_code": trust_remote_code,
            "use_safetensors": True,
        }
        if not with_transformer:
            kwargs["transformer"] = None
        check_model_path(pretrained, "model.pretrained", need="model_index.json")
        try:
            pipe = Flux2KleinPipeline.from_pretrained(pretrained, **kwargs)
        except OSError as e:  # diffusers/hub report a missing model as OSError / EnvironmentError
            raise FileNotFoundError(f"could not load the pipeline model.pretrained={pretrained!r}: {e}") from e
        warn_if_distilled(pipe.config)
        return pipe

    def encode_prompts(self, pipe: Any, prompts: list[str], *, layers: list[int], max_length: int) -> torch.Tensor:
        """(B, L, len(layers)·D) — the pipeline's own `encode_prompt`, so the cache equals the reference."""
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                prompts,
                device=pipe.text_encoder.device,
                max_sequence_length=max_length,
                text_encoder_out_layers=tuple(layers),
            )
        return embeds

    def preprocess_images(self, pipe: Any, images: list, *, resolution: int) -> torch.Tensor:
        """PIL RGB images → (B, 3, res, res) in [-1, 1]: resize to cover res×res, then the pipeline's processor
        (centre-crop to exactly res×res and normalise)."""
        multiple = pipe.vae_scale_factor * 2
        if resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a multiple of {multiple} for this VAE")
        return torch.cat(
            [
                pipe.image_processor.preprocess(
                    resize_to_cover(im, resolution), height=resolution, width=resolution, resize_mode="crop"
                )
                for im in images
            ]
        )

    def encode_pixels(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 2C, H/f, W/f) posterior moments (mean ‖ logvar), float32."""
        with torch.no_grad():
            dist = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.logvar], dim=1).float()

    def encode_images(self, pipe: Any, images: list, *, resolution: int) -> torch.Tensor:
        return self.encode_pixels(pipe, self.preprocess_images(pipe, images, resolution=resolution))

    def latent_stats(self, pipe: Any) -> tuple[list[float], list[float]]:
        """The VAE BatchNorm mean and std (sqrt(var + eps)) used to normalise patchified latents."""
        bn = pipe.vae.bn
        std = torch.sqrt(bn.running_var.float() + pipe.vae.config.batch_norm_eps)
        return bn.running_mean.float().tolist(), std.tolist()

    # ---- train side --------------------------------------------------------------------------------------------
    training_latents = staticmethod(training_latents)

    def load_transformer(
        self, pretrained: str, *, dit: str | None = None, dtype: torch.dtype, revision: str | None = None
    ) -> torch.nn.Module:
        """The transformer from the pipeline folder / hub id, or from a separate `dit` folder or file."""
        from diffusers import Flux2Transformer2DModel

        if dit is None:
            check_model_path(pretrained, "model.pretrained", need="transformer/config.json")
            return Flux2Transformer2DModel.from_pretrained(
                pretrained, subfolder="transformer", dtype=dtype, revision=revision, use_safetensors=True
            )
        dit_path = Path(dit)
        check_model_path(dit, "model.dit")
        if dit_path.is_file():
            # A single .safetensors (BFL or diffusers key layout); the architecture comes from the base pipeline.
            if dit_path.suffix != ".safetensors":
                raise ValueError(
                    f"model.dit={dit!r}: only .safetensors weight files are loaded (pickle-based .ckpt/.pt/.bin can "
                    "run code); convert it to safetensors first"
                )
            return Flux2Transformer2DModel.from_single_file(
                str(dit_path), config=pretrained, subfolder="transformer", torch_dtype=dtype
            )
        sub = "transformer" if (dit_path / "transformer" / "config.json").exists() else None
        return Flux2Transformer2DModel.from_pretrained(dit, subfolder=sub, dtype=dtype, use_safetensors=True)

    def predict(
        self,
        transformer: torch.nn.Module,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        text_embeds: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """Velocity prediction (B, N, 4C) for noisy tokens x_t (B, N, 4C) on an h×w grid at noise level σ (B,)."""
        img_ids, txt_ids = _position_ids(x_t.shape[0], grid[0], grid[1], text_embeds.shape[1], x_t.device)
        return transformer(
            hidden_states=x_t,
            encoder_hidden_states=text_embeds,
            timestep=sigma,  # Flux2 multiplies by 1000 inside; the pipeline passes t/1000 == σ.
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,  # Klein base has no guidance embedding; CFG is done at inference.
            return_dict=False,
        )[0]

    # ---- validation side (train.validation) -------------------------------------------------------------------
    def pixel_multiple(self, pretrained: str, *, revision: str | None = None) -> int:
        """Image sides must be multiples of this: the VAE's downsampling × the 2×2 latent patch (16 for Klein).
        Reads only the VAE's config."""
        from diffusers import AutoencoderKLFlux2

        vae_cfg = AutoencoderKLFlux2.load_config(pretrained, subfolder="vae", revision=revision)
        return 2 ** (len(vae_cfg["block_out_channels"]) - 1) * 2

    def sample(
        self,
        pipe: Any,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        *,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        generator: torch.Generator,
    ) -> Any:
        """One PIL image from precomputed (1, L, D) prompt embeddings with the pipeline's own sampler; equals
        `pipe(prompt=...)` for the prompt the embeddings came from. `negative_embeds` (the "" prompt) is used when
        guidance_scale > 1 (real CFG)."""
        out = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds if guidance_scale > 1 else None,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            max_sequence_length=prompt_embeds.shape[1],
        )
        return out.images[0]

    def save_lora(self, output_dir: str | Path, transformer: torch.nn.Module, lora_config: Any) -> Path:
        """Write `pytorch_lora_weights.safetensors` in diffusers format, with the adapter metadata.

        Without the metadata diffusers reloads alpha = rank and the LoRA's effect changes scale.
        """
        from diffusers import Flux2KleinPipeline
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(transformer)
        Flux2KleinPipeline.save_lora_weights(
            str(output_dir),
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=lora_config.to_dict(),
        )
        return Path(output_dir) / "pytorch_lora_weights.safetensors"


def check_model_path(path: str, key: str, need: str | None = None) -> None:
    """A clear error for a model path that is clearly local (absolute, ./, ~, or existing) but missing or not a
    diffusers folder; anything else may be a hub id and is left to diffusers."""
    p = Path(path).expanduser()
    local = p.is_absolute() or path.startswith((".", "~")) or p.exists()
    if not local:
        return
    if not p.exists():
        raise ModelPathError(
            f"{key}={path!r}: no such file or folder. Give a local diffusers pipeline folder (with model_index.json) "
            "or a Hugging Face hub id such as black-forest-labs/FLUX.2-klein-base-4B"
        )
    if need is not None and p.is_dir() and not (p / need).exists():
        raise ModelPathError(
            f"{key}={path!r} is not a diffusers pipeline folder ({need} is missing); point it at the folder that "
            "holds model_index.json"
        )


def resize_to_cover(image: Any, size: int) -> Any:
    """Scale a PIL image (aspect kept, Lanczos) so its short side is `size`.

    `Flux2ImageProcessor`'s "crop" mode only centre-crops — it never scales — so a 1024 px photo cached at 512 would
    keep its middle quarter, and a smaller one would be padded with black. Scaling first makes the crop remove only
    the long side's excess.
    """
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    if scale == 1.0:
        return image
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.LANCZOS)


def warn_if_distilled(config: Any) -> None:
    """Klein's distilled checkpoints are step-distilled for inference; fine-tuning should start from `-base`."""
    if bool(getattr(config, "is_distilled", False) or (isinstance(config, dict) and config.get("is_distilled"))):
        log.warning(
            "This Klein checkpoint is distilled (is_distilled=true). Train the -base checkpoints "
            "(e.g. black-forest-labs/FLUX.2-klein-base-4B); a LoRA trained on a distilled model transfers poorly."
        )


def read_model_index(pretrained: str) -> dict:
    """model_index.json of a local pipeline folder, {} for hub ids (read lazily by diffusers there)."""
    p = Path(pretrained) / "model_index.json"
    return json.loads(p.read_text()) if p.exists() else {}
