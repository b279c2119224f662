"""FLUX.1 (`FluxPipeline` + `FluxTransformer2DModel`): everything that must match diffusers' pipeline exactly.

Reference: diffusers `pipelines/flux/pipeline_flux.py` (prompt encoding, ids, guidance, sampler, dynamic shift) and
`examples/dreambooth/train_dreambooth_lora_flux.py` (the training step).
  text     : CLIP-L `pooler_output` (B, 768) → `pooled_projections`; T5 last hidden state padded to
             max_sequence_length (512) with no mask → `encoder_hidden_states` (B, L, 4096). Both cached; caption
             dropout swaps both for the "" prompt's.
  image    : VAE posterior → (z - shift_factor) · scaling_factor → 2×2 packed (B, h·w, 64); ids (0, row, col),
             text ids zeros (L, 3), both 2-D.
  model    : x_σ = (1-σ)·x0 + σ·ε, target ε - x0; `timestep=σ` (= the pipeline's t/1000; the transformer multiplies
             by 1000); `guidance` = model.guidance (B,) for guidance-distilled checkpoints (dev), None otherwise.
             The guidance value travels in the conditioning (`conditioning` sees the options, `predict` does not).
  sampling : the pipeline's own loop; `guidance_scale` is the distilled guidance value (no real CFG pass).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from flowtrain.models import common
from flowtrain.models.base import Column
from flowtrain.models.flux1 import PIPELINE_CLASSES
from flowtrain.models.flux1 import latents as L
from flowtrain.models.flux1.export import LAYOUT as EXPORT_LAYOUT
from flowtrain.models.flux1.options import Flux1Options
from flowtrain.models.flux1.tiny import TINY_RESOLUTION, TINY_SEQ

log = logging.getLogger(__name__)

HUB_EXAMPLE = "black-forest-labs/FLUX.1-dev"
TEXT_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds")
LATENT_COLUMN = "latent_moments"
GUIDANCE = "guidance"  # conditioning key: (B,) float32 model.guidance, only for guidance-embedding checkpoints
# What identifies the cache's inputs: tokenizers and text encoders (the text columns) and the VAE (the latents).
ENCODER_COMPONENTS = ["tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae"]

# LoRA targets, by the diffusers module names of FluxTransformer2DModel. Double blocks: joint attention (image
# to_q/k/v/to_out.0, text add_*_proj/to_add_out), feed-forwards ff / ff_context (net.0.proj, net.2), AdaLN
# modulation norm1(_context).linear. Single blocks: attention to_q/k/v (no output projection of its own), the MLP
# input proj_mlp, and proj_out, the one output projection of attention ‖ MLP (BFL's `linear2`; BFL fuses
# to_q/k/v + proj_mlp into `linear1`), modulation norm.linear.
#   attention     every attention projection; single blocks' proj_out counts as their attention output
#   attention+ff  + every feed-forward / MLP Linear (diffusers' dreambooth defaults ⊂ this)
#   all           + AdaLN modulation, input embedders, time / guidance / pooled-text embedding MLPs, output layer
_DOUBLE_ATTN = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_SINGLE_ATTN = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_out)"
_DOUBLE_FF = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
_SINGLE_MLP = r"single_transformer_blocks\.\d+\.proj_mlp"
_MODULATION = r"(transformer_blocks\.\d+\.norm1(_context)?|single_transformer_blocks\.\d+\.norm)\.linear"
_GLOBAL = r"x_embedder|context_embedder|proj_out|norm_out\.linear|time_text_embed\.\w+\.linear_[12]"
LORA_PRESETS: dict[str, list[str]] = {
    "attention": [_DOUBLE_ATTN, _SINGLE_ATTN],
    "attention+ff": [_DOUBLE_ATTN, _SINGLE_ATTN, _DOUBLE_FF, _SINGLE_MLP],
    "all": [_DOUBLE_ATTN, _SINGLE_ATTN, _DOUBLE_FF, _SINGLE_MLP, _MODULATION, _GLOBAL],
}


def cache_columns_for(
    *,
    t5_dim: int,
    clip_dim: int,
    latent_channels: int,
    vae_factor: int,
    max_sequence_length: int,
    resolution: int,
    text_dtype: str,
) -> list[Column]:
    """The cache columns from the components' sizes (FLUX.1-dev: t5_dim 4096, clip_dim 768, 16 latent channels,
    vae_factor 8). All fixed-shape: FLUX.1 attends to every padded T5 token, so the full sequence is stored."""
    side = resolution // vae_factor
    return [
        Column("prompt_embeds", text_dtype, (max_sequence_length, t5_dim), "text"),  # type: ignore[arg-type]
        Column("pooled_prompt_embeds", text_dtype, (clip_dim,), "text"),  # type: ignore[arg-type]
        Column(LATENT_COLUMN, "float32", (2 * latent_channels, side, side), "image"),
    ]


@functools.lru_cache(maxsize=16)
def _guidance_embeds(pretrained: str, revision: str | None, dit: str | None) -> bool:
    """Whether the transformer `load_transformer(model, weights=model.dit)` returns has a guidance embedding, from
    its config.json alone: model.dit's when it is a diffusers folder (its own config), else model.pretrained's
    transformer (a single .safetensors file takes that architecture too). Read once per model."""
    from diffusers import FluxTransformer2DModel

    folder = Path(dit).expanduser() if dit is not None else None
    if folder is not None and folder.is_dir():
        sub = common.subfolder_if_exists(folder, "transformer")
        cfg = FluxTransformer2DModel.load_config(str(folder), subfolder=sub)
    else:
        cfg = FluxTransformer2DModel.load_config(pretrained, subfolder="transformer", revision=revision)
    return bool(cfg.get("guidance_embeds", False))


def guidance_embeds(model: Flux1Options) -> bool:
    """Whether the configured checkpoint takes a guidance value (FLUX.1-dev: yes; schnell: no); configs only."""
    return _guidance_embeds(model.pretrained, model.revision, model.dit)


def _norm_value(v: Any) -> float:
    return float(torch.as_tensor(v).reshape(-1)[0])


class Flux1:
    """`ModelFamily` for `FluxPipeline` checkpoints (FLUX.1-dev / -schnell and fine-tunes in diffusers layout)."""

    name = "flux1"
    pipeline_classes = PIPELINE_CLASSES
    options = Flux1Options
    lora_presets = LORA_PRESETS
    export_layout = EXPORT_LAYOUT  # `flowtrain export`'s diffusers → original table (export.py)
    # FluxPipeline.__call__'s num_inference_steps / guidance_scale (FLUX.1-dev's). guidance_scale: the value fed to the
    # guidance embedding of guidance-distilled checkpoints (no unconditional pass); schnell ignores it (and samples in
    # about 4 steps).
    sampling_defaults: Mapping[str, float | int] = MappingProxyType({"steps": 28, "guidance_scale": 3.5})
    tiny_options: Mapping[str, Any] = {"max_sequence_length": TINY_SEQ}
    tiny_resolution = TINY_RESOLUTION

    # ---- loading ---------------------------------------------------------------------------------------------
    def load_encoders(self, model: Flux1Options, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        """`FluxPipeline` without its transformer: CLIP-L + tokenizer, T5 + tokenizer, VAE, scheduler."""
        from diffusers import FluxPipeline

        pipe = common.load_pipeline(FluxPipeline, model, dtype=dtype, example=HUB_EXAMPLE, transformer=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def load_transformer(
        self, model: Flux1Options, *, dtype: torch.dtype, weights: str | None = None
    ) -> torch.nn.Module:
        """`FluxTransformer2DModel` of model.pretrained, or from `weights`: a pipeline / transformer folder, or one
        .safetensors file (BFL's flux1-dev.safetensors layout or diffusers'), with the architecture of
        model.pretrained."""
        from diffusers import FluxTransformer2DModel

        transformer = common.load_transformer(FluxTransformer2DModel, model, dtype=dtype, weights=weights)
        if not transformer.config.guidance_embeds:
            log.warning(
                "this FLUX.1 transformer has no guidance embedding (schnell-type, timestep-distilled): model.guidance "
                "is not used, and a LoRA trained on it may weaken its few-step sampling"
            )
        return transformer

    def identity(self, model: Flux1Options) -> dict[str, str]:
        return common.component_identity(model.pretrained, ENCODER_COMPONENTS, model.revision)

    # ---- precompute ------------------------------------------------------------------------------------------
    def cache_columns(self, encoders: Any, model: Flux1Options, *, resolution: int) -> list[Column]:
        common.check_resolution(encoders, resolution)
        return cache_columns_for(
            t5_dim=encoders.text_encoder_2.config.d_model,
            clip_dim=encoders.text_encoder.config.hidden_size,
            latent_channels=encoders.vae.config.latent_channels,
            vae_factor=encoders.vae_scale_factor,
            max_sequence_length=model.max_sequence_length,
            resolution=resolution,
            text_dtype=model.dtype,
        )

    def cache_settings(self, model: Flux1Options) -> dict[str, Any]:
        return {"max_sequence_length": model.max_sequence_length}

    def check_options(self, encoders: Any, model: Flux1Options) -> None:
        limit = encoders.tokenizer_2.model_max_length
        if model.max_sequence_length > limit:
            raise ValueError(
                f"model.max_sequence_length={model.max_sequence_length} exceeds the T5 tokenizer's "
                f"model_max_length {limit}; set model.max_sequence_length to at most {limit}"
            )

    def encode_prompts(self, encoders: Any, prompts: list[str], model: Flux1Options) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": (B, L, D_t5), "pooled_prompt_embeds": (B, D_clip)}: the pipeline's `encode_prompt`
        (the same prompt to CLIP and T5, as the pipeline does without `prompt_2`)."""
        with torch.no_grad():
            embeds, pooled, _ = encoders.encode_prompt(
                prompts,
                prompt_2=None,
                device=encoders.text_encoder_2.device,
                max_sequence_length=model.max_sequence_length,
            )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def preprocess_images(
        self, encoders: Any, images: list[Any], *, resolution: int, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """PIL images → (B, 3, res, res) in [-1, 1] with the pipeline's `VaeImageProcessor` in "crop" mode, which
        (unlike FLUX.2's processor) scales to cover res×res (Lanczos, aspect kept) before centre-cropping."""
        return common.preprocess_images(encoders, images, resolution, size=size)

    def encode_pixels(self, encoders: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) → {"latent_moments": (B, 2C, H/f, W/f)} posterior mean ‖ logvar (clamped as diffusers
        does), float32."""
        vae = encoders.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return {LATENT_COLUMN: torch.cat([dist.mean, dist.logvar], dim=1).float()}

    def latent_norm(self, encoders: Any) -> dict[str, list[float]]:
        cfg = encoders.vae.config
        return {"shift_factor": [float(cfg.shift_factor or 0.0)], "scaling_factor": [float(cfg.scaling_factor)]}

    # ---- training --------------------------------------------------------------------------------------------
    def training_latents(
        self,
        batch: Mapping[str, torch.Tensor],
        norm: Mapping[str, Any],
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """x0 (B, h·w, 4C) and the token grid (h, w) = (H/2, W/2) of the cached latents."""
        return L.training_latents(
            batch[LATENT_COLUMN], _norm_value(norm["shift_factor"]), _norm_value(norm["scaling_factor"]), generator
        )

    def conditioning(self, batch: Mapping[str, torch.Tensor], model: Flux1Options) -> dict[str, torch.Tensor]:
        """The two text columns, plus `guidance`: a (B,) float32 tensor of model.guidance when the checkpoint has a
        guidance embedding (decided from its config, see `guidance_embeds`), as the pipeline builds it."""
        cond = {k: batch[k] for k in TEXT_COLUMNS}
        if guidance_embeds(model):
            b = cond["prompt_embeds"].shape[0]
            cond[GUIDANCE] = torch.full((b,), model.guidance, dtype=torch.float32)
        return cond

    def drop_captions(
        self, cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], drop: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Dropped rows get the "" prompt's T5 embeddings *and* CLIP pooled vector; the guidance value stays."""
        return {**cond, **common.drop_fixed({k: cond[k] for k in TEXT_COLUMNS}, empty, drop)}

    def predict(
        self,
        transformer: torch.nn.Module,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """Velocity (B, N, 4C) for x_t (B, N, 4C) on the token grid `shape` = (h, w) at σ (B,).

        The transformer call of the pipeline's denoising loop: `timestep` σ (the pipeline passes t/1000 and the
        model multiplies by 1000), `guidance` the conditioning's (B,) float32 value (None when it has none: a
        checkpoint without guidance embedding), 2-D ids.
        """
        h, w = shape
        embeds = cond["prompt_embeds"].to(device=x_t.device, dtype=x_t.dtype)
        pooled = cond["pooled_prompt_embeds"].to(device=x_t.device, dtype=x_t.dtype)
        guidance = cond.get(GUIDANCE)
        img_ids, txt_ids = L.position_ids(h, w, embeds.shape[1], x_t.device)
        return transformer(
            hidden_states=x_t,
            timestep=sigma.to(device=x_t.device, dtype=x_t.dtype),
            guidance=None if guidance is None else guidance.to(device=x_t.device, dtype=torch.float32),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    def resolution_shift(self, model: Flux1Options, num_tokens: int) -> float:
        """s = e^μ with μ = `calculate_shift(num_tokens)` from the scheduler config (FLUX.1-dev: 64² tokens at
        1024 px → μ 1.15, s ≈ 3.16; 32² at 512 px → μ ≈ 0.63, s ≈ 1.88)."""
        return common.scheduler_shift(num_tokens, common.scheduler_config(model))

    def check_cache(
        self,
        model: Flux1Options,
        manifest: Any,
        transformer: torch.nn.Module | None = None,
        *,
        allow_other_weights: bool = False,
    ) -> None:
        """Family, T5 length, encoder/VAE identity, the scheduler config the shift and the sampler read; then the
        transformer's input widths, and that it has a guidance embedding exactly when `conditioning` (which reads the
        config) gives one."""
        common.check_cache_origin(self, model, manifest, allow_other_weights=allow_other_weights)
        common.scheduler_config(model)
        if transformer is None:
            return
        tc = transformer.config
        have = (
            manifest.column("prompt_embeds").shape[-1],
            manifest.column("pooled_prompt_embeds").shape[-1],
            manifest.column(LATENT_COLUMN).shape[0] // 2 * 4,
        )
        want = (tc.joint_attention_dim, tc.pooled_projection_dim, tc.in_channels)
        if have != want:
            raise ValueError(
                f"{manifest.where}: cached T5 width / CLIP width / packed latent channels {have} do not fit the "
                f"transformer (joint_attention_dim, pooled_projection_dim, in_channels = {want}): wrong model for this "
                "cache"
            )
        if bool(tc.guidance_embeds) != guidance_embeds(model):
            source = f"model.dit={model.dit!r}" if model.dit else f"model.pretrained={model.pretrained!r}"
            raise ValueError(
                f"the transformer has guidance_embeds={bool(tc.guidance_embeds)}, but the transformer config of "
                f"{source} says {not tc.guidance_embeds}, and the training guidance follows that config: give "
                "model.dit as a diffusers folder with its config.json, or a model.pretrained of the same kind"
            )

    # ---- weights -----------------------------------------------------------------------------------------------
    def save_lora(self, output_dir: str | Path, transformer: torch.nn.Module, lora_config: Any) -> Path:
        from diffusers import FluxPipeline

        return common.save_lora_with(FluxPipeline, output_dir, transformer, lora_config)

    def save_full(self, output_dir: str | Path, transformer: torch.nn.Module) -> Path:
        return common.save_full(output_dir, transformer)

    # ---- autoencoder (optional capability: `flowtrain autoencoder`) ---------------------------------------------
    def build_autoencoder(self, model: Any) -> torch.nn.Module:
        from flowtrain.models.flux1.autoencoder.build import build_vae

        return build_vae(model)

    def autoencoder_pixel_multiple(self, model: Any) -> int:
        from flowtrain.models.flux1.autoencoder.build import pixel_multiple

        return pixel_multiple(model)

    def finish_autoencoder(
        self, vae: torch.nn.Module, dataset: Any, cfg: Any, *, device: Any, progress: bool = True
    ) -> dict[str, Any]:
        from flowtrain.models.flux1.autoencoder.build import finish

        return finish(vae, dataset, cfg, device=device, progress=progress)

    # ---- sampling ----------------------------------------------------------------------------------------------
    def pixel_multiple(self, model: Flux1Options) -> int:
        """VAE downsampling × the 2×2 packing (16 for FLUX.1); reads the VAE's config only."""
        from diffusers import AutoencoderKL

        return common.pixel_multiple(AutoencoderKL, model, example=HUB_EXAMPLE)

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
        """One image (PIL; `output_type="np"`: an (H, W, 3) float array) from cached conditioning (batch of 1)
        through `FluxPipeline.__call__`, equal to the pipeline called with the prompt. `guidance_scale` is the
        distilled guidance (FLUX.1-dev's; ignored by checkpoints without it). `negative` is not used: FLUX.1's
        sampler runs no real-CFG pass by default."""
        embeds = cond["prompt_embeds"].to(transformer.device, transformer.dtype)
        pooled = cond["pooled_prompt_embeds"].to(transformer.device, transformer.dtype)
        with common.transformer_in(encoders, transformer) as pipe:
            out = pipe(
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
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
        model: Flux1Options,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        transformer: str | None = None,
        lora: str | None = None,
    ) -> Any:
        from diffusers import FluxPipeline

        return common.sampling_pipeline(self, FluxPipeline, model, dtype=dtype, device=device,
                                        transformer=transformer, lora=lora, example=HUB_EXAMPLE)  # fmt: skip

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        model: Flux1Options,
        *,
        generators: list[torch.Generator],
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        output_type: str = "pil",
    ) -> list[Any]:
        """One image per prompt (generator i draws prompt i's noise), from the pipeline's own prompt path."""
        out = pipe(
            prompt=list(prompts),
            generator=list(generators),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            max_sequence_length=model.max_sequence_length,
            output_type=output_type,
        )
        return list(out.images)

    # ---- tiny --------------------------------------------------------------------------------------------------
    def save_tiny_pipeline(self, path: str | Path, seed: int = 0) -> Path:
        from flowtrain.models.flux1.tiny import save_tiny_pipeline

        return save_tiny_pipeline(path, seed)
