"""Qwen-Image: everything that must match diffusers' `QwenImagePipeline` exactly (pipelines/qwenimage/).

  text   : system+user template, Qwen2.5-VL `hidden_states[-1]`, first 34 tokens dropped, trimmed to the true length
           (`_get_qwen_prompt_embeds`), cut to max_sequence_length → cached per row as (L_i, 3584), no padding
  batch  : rows zero-padded at the end to the batch's longest + bool mask → `encoder_hidden_states(_mask)`
  image  : VAE posterior (B, 16, 1, H/8, W/8) → (z - latents_mean) / latents_std → 2×2 pack → (B, H/16·W/16, 64)
  model  : x_σ = (1-σ)·x0 + σ·ε, target ε - x0, `timestep=σ` (the pipeline passes t/1000; the model's timestep
           projection scales by 1000), `img_shapes=[[(1, h, w)]]·B`, `guidance=None`; real CFG (`true_cfg_scale`)
           with the empty prompt at inference.
  shift  : the scheduler's dynamic shift μ(N) = calculate_shift(N, 256, 8192, 0.5, 0.9) → s = e^μ
           (`common.scheduler_shift`).

The pipeline is the reference; where it has a method for a step (`encode_prompt`, its sampler), that method is
called, so the cache and validation images are the pipeline's by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from flowtrain.models import common
from flowtrain.models.base import Column
from flowtrain.models.qwen_image import PIPELINE_CLASSES
from flowtrain.models.qwen_image import latents as L
from flowtrain.models.qwen_image.export import LAYOUT as EXPORT_LAYOUT
from flowtrain.models.qwen_image.options import QwenImageOptions

log = logging.getLogger(__name__)

EXAMPLE = "Qwen/Qwen-Image"
TEXT = "prompt_embeds"  # the text column; its batch mask is then `prompt_embeds_mask`, the pipeline's own name
IMAGE = "latent_moments"
HIDDEN, HIDDEN_MASK = "encoder_hidden_states", "encoder_hidden_states_mask"  # the transformer's argument names

# LoRA targets (QwenImageTransformer2DModel: 60 identical dual-stream blocks, no single-stream blocks).
# attention: both streams' projections of the joint attention; +ff: the image and text MLPs; all: every other
# Linear too (AdaLN modulation img_mod/txt_mod, input projections img_in/txt_in, timestep MLP, output layer).
_ATTN = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FF = r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"
_REST = (
    r"transformer_blocks\.\d+\.(img_mod|txt_mod)\.1|img_in|txt_in|proj_out|norm_out\.linear"
    r"|time_text_embed\.timestep_embedder\.linear_[12]"
)
LORA_PRESETS: dict[str, list[str]] = {
    "attention": [_ATTN],
    "attention+ff": [_ATTN, _FF],
    "all": [_ATTN, _FF, _REST],
}


def _embeds_and_mask(cond: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds, mask or None) from `conditioning` output or from a batch in the cache's column names."""
    if HIDDEN in cond:
        return cond[HIDDEN], cond.get(HIDDEN_MASK)
    return cond[TEXT], cond.get(f"{TEXT}_mask")


def _pipeline_text(cond: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, prompt_embeds_mask) for the pipeline call; an all-valid mask is spelled out (the pipeline
    turns it back into None, the same computation) so the pipeline does not warn about a missing mask."""
    embeds, mask = _embeds_and_mask(cond)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return embeds, mask.long()


def _as_conditioning(embeds: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The transformer's text inputs. A mask with every position valid is left out, as the pipeline's
    `encode_prompt` and diffusers' training script do (`mask.all()` → None): the transformer then runs attention
    without a mask, which is the same computation and lets fused attention kernels run."""
    out = {HIDDEN: embeds}
    if mask is not None and not bool(mask.all()):
        out[HIDDEN_MASK] = mask.to(torch.bool)
    return out


def _call(pipe: Any, text: dict[str, Any], true_cfg_scale: float, max_sequence_length: int, *, height: int,
          width: int, steps: int, generator: torch.Generator, output_type: str) -> Any:  # fmt: skip
    """One image from the pipeline's own sampler: `sample` (cached embeddings) and `generate` (prompt strings) differ
    only in `text`, the prompt inputs, so the two give the same image for the same prompt."""
    return pipe(
        **text,
        true_cfg_scale=true_cfg_scale,
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=generator,
        output_type=output_type,
        max_sequence_length=max_sequence_length,
    ).images[0]


class QwenImage:
    """`ModelFamily` for `QwenImagePipeline` checkpoints (Qwen/Qwen-Image and its fine-tunes)."""

    name = "qwen_image"
    pipeline_classes = PIPELINE_CLASSES
    options = QwenImageOptions
    lora_presets = LORA_PRESETS
    export_layout = EXPORT_LAYOUT  # `flowtrain export`'s diffusers → original table (export.py)
    # QwenImagePipeline.__call__'s num_inference_steps / true_cfg_scale. guidance_scale is the pipeline's
    # `true_cfg_scale`: real CFG against the empty negative prompt (> 1 runs it), the guided velocity rescaled to the
    # conditional one's norm; the pipeline's own `guidance_scale` is for guidance-distilled variants and unused here.
    sampling_defaults: Mapping[str, float | int] = MappingProxyType({"steps": 50, "guidance_scale": 4.0})
    tiny_options: Mapping[str, Any] = {"max_sequence_length": 64}
    tiny_resolution = 32  # the tiny VAE downsamples 2×: 16×16 latents → 8×8 = 64 tokens

    # ---- loading ---------------------------------------------------------------------------------------------
    def load_encoders(self, model: QwenImageOptions, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        from diffusers import QwenImagePipeline

        pipe = common.load_pipeline(QwenImagePipeline, model, dtype=dtype, example=EXAMPLE, transformer=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def load_transformer(
        self, model: QwenImageOptions, *, dtype: torch.dtype, weights: str | None = None
    ) -> torch.nn.Module:
        from diffusers import QwenImageTransformer2DModel

        transformer = common.load_transformer(QwenImageTransformer2DModel, model, dtype=dtype, weights=weights)
        cfg = transformer.config
        if cfg.guidance_embeds or getattr(cfg, "zero_cond_t", False) or getattr(cfg, "use_additional_t_cond", False):
            raise ValueError(
                f"{model.pretrained!r}: this transformer (guidance_embeds / zero_cond_t / use_additional_t_cond) is "
                "not a Qwen-Image text-to-image model; QwenImagePipeline's call does not fit it"
            )
        return transformer

    def identity(self, model: QwenImageOptions) -> dict[str, str]:
        return common.component_identity(model.pretrained, ["text_encoder", "tokenizer", "vae"], model.revision)

    # ---- precompute ------------------------------------------------------------------------------------------
    def cache_columns(self, encoders: Any, model: QwenImageOptions, *, resolution: int) -> list[Column]:
        common.check_resolution(encoders, resolution)
        z, side = encoders.vae.config.z_dim, resolution // encoders.vae_scale_factor
        width = encoders.text_encoder.config.get_text_config().hidden_size
        return [
            Column(IMAGE, "float32", (2 * z, 1, side, side), "image"),
            Column(TEXT, model.dtype, (None, width), "text", max_length=model.max_sequence_length),
        ]

    def cache_settings(self, model: QwenImageOptions) -> dict[str, Any]:
        return {"max_sequence_length": model.max_sequence_length}

    def check_options(self, encoders: Any, model: QwenImageOptions) -> None:
        limit = encoders.tokenizer_max_length
        if model.max_sequence_length > limit:
            raise ValueError(
                f"model.max_sequence_length={model.max_sequence_length} exceeds QwenImagePipeline's limit {limit}; "
                f"set it to at most {limit} (the pipeline default is 512)"
            )
        prefix = encoders.prompt_template_encode.split("{}")[0]
        n = len(encoders.tokenizer(prefix).input_ids)
        if n != encoders.prompt_template_encode_start_idx:
            log.warning(
                "this tokenizer splits the prompt template's prefix into %d tokens, but the pipeline drops %d: "
                "prompt embeddings will %s (the pipeline does the same, so training still matches it)",
                n, encoders.prompt_template_encode_start_idx,
                "keep template tokens" if n > encoders.prompt_template_encode_start_idx else "lose prompt tokens",
            )  # fmt: skip

    def encode_prompts(
        self, encoders: Any, prompts: list[str], model: QwenImageOptions
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """{"prompt_embeds": B tensors (L_i, D)}: the pipeline's `encode_prompt`, each row cut to its true length."""
        with torch.no_grad():
            embeds, mask = encoders.encode_prompt(
                prompts, device=encoders.text_encoder.device, max_sequence_length=model.max_sequence_length
            )
        return {TEXT: [r.clone() for r in common.rows_of(embeds, mask)]}

    def preprocess_images(
        self, encoders: Any, images: list[Any], *, resolution: int, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """PIL RGB → (B, 3, res, res) in [-1, 1]: the pipeline's `VaeImageProcessor` in crop mode (scale to cover,
        centre-crop), exactly the pixels the pipeline would feed its VAE."""
        return common.preprocess_images(encoders, images, resolution, size=size)

    def encode_pixels(self, encoders: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) → {"latent_moments": (B, 32, 1, H/8, W/8)} posterior mean ‖ logvar, float32."""
        vae = encoders.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist  # one video frame
        return {IMAGE: torch.cat([dist.mean, dist.logvar], dim=1).float()}

    def latent_norm(self, encoders: Any) -> dict[str, list[float]]:
        cfg = encoders.vae.config
        return {
            "latents_mean": [float(v) for v in cfg.latents_mean],
            "latents_std": [float(v) for v in cfg.latents_std],
        }

    # ---- training --------------------------------------------------------------------------------------------
    def training_latents(
        self, batch: Mapping[str, torch.Tensor], norm: Mapping[str, torch.Tensor], generator: torch.Generator | None
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(x0 (B, H/16·W/16, 64), token grid (h, w))."""
        return L.training_latents(batch[IMAGE], norm["latents_mean"], norm["latents_std"], generator)

    def conditioning(self, batch: Mapping[str, torch.Tensor], model: QwenImageOptions) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": (B, L_max, D), "encoder_hidden_states_mask": (B, L_max) bool (only when some
        row is padded)}."""
        return _as_conditioning(batch[TEXT], batch.get(f"{TEXT}_mask"))

    def drop_captions(
        self, cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], drop: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Rows where `drop` is True get the empty prompt's embedding at its own length; embeddings and mask are
        re-padded to the new longest row (a dropped longest caption shortens the batch), unless the batch was padded
        to a fixed length (`train.compile`), which it keeps (`common.drop_rows`)."""
        if not bool(drop.any()):
            return cond
        embeds, mask = _embeds_and_mask(cond)
        empty_embeds, empty_mask = _embeds_and_mask(empty)
        padded, new_mask = common.drop_rows(embeds, mask, common.rows_of(empty_embeds, empty_mask)[0], drop)
        return _as_conditioning(padded, new_mask)

    def predict(
        self,
        transformer: torch.nn.Module,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """Velocity (B, N, 64): the transformer call of the pipeline's denoising loop."""
        height, width = shape
        return transformer(
            hidden_states=x_t,
            timestep=sigma.to(x_t.dtype),  # the pipeline passes t/1000 = σ; the timestep projection scales by 1000
            guidance=None,  # Qwen-Image has no guidance embedding; CFG is real CFG at inference
            encoder_hidden_states=cond[HIDDEN],
            encoder_hidden_states_mask=cond.get(HIDDEN_MASK),
            img_shapes=L.img_shapes(x_t.shape[0], height, width),
            return_dict=False,
        )[0]

    def resolution_shift(self, model: QwenImageOptions, num_tokens: int) -> float:
        """s = e^μ with μ = calculate_shift(N, …) from the model's scheduler config: ≈ 1.71 at 512² px (1024 tokens),
        2.00 at 1024² (4096), 2.30 at 1328² (6889) for Qwen/Qwen-Image."""
        return common.scheduler_shift(num_tokens, common.scheduler_config(model))

    def check_cache(
        self,
        model: QwenImageOptions,
        manifest: Any,
        transformer: torch.nn.Module | None = None,
        *,
        allow_other_weights: bool = False,
    ) -> None:
        """Family, cache settings, encoder/VAE identity (a `CacheManifest`), the scheduler config the shift and the
        sampler read, then the transformer's input widths."""
        common.check_cache_origin(self, model, manifest, allow_other_weights=allow_other_weights)
        common.scheduler_config(model)
        if transformer is not None:
            common.check_input_widths(manifest, transformer, text=TEXT, latents=IMAGE)

    # ---- weights ---------------------------------------------------------------------------------------------
    def save_lora(self, output_dir: str | Path, transformer: torch.nn.Module, lora_config: Any) -> Path:
        from diffusers import QwenImagePipeline

        return common.save_lora_with(QwenImagePipeline, output_dir, transformer, lora_config)

    def save_full(self, output_dir: str | Path, transformer: torch.nn.Module) -> Path:
        return common.save_full(output_dir, transformer)

    # ---- sampling --------------------------------------------------------------------------------------------
    def pixel_multiple(self, model: QwenImageOptions) -> int:
        """VAE factor (2 ** len(temperal_downsample), 8 for Qwen-Image) × the 2×2 patch: 16."""
        from diffusers import AutoencoderKLQwenImage

        return common.pixel_multiple(
            AutoencoderKLQwenImage, model, lambda cfg: 2 ** len(cfg["temperal_downsample"]), example=EXAMPLE
        )

    def sample(
        self,
        encoders: Any,
        transformer: torch.nn.Module,
        cond: Mapping[str, torch.Tensor],
        negative: Mapping[str, torch.Tensor] | None,
        *,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        generator: torch.Generator,
        output_type: str = "pil",
    ) -> Any:
        """One image from cached conditioning (batch of 1; `conditioning` output or the cache's columns) with the
        pipeline's own sampler: `prompt_embeds` + `prompt_embeds_mask`, and with guidance_scale > 1 real CFG
        (`true_cfg_scale`) against `negative` (the empty prompt). Equals `generate` for the same prompt."""
        embeds, mask = _pipeline_text(cond)
        text = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        cfg = guidance_scale > 1 and negative is not None
        if cfg:
            neg, neg_mask = _pipeline_text(negative)
            text |= {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
        kw = {"height": height, "width": width, "steps": steps, "generator": generator, "output_type": output_type}
        with common.transformer_in(encoders, transformer) as pipe:
            # The rows are already cut to max_sequence_length: the pipeline's own limit never cuts them again.
            return _call(pipe, text, guidance_scale if cfg else 1.0, pipe.tokenizer_max_length, **kw)

    def sampling_pipeline(
        self,
        model: QwenImageOptions,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        transformer: str | None = None,
        lora: str | None = None,
    ) -> Any:
        from diffusers import QwenImagePipeline

        return common.sampling_pipeline(self, QwenImagePipeline, model, dtype=dtype, device=device,
                                        transformer=transformer, lora=lora, example=EXAMPLE)  # fmt: skip

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        model: QwenImageOptions,
        *,
        generators: list[torch.Generator],
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        output_type: str = "pil",
    ) -> list[Any]:
        """One image per prompt, each its own pipeline call (a batch would pad the prompts and change the numbers
        slightly); guidance_scale > 1: real CFG with the empty negative prompt, as `sample` does."""
        negative = {"negative_prompt": ""} if guidance_scale > 1 else {}
        scale = guidance_scale if negative else 1.0
        kw = {"height": height, "width": width, "steps": steps, "output_type": output_type}
        return [
            _call(pipe, {"prompt": p, **negative}, scale, model.max_sequence_length, generator=g, **kw)
            for p, g in zip(prompts, generators, strict=True)
        ]

    # ---- autoencoder (optional capability: `flowtrain autoencoder`; autoencoder.py) -----------------------------
    def build_autoencoder(self, model: Any) -> torch.nn.Module:
        from flowtrain.models.qwen_image.autoencoder import build_vae

        return build_vae(model)

    def autoencoder_pixel_multiple(self, model: Any) -> int:
        from flowtrain.models.qwen_image.autoencoder import pixel_multiple

        return pixel_multiple(model)

    def finish_autoencoder(
        self, vae: torch.nn.Module, dataset: Any, cfg: Any, *, device: Any, progress: bool = True
    ) -> dict[str, Any]:
        from flowtrain.models.qwen_image.autoencoder import finish

        return finish(vae, dataset, cfg, device=device, progress=progress)

    # ---- tiny ------------------------------------------------------------------------------------------------
    def save_tiny_pipeline(self, path: str | Path, seed: int = 0) -> Path:
        from flowtrain.models.qwen_image.tiny import save_tiny_pipeline

        return save_tiny_pipeline(path, seed=seed)


__all__ = ["LORA_PRESETS", "QwenImage"]
