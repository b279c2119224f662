"""Wan 2.1 / 2.2 text-to-video: everything that must match diffusers' `WanPipeline` exactly (pipelines/wan/).

  text   : `prompt_clean` (ftfy if installed, HTML unescape, whitespace), UMT5 `last_hidden_state` with the
           tokenizer's attention mask, cut to each prompt's true length (`_get_t5_prompt_embeds`) → cached per row as
           (L_i, 4096); training zero-pads every row back to max_sequence_length, and the transformer gets the padded
           (B, L, D) with no mask, as the pipeline feeds it
  video  : pixels (B, 3, F, H, W) in [-1, 1] (an image is F = 1) → AutoencoderKLWan posterior (B, 16, (F-1)/4+1,
           H/8, W/8) → (z - latents_mean) * (1 / latents_std) → tokens (B, F'·H'·W', 16), one per latent voxel (the
           transformer patchifies (1, 2, 2) itself)
  model  : x_σ = (1-σ)·x0 + σ·ε, target ε - x0, `timestep = 1000·σ`: the pipeline's scheduler (UniPC with flow
           sigmas) hands the transformer t = σ · num_train_timesteps (floored to an integer at inference; training
           keeps σ continuous); no guidance embedding; real CFG with the empty negative prompt (guidance_scale 5.0)
  shift  : static: the scheduler config's `flow_shift` (3.0 for Wan2.1-T2V-1.3B-Diffusers), whatever the size
  experts: Wan 2.2 A14B pipelines carry `transformer_2` and `boundary_ratio`: `transformer` denoises t ≥ boundary
           (high noise), `transformer_2` the rest. `model.expert` picks the one to train; its σ range is the only one
           drawn (`sigma_range`), its LoRA file is named after it, and sampling puts it in its own slot.

The pipeline is the reference; where it has a method for a step (`encode_prompt`, its sampler), that method is
called, so the cache and validation videos are the pipeline's by construction.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from flowtrain.models import common
from flowtrain.models.base import Column
from flowtrain.models.paths import read_model_index
from flowtrain.models.wan import PIPELINE_CLASSES
from flowtrain.models.wan import latents as L
from flowtrain.models.wan.export import LAYOUT as EXPORT_LAYOUT
from flowtrain.models.wan.options import WanOptions

log = logging.getLogger(__name__)

EXAMPLE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
TEXT = "prompt_embeds"  # cached per row at its true length; its batch mask is `prompt_embeds_mask`
IMAGE = "latent_moments"
HIDDEN = "encoder_hidden_states"  # the transformer's argument name
SLOTS = {None: "transformer", "high_noise": "transformer", "low_noise": "transformer_2"}

# LoRA targets (WanTransformer3DModel: N identical blocks of self-attention, cross-attention, feed-forward).
# attention: both attentions' q/k/v/out; +ff: the feed-forward; all: every other Linear too (the blocks' none
# besides these; the patch/text/time embedders and the output projection).
_ATTN = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
_FF = r"blocks\.\d+\.ffn\.(net\.0\.proj|net\.2)"
_REST = (
    r"condition_embedder\.(time_embedder\.linear_[12]|text_embedder\.linear_[12])|condition_embedder\.time_proj"
    r"|proj_out"
)
LORA_PRESETS: dict[str, list[str]] = {
    "attention": [_ATTN],
    "attention+ff": [_ATTN, _FF],
    "all": [_ATTN, _FF, _REST],
}


def lora_file_name(expert: str | None) -> str:
    """`pytorch_lora_weights.safetensors`, or for a Wan 2.2 expert `pytorch_lora_weights_<expert>.safetensors`, so
    the two LoRAs of a two-expert model cannot be mixed up (the low-noise one loads with
    `load_lora_weights(..., load_into_transformer_2=True)`)."""
    return "pytorch_lora_weights.safetensors" if expert is None else f"pytorch_lora_weights_{expert}.safetensors"


_INDEX: dict[tuple[str, str | None], Mapping[str, Any]] = {}


def _model_index(pretrained: str, revision: str | None, *, download: bool = False) -> Mapping[str, Any]:
    """model_index.json, read once per model (`sigma_range` asks for the boundary at every step); {} while it cannot
    be read (a hub id not downloaded yet, unless `download`), and then asked again next time."""
    key = (pretrained, revision)
    if key not in _INDEX:
        index = read_model_index(pretrained, revision, download=download)
        if not index:
            return {}
        _INDEX[key] = MappingProxyType(index)
    return _INDEX[key]


def boundary_ratio(model: WanOptions) -> float | None:
    """The pipeline's `boundary_ratio` (Wan 2.2 A14B: where the experts split), from model_index.json; None for a
    one-transformer pipeline or when the index cannot be read."""
    ratio = _model_index(model.pretrained, model.revision).get("boundary_ratio")
    return None if ratio is None else float(ratio)


def check_expert(model: WanOptions) -> float | None:
    """`model.expert` against the pipeline: required with two experts, refused with one. Returns the boundary.
    Also refuses a pipeline with `expand_timesteps` (Wan 2.2 TI2V-5B: per-token timesteps and a first-frame
    condition), whose training path is not the one proved here."""
    # An expert needs the boundary: fetch the index of a hub id if it is not cached yet (honours HF_HUB_OFFLINE).
    index = _model_index(model.pretrained, model.revision, download=model.expert is not None)
    if model.expert is not None and not index:
        raise ValueError(
            f"model.expert={model.expert!r} needs model.pretrained={model.pretrained!r}'s model_index.json (its "
            "boundary_ratio), which could not be read: point model.pretrained at the whole pipeline folder or hub id"
        )
    if index.get("expand_timesteps"):
        raise ValueError(
            f"model.pretrained={model.pretrained!r} is a Wan 2.2 TI2V pipeline (expand_timesteps: true in "
            "model_index.json); flowtrain's wan family trains the text-to-video pipelines (Wan 2.1 T2V, Wan 2.2 T2V "
            "A14B) only"
        )
    ratio = boundary_ratio(model)
    if ratio is not None and model.expert is None:
        raise ValueError(
            f"model.pretrained={model.pretrained!r} has two experts (transformer_2, boundary_ratio={ratio}): set "
            "model.expert to high_noise (transformer, σ ≥ boundary) or low_noise (transformer_2) and train each in "
            "its own run"
        )
    if ratio is None and model.expert is not None and index:
        raise ValueError(
            f"model.expert={model.expert!r}, but model.pretrained={model.pretrained!r} has one transformer (no "
            "boundary_ratio in model_index.json): leave model.expert unset for Wan 2.1"
        )
    return ratio


def _padded(cond: Mapping[str, torch.Tensor], length: int) -> torch.Tensor:
    """(B, length, D) text for the transformer / pipeline from `conditioning` output or cache columns."""
    if HIDDEN in cond:
        return cond[HIDDEN]
    return L.pad_text(cond[TEXT], cond.get(f"{TEXT}_mask"), length)


@contextlib.contextmanager
def _expert_in(pipe: Any, transformer: torch.nn.Module, slot: str) -> Iterator[Any]:
    """`pipe` with `transformer` in `slot` (transformer / transformer_2) for the block."""
    before = getattr(pipe, slot, None)
    pipe.register_modules(**{slot: transformer})
    try:
        yield pipe
    finally:
        pipe.register_modules(**{slot: before})


class Wan:
    """`ModelFamily` for `WanPipeline` text-to-video checkpoints (Wan 2.1 T2V 1.3B / 14B, Wan 2.2 T2V A14B)."""

    name = "wan"
    pipeline_classes = PIPELINE_CLASSES
    options = WanOptions
    lora_presets = LORA_PRESETS
    export_layout = EXPORT_LAYOUT  # `flowtrain export`'s diffusers → original table (export.py)
    # WanPipeline.__call__'s num_inference_steps / guidance_scale (real CFG against the empty negative prompt).
    sampling_defaults: Mapping[str, float | int] = MappingProxyType({"steps": 50, "guidance_scale": 5.0})
    tiny_options: Mapping[str, Any] = {"max_sequence_length": 32, "num_frames": 9}
    tiny_resolution = 32  # 8× VAE → 4×4 latents → a 2×2 grid of (1, 2, 2) patches per latent frame

    # ---- loading ---------------------------------------------------------------------------------------------
    def load_encoders(self, model: WanOptions, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        """The pipeline without the transformer being trained. For a Wan 2.2 expert the other expert stays loaded,
        so validation samples the whole two-stage video."""
        from diffusers import WanPipeline

        slot = SLOTS[model.expert]
        other = {"transformer": None, "transformer_2": None}
        if check_expert(model) is not None:
            del other["transformer_2" if slot == "transformer" else "transformer"]
        pipe = common.load_pipeline(WanPipeline, model, dtype=dtype, example=EXAMPLE, **other)
        pipe.set_progress_bar_config(disable=True)
        # `sample` has no `model` argument: what it needs of the options travels with the pipeline.
        pipe.flowtrain_options = model
        return pipe.to(device)

    def load_transformer(self, model: WanOptions, *, dtype: torch.dtype, weights: str | None = None) -> torch.nn.Module:
        """`transformer` of the pipeline, or `transformer_2` for `model.expert: low_noise`; or from `weights`."""
        from diffusers import WanTransformer3DModel

        check_expert(model)
        key = "model.dit" if weights is not None and weights == model.dit else "weights"
        transformer = common.load_component(WanTransformer3DModel, model.pretrained, SLOTS[model.expert], dtype=dtype,
                                            weights=weights, key=key, revision=model.revision)  # fmt: skip
        # `save_lora` gets only the module: the expert it is travels with it, to name the LoRA file after it.
        transformer.flowtrain_wan_expert = model.expert
        return transformer

    def identity(self, model: WanOptions) -> dict[str, str]:
        return common.component_identity(model.pretrained, ["text_encoder", "tokenizer", "vae"], model.revision)

    # ---- precompute ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_resolution(pipe: Any, resolution: int) -> None:
        multiple = pipe.vae_scale_factor_spatial * 2  # the VAE's 8× × the transformer's 2×2 spatial patch
        if resolution % multiple:
            raise ValueError(
                f"resolution {resolution} is not a multiple of {multiple} (VAE factor × 2×2 patch): use e.g. "
                f"{max(multiple, resolution // multiple * multiple)}"
            )

    def cache_columns(self, encoders: Any, model: WanOptions, *, resolution: int, frames: int = 1) -> list[Column]:
        """Latent moments (2·16, (frames-1)/4+1, res/8, res/8) and the text rows (L_i ≤ max_sequence_length,
        4096). `frames`: the clip length precompute encodes (1 for images)."""
        self._check_resolution(encoders, resolution)
        z, side = encoders.vae.config.z_dim, resolution // encoders.vae_scale_factor_spatial
        latent_frames = (frames - 1) // encoders.vae_scale_factor_temporal + 1
        width = encoders.text_encoder.config.d_model
        return [
            Column(IMAGE, "float32", (2 * z, latent_frames, side, side), "image"),
            Column(TEXT, model.dtype, (None, width), "text", max_length=model.max_sequence_length),
        ]

    def cache_settings(self, model: WanOptions) -> dict[str, Any]:
        return {"max_sequence_length": model.max_sequence_length}

    def check_options(self, encoders: Any, model: WanOptions) -> None:
        limit = encoders.tokenizer.model_max_length
        if model.max_sequence_length > limit:
            raise ValueError(
                f"model.max_sequence_length={model.max_sequence_length} exceeds the tokenizer's limit {limit}; set "
                "it to at most that (WanPipeline's default is 512)"
            )

    def encode_prompts(
        self, encoders: Any, prompts: list[str], model: WanOptions
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """{"prompt_embeds": B tensors (L_i, D)}: the pipeline's `encode_prompt`, each row cut to its true length
        (the tokenizer's attention mask on the cleaned prompt, as `_get_t5_prompt_embeds` counts it)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        n = model.max_sequence_length
        with torch.no_grad():
            embeds, _ = encoders.encode_prompt(
                prompts, do_classifier_free_guidance=False, max_sequence_length=n, device=encoders.text_encoder.device
            )
        mask = encoders.tokenizer(
            [prompt_clean(p) for p in prompts], padding="max_length", max_length=n, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        ).attention_mask  # fmt: skip
        return {TEXT: [row[:length].clone() for row, length in zip(embeds, mask.gt(0).sum(1).tolist(), strict=True)]}

    def preprocess_images(
        self, encoders: Any, images: list[Any], *, resolution: int, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """PIL RGB → (B, 3, res, res) in [-1, 1], or (B, 3, H, W) for `size` = (H, W) (an aspect-ratio bucket): the
        pipeline's `VideoProcessor` (a `VaeImageProcessor`, which scales to cover before it centre-crops) in crop
        mode, the pixels WanImageToVideoPipeline feeds its VAE for an image."""
        height, width = size if size is not None else (resolution, resolution)
        self._check_resolution(encoders, height)
        self._check_resolution(encoders, width)
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return encoders.video_processor.preprocess(images, height=height, width=width, resize_mode="crop")

    def encode_pixels(self, encoders: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) images or (B, 3, F, H, W) clips → {"latent_moments": (B, 32, (F-1)/4+1, H/8, W/8)}
        posterior mean ‖ logvar, float32."""
        vae = encoders.vae
        x = pixels.unsqueeze(2) if pixels.ndim == 4 else pixels  # an image is a one-frame video
        with torch.no_grad():
            dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
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
        """(x0 (B, F'·H'·W', 16), latent grid (F', H', W'))."""
        return L.training_latents(batch[IMAGE], norm["latents_mean"], norm["latents_std"], generator)

    def conditioning(self, batch: Mapping[str, torch.Tensor], model: WanOptions) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": (B, max_sequence_length, D)}, zero past each row's true length."""
        return {HIDDEN: _padded(batch, model.max_sequence_length)}

    def drop_captions(
        self, cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], drop: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Rows where `drop` is True get the empty prompt's padded embedding (one fixed shape: nothing re-pads)."""
        return common.drop_fixed(cond, empty, drop)

    def predict(
        self,
        transformer: torch.nn.Module,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """Velocity (B, N, 16): the transformer call of the pipeline's denoising loop, on the 5-D latent."""
        out = transformer(
            hidden_states=L.from_tokens(x_t, shape),
            # t = 1000·σ, the scale the pipeline's scheduler hands over; float32, since a bf16 t near 1000 would be
            # rounded to steps of 4 (the embedder casts the sinusoidal features to its own dtype itself).
            timestep=sigma.float() * 1000.0,
            encoder_hidden_states=cond[HIDDEN],
            return_dict=False,
        )[0]
        return L.to_tokens(out)[0]

    def resolution_shift(self, model: WanOptions, num_tokens: int) -> float:
        """The scheduler config's static `flow_shift` (UniPC with flow sigmas, Wan's scheduler; 3.0 for
        Wan2.1-T2V-1.3B): Wan does not shift with resolution. A FlowMatchEuler scheduler swapped in: its shift."""
        cfg = common.scheduler_config(model)
        if cfg.get("use_flow_sigmas") and not cfg.get("use_dynamic_shifting"):
            return float(cfg.get("flow_shift", 1.0))
        return common.scheduler_shift(num_tokens, cfg)

    def sigma_range(self, model: WanOptions) -> tuple[float, float] | None:
        """The σ range to train: a Wan 2.2 expert's own (`latents.expert_sigma_range`), else None (all of it)."""
        ratio = check_expert(model)
        return None if ratio is None else L.expert_sigma_range(model.expert or "", ratio)

    def check_cache(
        self,
        model: WanOptions,
        manifest: Any,
        transformer: torch.nn.Module | None = None,
        *,
        allow_other_weights: bool = False,
    ) -> None:
        """Family, cache settings, encoder/VAE identity, the scheduler config the shift and the sampler read, the
        expert choice, then the transformer's input widths (text_dim, in_channels)."""
        common.check_cache_origin(self, model, manifest, allow_other_weights=allow_other_weights)
        common.scheduler_config(model)
        check_expert(model)
        if transformer is not None:
            text_dim, latent_ch = manifest.column(TEXT).shape[-1], manifest.column(IMAGE).shape[0] // 2
            tc = transformer.config
            if tc.text_dim != text_dim or tc.in_channels != latent_ch:
                raise ValueError(
                    f"{manifest.where}: cached text width {text_dim} / latent channels {latent_ch} do not fit the "
                    f"transformer (text_dim={tc.text_dim}, in_channels={tc.in_channels}): wrong model for this cache"
                )

    # ---- weights ---------------------------------------------------------------------------------------------
    def save_lora(self, output_dir: str | Path, transformer: torch.nn.Module, lora_config: Any) -> Path:
        """`pytorch_lora_weights.safetensors` (diffusers format with the adapter metadata); for a Wan 2.2 expert
        `pytorch_lora_weights_<expert>.safetensors` (`lora_file_name`)."""
        from diffusers import WanPipeline
        from peft.utils import get_peft_model_state_dict

        name = lora_file_name(getattr(transformer, "flowtrain_wan_expert", None))
        WanPipeline.save_lora_weights(
            str(output_dir),
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            transformer_lora_adapter_metadata=lora_config.to_dict(),
            weight_name=name,
        )
        return Path(output_dir) / name

    def save_full(self, output_dir: str | Path, transformer: torch.nn.Module) -> Path:
        return common.save_full(output_dir, transformer)

    # ---- sampling --------------------------------------------------------------------------------------------
    def pixel_multiple(self, model: WanOptions) -> int:
        """VAE factor (8: `scale_factor_spatial`, or 2 ** len(temperal_downsample)) × the 2×2 patch: 16."""
        from diffusers import AutoencoderKLWan

        def factor(cfg: Mapping[str, Any]) -> int:
            return int(cfg.get("scale_factor_spatial") or 2 ** len(cfg["temperal_downsample"]))

        return common.pixel_multiple(AutoencoderKLWan, model, factor, example=EXAMPLE)

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
        """One video (a list of PIL frames; or as `output_type` asks, "np": (F, H, W, 3)) of `model.num_frames`
        frames from cached conditioning (batch of 1) with the pipeline's own sampler: `prompt_embeds`, and with
        guidance_scale > 1 real CFG against `negative` (the empty prompt). Equals `generate` for the same prompt."""
        model: WanOptions = encoders.flowtrain_options
        n = model.max_sequence_length
        text = {"prompt_embeds": _padded(cond, n)}
        if guidance_scale > 1 and negative is not None:
            text["negative_prompt_embeds"] = _padded(negative, n)
        else:
            guidance_scale = 1.0  # no negative: the pipeline would encode "" itself; CFG is off without one
        with _expert_in(encoders, transformer, SLOTS[model.expert]) as pipe:
            return self._call(pipe, text, model, guidance_scale, height=height, width=width, steps=steps,
                              generator=generator, output_type=output_type)  # fmt: skip

    @staticmethod
    def _call(pipe: Any, text: dict[str, Any], model: WanOptions, guidance_scale: float, *, height: int, width: int,
              steps: int, generator: torch.Generator, output_type: str) -> Any:  # fmt: skip
        """One video from the pipeline's sampler; `sample` and `generate` differ only in `text`."""
        return pipe(
            **text,
            height=height,
            width=width,
            num_frames=model.num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
            max_sequence_length=model.max_sequence_length,
        ).frames[0]

    def sampling_pipeline(
        self,
        model: WanOptions,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        transformer: str | None = None,
        lora: str | None = None,
    ) -> Any:
        """The pipeline with a full fine-tune / `model.dit` in the trained expert's slot and/or the LoRA loaded
        into it (`load_into_transformer_2=True` for the low-noise expert, as diffusers documents)."""
        from diffusers import WanPipeline

        slot = SLOTS[model.expert]
        weights = transformer or model.dit
        parts = {} if weights is None else {slot: self.load_transformer(model, dtype=dtype, weights=weights)}
        pipe = common.load_pipeline(WanPipeline, model, dtype=dtype, example=EXAMPLE, **parts)
        if lora is not None:
            from flowtrain.weights_check import lora_file

            file = str(lora_file(lora))  # a run folder holds the file under its expert's name, not diffusers' default
            if slot == "transformer":
                common.load_lora(pipe, file, model.pretrained)
            else:
                pipe.load_lora_weights(file, use_safetensors=True, load_into_transformer_2=True)
                pipe.transformer_2.eval()  # peft's injected modules start in training mode (dropout)
        pipe.set_progress_bar_config(disable=True)
        pipe.flowtrain_options = model
        return pipe.to(device)

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        model: WanOptions,
        *,
        generators: list[torch.Generator],
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        output_type: str = "pil",
    ) -> list[Any]:
        """One video per prompt (each its own pipeline call); guidance_scale > 1: real CFG with the empty negative
        prompt, as `sample` does."""
        scale = guidance_scale if guidance_scale > 1 else 1.0
        kw = {"height": height, "width": width, "steps": steps, "output_type": output_type}
        return [
            self._call(
                pipe, {"prompt": p, "negative_prompt": "" if scale > 1 else None}, model, scale, generator=g, **kw
            )  # fmt: skip
            for p, g in zip(prompts, generators, strict=True)
        ]

    # ---- autoencoder (optional capability: `flowtrain autoencoder`; autoencoder.py) -----------------------------
    def build_autoencoder(self, model: Any) -> torch.nn.Module:
        from flowtrain.models.wan.autoencoder import build_vae

        return build_vae(model)

    def autoencoder_pixel_multiple(self, model: Any) -> int:
        from flowtrain.models.wan.autoencoder import pixel_multiple

        return pixel_multiple(model)

    def finish_autoencoder(
        self, vae: torch.nn.Module, dataset: Any, cfg: Any, *, device: Any, progress: bool = True
    ) -> dict[str, Any]:
        from flowtrain.models.wan.autoencoder import finish

        return finish(vae, dataset, cfg, device=device, progress=progress)

    # ---- tiny ------------------------------------------------------------------------------------------------
    def save_tiny_pipeline(self, path: str | Path, seed: int = 0) -> Path:
        from flowtrain.models.wan.tiny import save_tiny_pipeline

        return save_tiny_pipeline(path, seed=seed)


__all__ = ["LORA_PRESETS", "Wan", "lora_file_name"]
