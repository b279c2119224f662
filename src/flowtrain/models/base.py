"""The one seam between generic code and a model family.

Generic code (`data/`, `train/`, `sample.py`, validation, the CLI) never names a family: it asks the registry
(`flowtrain.models.get_family`) for the object behind `model.family` and speaks to it through `ModelFamily`
below. Everything that differs from one model family to the next lives behind it:

    options        its `model:` config keys (a `ModelOptions` subclass, validated with the rest of the config)
    loading        encoders + VAE (`load_encoders`), the transformer (`load_transformer`), a sampling pipeline
    precompute     prompts → named conditioning tensors, images → VAE moments; the cache columns it declares
    training       a cached batch → tokens x0 (B, N, C) + a token-grid shape of any rank; caption dropout;
                   `predict`; the resolution-dependent timestep shift
    weights        LoRA presets, LoRA / full-weights export; optionally its original layout (`ExportsOriginal`)
    sampling       validation images from cached conditioning; `flowtrain sample` from prompt strings
    compatibility  which cache fits which model (`check_cache`), in one place
    tiny           a randomly initialised pipeline folder for tests and demos (no downloads)

A batch, as the family sees it, is a dict of (B, ...) CPU tensors named after its declared columns; a
variable-length column `c` arrives padded to the batch's longest row with a (B, L_max) bool `c_mask`.

Video (docs/video.md): a family whose VAE encodes clips says so by taking a keyword `frames` in `cache_columns`
(`cache_columns(encoders, model, *, resolution, frames=1)`); image families keep the signature below and nothing
about them changes. When the raw shards hold videos, precompute cuts every raw row into clips of F = 4k+1 frames
(`dataset.video`; an image row is a one-frame video), runs each clip's F frames through `preprocess_images` and
hands `encode_pixels` a (B, 3, F, H, W) batch; `cache_columns` gets `frames=F`, and the image column's rows are
rank 4, e.g. (2C, (F-1)/4+1, H/8, W/8) moments; the loader stacks them to (B, 2C, F', H', W') and
`training_latents` returns an (f, h, w) token grid. Images alone take the image path, (B, 3, H, W) pixels and
`cache_columns` without `frames`, for every family. An image family is handed videos only as one-frame clips
(`dataset.video.frames: 1`), through that unchanged path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is imported only where tensors are made: the config layer must stay light
    import torch

    from flowtrain.config.model import ModelOptions
    from flowtrain.data.manifest import CacheManifest


class ModelPathError(FileNotFoundError):
    """A model path that is clearly local but missing or not a model folder; its message is complete as is."""


@dataclass(frozen=True)
class Column:
    """One tensor column of the latent cache, declared by the family.

    `shape` is the per-row shape; `None` as its first entry marks a variable-length axis: rows are stored at their
    own length and the reader pads each batch to its longest row, adding a (B, L_max) bool mask `{name}_mask`.
    `source` says which encoder fills it: "image" (the VAE) or "text" (the text encoders). `max_length`, for a
    variable-length column, is the longest a row can be: with `train.compile` every batch is padded to it, so the
    compiled graphs see one shape.
    """

    name: str
    dtype: Literal["float32", "bfloat16", "float16"]
    shape: tuple[int | None, ...]
    source: Literal["image", "text"]
    max_length: int | None = None

    @property
    def variable(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    def row_bytes(self, length: int | None = None) -> int:
        """Bytes of one row as stored (a variable-length row at `length`)."""
        dims = [length if d is None else d for d in self.shape]
        if any(d is None for d in dims):
            raise ValueError(f"column {self.name!r} is variable-length: give the row's length")
        return math.prod(dims) * (4 if self.dtype == "float32" else 2)

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "source": self.source}
        return d | ({"max_length": self.max_length} if self.max_length is not None else {})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Column:
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]), source=d["source"],
                   max_length=d.get("max_length"))  # fmt: skip


@runtime_checkable
class ModelFamily(Protocol):
    """Everything family-specific. One instance per family, stateless (safe to share across threads and ranks).

    `model` arguments are the validated `model:` section, an instance of this family's `options` class.
    Encoders (`load_encoders`) and pipelines are whatever object the family works with (a diffusers pipeline).
    """

    name: str
    """The `model.family` value: the name the family is registered under."""
    pipeline_classes: tuple[str, ...]
    """`_class_name`s in a pipeline's `model_index.json` that mean this family (for detection)."""
    options: type[ModelOptions]
    """This family's `model:` section (generic keys + its own), a pydantic model."""
    lora_presets: Mapping[str, Sequence[str]]
    """`lora.targets` presets → module-name regexes; every family has at least `attention`."""
    sampling_defaults: Mapping[str, float | int]
    """Read-only {"steps": int, "guidance_scale": float}: the reference pipeline's own `__call__` defaults for the
    step count and for what `sample` / `generate` take as `guidance_scale` (its meaning is the family's: real CFG,
    or a distilled guidance value; see the family's docs page), for `flowtrain sample` and validation to default to."""

    # ---- loading ---------------------------------------------------------------------------------------------
    def load_encoders(self, model: ModelOptions, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        """Text encoder(s), tokenizer(s) and VAE, on `device` (the pipeline without its transformer)."""
        ...

    def load_transformer(
        self, model: ModelOptions, *, dtype: torch.dtype, weights: str | None = None
    ) -> torch.nn.Module:
        """The transformer of `model.pretrained`, or from `weights` (a pipeline / transformer folder or a
        .safetensors file: `model.dit`, a distillation teacher); architecture from `model.pretrained`."""
        ...

    def identity(self, model: ModelOptions) -> dict[str, str]:
        """What identifies the encoders and the VAE of `model.pretrained`: per component, a hash of its config and
        a content hash of its weights, read from the files (no model is loaded). Components whose files are not
        available locally are left out."""
        ...

    # ---- precompute ------------------------------------------------------------------------------------------
    def cache_columns(self, encoders: Any, model: ModelOptions, *, resolution: int) -> list[Column]:
        """The columns a cache at this square `resolution` holds (image and text), with dtypes and shapes. A video
        family is called with `frames=F` too (clip length, 4k+1) and declares its latent column for it."""
        ...

    def cache_settings(self, model: ModelOptions) -> dict[str, Any]:
        """The options that change what precompute writes (e.g. text-encoder layers, sequence length); they go
        into the cache fingerprint and must match at training time."""
        ...

    def check_options(self, encoders: Any, model: ModelOptions) -> None:
        """Validate the options against the loaded encoders (e.g. layer indices against the encoder's depth);
        raises ValueError naming the key, the limit and the fix."""
        ...

    def encode_prompts(
        self, encoders: Any, prompts: list[str], model: ModelOptions
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Prompts → {text column: (B, *shape)} exactly as the reference pipeline's `encode_prompt`; a
        variable-length column comes as a list of B (L_i, ...) tensors."""
        ...

    def preprocess_images(
        self, encoders: Any, images: list[Any], *, resolution: int, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """PIL RGB images → (B, 3, res, res) pixels in [-1, 1] (or (B, 3, H, W) for `size` = (H, W), an
        aspect-ratio bucket), scaled to cover (aspect kept) and centre-cropped: what the pipeline's own image
        processor feeds its VAE in crop mode (`models.common.preprocess_images`). On the video path it is called once
        per clip with the clip's F frames (→ (F, 3, res, res))."""
        ...

    def encode_pixels(self, encoders: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) pixels → {image column: (B, *shape)} VAE posterior moments (mean ‖ logvar), float32. A video
        family (one whose `cache_columns` takes `frames`) receives (B, 3, F, H, W) clips instead (F frames in
        [-1, 1], the layout of diffusers' video VAEs) and returns (B, 2C, F', H', W') moments."""
        ...

    def latent_norm(self, encoders: Any) -> dict[str, list[float]]:
        """The statistics `training_latents` normalises with (e.g. the VAE's BatchNorm mean / std); the manifest
        carries them, so training never loads the VAE."""
        ...

    # ---- training --------------------------------------------------------------------------------------------
    def training_latents(
        self,
        batch: Mapping[str, torch.Tensor],
        norm: Mapping[str, torch.Tensor],
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """A cached batch → (x0 tokens (B, N, C), token-grid shape such as (h, w) or (f, h, w)).

        `generator` None: the posterior mode (the reference); else one draw mean + std·ε from it.
        """
        ...

    def conditioning(self, batch: Mapping[str, torch.Tensor], model: ModelOptions) -> dict[str, torch.Tensor]:
        """The conditioning tensors of a batch (text embeddings, pooled vectors, masks, and inputs the options
        set, such as a guidance value), as `predict` takes them. The keys may vary from batch to batch (e.g. a
        mask left out when no row is padded)."""
        ...

    def drop_captions(
        self, cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], drop: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Caption dropout: rows where `drop` (B,) is True get the empty prompt's conditioning (every tensor of it:
        embeddings, pooled vectors and masks). `empty` is `conditioning` of the cached empty prompt (batch of 1)."""
        ...

    def predict(
        self,
        transformer: torch.nn.Module,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """Velocity prediction (B, N, C) for noisy tokens x_t (B, N, C) at noise level σ (B,), in the
        transformer's own timestep convention."""
        ...

    def resolution_shift(self, model: ModelOptions, num_tokens: int) -> float:
        """The σ-shift factor s (σ' = sσ / (1 + (s-1)σ)) the family's sampler uses at `num_tokens` image tokens
        (`timesteps.shift_mode: resolution`)."""
        ...

    def check_cache(
        self,
        model: ModelOptions,
        manifest: CacheManifest,
        transformer: torch.nn.Module | None = None,
        *,
        allow_other_weights: bool = False,
    ) -> None:
        """Raise ValueError (naming the cache, the mismatch and the fix) unless the cache (a `CacheManifest`) was
        made for this model: family, cache settings, encoder/VAE identity (`allow_other_weights`: only warn about
        it), and (given the transformer) its input widths. `models.common.check_cache_origin` does all but the
        last."""
        ...

    # ---- weights -----------------------------------------------------------------------------------------------
    def save_lora(self, output_dir: str | Path, transformer: torch.nn.Module, lora_config: Any) -> Path:
        """Write the LoRA in diffusers format with its adapter metadata; returns the file."""
        ...

    def save_full(self, output_dir: str | Path, transformer: torch.nn.Module) -> Path:
        """Write the full transformer as a diffusers folder; returns it."""
        ...

    # ---- sampling ----------------------------------------------------------------------------------------------
    def pixel_multiple(self, model: ModelOptions) -> int:
        """Image sides must be multiples of this (VAE factor × latent patch); reads configs only."""
        ...

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
        """One image (PIL; or as `output_type` asks, e.g. "np" to compare at 1e-5) from precomputed conditioning
        (`encode_prompts` of one prompt as a batch of 1, a variable-length column padded with its `_mask` as the
        cache reader collates it) with the reference pipeline's sampler; equals the pipeline called with that
        prompt. `negative`: the empty prompt's, for real CFG. `guidance_scale` means what the family's pipeline
        means by it (real CFG, or a distilled guidance value)."""
        ...

    def sampling_pipeline(
        self,
        model: ModelOptions,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        transformer: str | None = None,
        lora: str | None = None,
    ) -> Any:
        """The full reference pipeline, with its transformer replaced by a full fine-tune's `transformer` folder or
        else by `model.dit` (what the run trained), and/or a LoRA file loaded (paths already checked by the caller);
        `models.common.sampling_pipeline` does it all."""
        ...

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        model: ModelOptions,
        *,
        generators: list[torch.Generator],
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        output_type: str = "pil",
    ) -> list[Any]:
        """One image per prompt (one generator each) from the pipeline's own prompt path."""
        ...

    # ---- tiny --------------------------------------------------------------------------------------------------
    def save_tiny_pipeline(self, path: str | Path, seed: int = 0) -> Path:
        """Write a tiny randomly initialised pipeline folder of this family (offline); returns `path`."""
        ...

    tiny_options: Mapping[str, Any]
    """`model:` options that fit the tiny pipeline (e.g. a short max_sequence_length)."""
    tiny_resolution: int
    """A square training resolution (pixels) that fits the tiny pipeline's VAE and patch size."""


@runtime_checkable
class TrainsAutoencoder(Protocol):
    """A family whose VAE `flowtrain autoencoder` can train (optional). The training itself (losses, GAN, EMA,
    checkpoints, samples) is generic (`flowtrain.autoencoder`); the family says only which VAE, and what it fits
    after training. `model` is an autoencoder config's `model:` section (`flowtrain.autoencoder.config`)."""

    name: str

    def build_autoencoder(self, model: Any) -> torch.nn.Module:
        """A randomly initialised VAE of this family with `model`'s architecture (or `model.pretrained`), float32.
        Its `encode(x).latent_dist` is a diagonal Gaussian and `decode(z).sample` the image, as in diffusers."""
        ...

    def autoencoder_pixel_multiple(self, model: Any) -> int:
        """Image sides must be multiples of this for a VAE of `model`'s architecture (down-sampling × patch)."""
        ...

    def finish_autoencoder(
        self, vae: torch.nn.Module, dataset: Any, cfg: Any, *, device: Any, progress: bool = True
    ) -> dict[str, Any]:
        """After training: fit what the family normalises latents with (when `cfg.stats.fit`), on `dataset`
        ((3, H, W) tensors in [-1, 1]); returns a JSON-able summary (written to latent_stats.json)."""
        ...


@runtime_checkable
class RestrictsTimesteps(Protocol):
    """A family whose model trains on part of the noise range only (e.g. one expert of a mixture split at a
    boundary timestep): optional. Training maps each drawn σ affinely onto the range."""

    name: str

    def sigma_range(self, model: ModelOptions) -> tuple[float, float] | None:
        """(lo, hi) within [0, 1] that σ is drawn from for `model`, or None for the whole range."""
        ...


@runtime_checkable
class ExportsOriginal(Protocol):
    """A family whose weights `flowtrain export` can write in the checkpoint's original layout (docs/export.md):
    optional. The layout is a table (`flowtrain.export.Layout`) declared in the family's `export.py`."""

    name: str
    export_layout: Any
    """`flowtrain.export.Layout`: its diffusers → original module table."""
