"""FLUX.2 Klein (4B / 9B base): everything that must match diffusers' `Flux2KleinPipeline` exactly.

Reference: diffusers `pipelines/flux2/pipeline_flux2_klein.py`.
  text  : Qwen3 hidden states at layers (9, 18, 27), chat template, padded to max_length → (B, L, 3·D)
  image : VAE mean → 2×2 patchify (B, 4C, h/2, w/2) → BatchNorm-stat normalise → pack (B, h/2·w/2, 4C)
  ids   : text (0, 0, 0, l); image (0, h, w, 0)
  model : x_σ = (1-σ)·x0 + σ·ε, target ε - x0, `timestep=σ` (the model scales by 1000), `guidance=None`.

Cache columns: `latent_moments` (2C, H/8, W/8) float32 and `text_embeds` (max_sequence_length, 3·D) in model.dtype;
no attention mask reaches the transformer (pad tokens are attended, as in the pipeline), so the full padded
sequence is cached.
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
from flowtrain.models.flux2_klein import PIPELINE_CLASSES
from flowtrain.models.flux2_klein import latents as L
from flowtrain.models.flux2_klein.export import LAYOUT as EXPORT_LAYOUT
from flowtrain.models.flux2_klein.options import Flux2KleinOptions
from flowtrain.models.flux2_klein.shift import resolution_shift

log = logging.getLogger(__name__)

HUB_EXAMPLE = "black-forest-labs/FLUX.2-klein-base-4B"

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

LATENTS, TEXT = "latent_moments", "text_embeds"


class Flux2Klein:
    """`ModelFamily` for `Flux2KleinPipeline` checkpoints (FLUX.2 Klein base 4B / 9B)."""

    name = "flux2_klein"
    pipeline_classes = PIPELINE_CLASSES
    options = Flux2KleinOptions
    lora_presets = LORA_PRESETS
    export_layout = EXPORT_LAYOUT  # `flowtrain export`'s diffusers → original table (export.py)
    # Flux2KleinPipeline.__call__'s num_inference_steps / guidance_scale. guidance_scale: real classifier-free
    # guidance against the empty prompt (> 1 runs the unconditional pass; the base models have no guidance embedding).
    sampling_defaults: Mapping[str, float | int] = MappingProxyType({"steps": 50, "guidance_scale": 4.0})
    tiny_options: Mapping[str, Any] = {"max_sequence_length": 32}
    tiny_resolution = 32

    # ---- loading -----------------------------------------------------------------------------------------------
    def load_encoders(self, model: Flux2KleinOptions, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        from diffusers import Flux2KleinPipeline

        pipe = common.load_pipeline(Flux2KleinPipeline, model, dtype=dtype, example=HUB_EXAMPLE, transformer=None)
        warn_if_distilled(pipe.config)
        pipe.vae.to(device)
        pipe.text_encoder.to(device)
        return pipe

    def load_transformer(
        self, model: Flux2KleinOptions, *, dtype: torch.dtype, weights: str | None = None
    ) -> torch.nn.Module:
        from diffusers import Flux2Transformer2DModel

        return common.load_transformer(Flux2Transformer2DModel, model, dtype=dtype, weights=weights)

    def identity(self, model: Flux2KleinOptions) -> dict[str, str]:
        return common.component_identity(model.pretrained, ["text_encoder", "tokenizer", "vae"], model.revision)

    # ---- precompute ----------------------------------------------------------------------------------------------
    def cache_columns(self, encoders: Any, model: Flux2KleinOptions, *, resolution: int) -> list[Column]:
        side = resolution // encoders.vae_scale_factor
        width = len(model.text_encoder_layers) * encoders.text_encoder.config.hidden_size
        return [
            Column(LATENTS, "float32", (2 * encoders.vae.config.latent_channels, side, side), "image"),
            Column(TEXT, model.dtype, (model.max_sequence_length, width), "text"),
        ]

    def cache_settings(self, model: Flux2KleinOptions) -> dict[str, Any]:
        return {
            "text_encoder_layers": list(model.text_encoder_layers),
            "max_sequence_length": model.max_sequence_length,
        }

    def check_options(self, encoders: Any, model: Flux2KleinOptions) -> None:
        n = encoders.text_encoder.config.num_hidden_layers
        bad = [i for i in model.text_encoder_layers if not -(n + 1) <= i <= n]
        if bad:
            raise ValueError(
                f"model.text_encoder_layers={list(model.text_encoder_layers)}: the text encoder of "
                f"{model.pretrained!r} has {n} layers, so hidden-state indices run from 0 (the embeddings) to {n}; "
                f"{bad} {'is' if len(bad) == 1 else 'are'} out of range. Klein uses [9, 18, 27]."
            )

    def encode_prompts(self, encoders: Any, prompts: list[str], model: Flux2KleinOptions) -> dict[str, torch.Tensor]:
        """{text_embeds: (B, L, len(layers)·D)}: the pipeline's own `encode_prompt`, so the cache equals the
        reference."""
        with torch.no_grad():
            embeds, _ = encoders.encode_prompt(
                prompts,
                device=encoders.text_encoder.device,
                max_sequence_length=model.max_sequence_length,
                text_encoder_out_layers=tuple(model.text_encoder_layers),
            )
        return {TEXT: embeds}

    def preprocess_images(
        self, encoders: Any, images: list[Any], *, resolution: int, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """PIL RGB images → (B, 3, res, res) in [-1, 1]: scaled to cover res×res (`common.resize_to_cover`), then
        the pipeline's `Flux2ImageProcessor`, which in crop mode only centre-crops (and normalises)."""
        return common.preprocess_images(encoders, images, resolution, scale_first=True, size=size)

    def encode_pixels(self, encoders: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] → {latent_moments: (B, 2C, H/f, W/f)} (mean ‖ logvar), float32."""
        with torch.no_grad():
            dist = encoders.vae.encode(pixels.to(encoders.vae.device, encoders.vae.dtype)).latent_dist
        return {LATENTS: torch.cat([dist.mean, dist.logvar], dim=1).float()}

    def latent_norm(self, encoders: Any) -> dict[str, list[float]]:
        """The VAE BatchNorm mean and std (sqrt(var + eps)) that patchified latents are normalised with."""
        bn = encoders.vae.bn
        std = torch.sqrt(bn.running_var.float() + encoders.vae.config.batch_norm_eps)
        return {"bn_mean": bn.running_mean.float().tolist(), "bn_std": std.tolist()}

    # ---- training ----------------------------------------------------------------------------------------------
    def training_latents(
        self, batch: Mapping[str, torch.Tensor], norm: Mapping[str, torch.Tensor], generator: torch.Generator | None
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        x0, h, w = L.training_latents(batch[LATENTS], norm["bn_mean"], norm["bn_std"], generator=generator)
        return x0, (h, w)

    def conditioning(self, batch: Mapping[str, torch.Tensor], model: Flux2KleinOptions) -> dict[str, torch.Tensor]:
        return {TEXT: batch[TEXT]}

    def drop_captions(
        self, cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], drop: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return common.drop_fixed(cond, empty, drop)

    def predict(
        self,
        transformer: torch.nn.Module,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """Velocity (B, N, 4C) for noisy tokens x_t (B, N, 4C) on an h×w grid at noise level σ (B,)."""
        text = cond[TEXT]
        img_ids, txt_ids = L.position_ids(x_t.shape[0], shape[0], shape[1], text.shape[1], x_t.device)
        return transformer(
            hidden_states=x_t,
            encoder_hidden_states=text,
            timestep=sigma,  # Flux2 multiplies by 1000 inside; the pipeline passes t/1000 == σ.
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,  # Klein base has no guidance embedding; CFG is done at inference.
            return_dict=False,
        )[0]

    def resolution_shift(self, model: Flux2KleinOptions, num_tokens: int) -> float:
        return resolution_shift(num_tokens, model.shift_reference_steps)

    def check_cache(
        self,
        model: Flux2KleinOptions,
        manifest: Any,
        transformer: torch.nn.Module | None = None,
        *,
        allow_other_weights: bool = False,
    ) -> None:
        """Family, text settings, encoder/VAE identity, then the transformer's input widths."""
        common.check_cache_origin(self, model, manifest, allow_other_weights=allow_other_weights)
        if transformer is not None:
            common.check_input_widths(manifest, transformer, text=TEXT, latents=LATENTS)

    # ---- weights -----------------------------------------------------------------------------------------------
    def save_lora(self, output_dir: str | Path, transformer: torch.nn.Module, lora_config: Any) -> Path:
        from diffusers import Flux2KleinPipeline

        return common.save_lora_with(Flux2KleinPipeline, output_dir, transformer, lora_config)

    def save_full(self, output_dir: str | Path, transformer: torch.nn.Module) -> Path:
        return common.save_full(output_dir, transformer)

    # ---- sampling ----------------------------------------------------------------------------------------------
    def pixel_multiple(self, model: Flux2KleinOptions) -> int:
        """The VAE's downsampling × the 2×2 latent patch (16 for Klein); reads only the VAE's config."""
        from diffusers import AutoencoderKLFlux2

        return common.pixel_multiple(AutoencoderKLFlux2, model, example=HUB_EXAMPLE)

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
        """One image from precomputed (1, L, D) prompt embeddings with the pipeline's own sampler; equals
        `pipe(prompt=...)` for the prompt the embeddings came from. The "" prompt's embeddings (`negative`) are
        used when guidance_scale > 1 (real CFG)."""
        embeds = cond[TEXT]
        with common.transformer_in(encoders, transformer):
            out = encoders(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative[TEXT] if negative is not None and guidance_scale > 1 else None,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                max_sequence_length=embeds.shape[1],
                output_type=output_type,
            )
        return out.images[0]

    def sampling_pipeline(
        self,
        model: Flux2KleinOptions,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        transformer: str | None = None,
        lora: str | None = None,
    ) -> Any:
        from diffusers import Flux2KleinPipeline

        return common.sampling_pipeline(self, Flux2KleinPipeline, model, dtype=dtype, device=device,
                                        transformer=transformer, lora=lora, example=HUB_EXAMPLE)  # fmt: skip

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        model: Flux2KleinOptions,
        *,
        generators: list[torch.Generator],
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        output_type: str = "pil",
    ) -> list[Any]:
        one = len(prompts) == 1
        out = pipe(
            prompt=prompts[0] if one else prompts,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators[0] if one else generators,
            max_sequence_length=model.max_sequence_length,
            text_encoder_out_layers=tuple(model.text_encoder_layers),
            output_type=output_type,
        )
        return list(out.images)

    # ---- autoencoder (optional capability: `flowtrain autoencoder`) ---------------------------------------------
    def build_autoencoder(self, model: Any) -> torch.nn.Module:
        from flowtrain.models.flux2_klein.autoencoder.build import build_vae

        return build_vae(model)

    def autoencoder_pixel_multiple(self, model: Any) -> int:
        from flowtrain.models.flux2_klein.autoencoder.build import pixel_multiple

        return pixel_multiple(model)

    def finish_autoencoder(
        self, vae: torch.nn.Module, dataset: Any, cfg: Any, *, device: Any, progress: bool = True
    ) -> dict[str, Any]:
        from flowtrain.models.flux2_klein.autoencoder.stats import finish

        return finish(vae, dataset, cfg, device=device, progress=progress)

    # ---- tiny --------------------------------------------------------------------------------------------------
    def save_tiny_pipeline(self, path: str | Path, seed: int = 0) -> Path:
        from flowtrain.models.flux2_klein.tiny import save_tiny_pipeline

        return save_tiny_pipeline(path, seed=seed)


def warn_if_distilled(config: Any) -> None:
    """Klein's distilled checkpoints are step-distilled for inference; fine-tuning should start from `-base`."""
    if bool(getattr(config, "is_distilled", False) or (isinstance(config, dict) and config.get("is_distilled"))):
        log.warning(
            "This Klein checkpoint is distilled (is_distilled=true). Train the -base checkpoints "
            f"(e.g. {HUB_EXAMPLE}); a LoRA trained on a distilled model transfers poorly."
        )
