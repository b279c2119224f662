"""`flowtrain autoencoder` config: its own pydantic schema, loaded with the training config's YAML machinery
(`extends`, dotted overrides, errors that name the file and key) through `flowtrain.config.validate_config`.

The optimizer and LR-schedule sections are the training config's own classes, so both verbs read the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from flowtrain.config.schema import LrSchedulerConfig, OptimizerConfig, TrackingConfig
from flowtrain.config.section import Section


class AEModelConfig(Section):
    """Architecture of a randomly initialised `AutoencoderKLFlux2`, or an existing one to fine-tune.

    The spatial down-sampling factor is 2^(len(block_out_channels) - 1); FLUX.2 then patchifies 2×2, so an
    image side must be a multiple of 2^len(block_out_channels).
    """

    pretrained: str | None = Field(
        None,
        description="Start from this AutoencoderKLFlux2 folder (a `vae/` folder or a pipeline folder) instead of "
        "a random init; the architecture keys below are then ignored.",
    )
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    layers_per_block: int = Field(1, gt=0)
    latent_channels: int = Field(4, gt=0, description="FLUX.2 proper uses 32; patchify makes tokens 4× as wide.")
    norm_num_groups: int = Field(8, gt=0)
    mid_block_add_attention: bool = Field(False, description="Self-attention in the mid blocks (slow on CPU).")
    batch_norm_eps: float = Field(1e-4, gt=0)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> AEModelConfig:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry (not {bad})"
            )
        return self


class AEDataConfig(Section):
    raw_dir: str | None = Field(None, description="Raw shards written by `flowtrain prepare`.")
    resolution: int = Field(256, gt=0, description="Square training size (resize to cover, centre crop).")
    cache_decoded: bool = Field(
        False,
        description="Keep decoded images in memory after first use: much faster for small data sets, but costs "
        "N·3·R²·4 bytes (1,000 images at 256 px: 0.8 GB).",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader processes decoding images (0: in the training process).")


class AELossConfig(Section):
    """loss = rec(x̂, x) + β(step) · KL / (3·H·W), β ramping linearly from 0 to `kl_weight` over `kl_warmup_steps`.

    Dividing the summed KL by the number of pixel values puts β on the scale of LDM's `kl_weight` convention.
    """

    reconstruction: Literal["l1", "mse"] = "l1"
    kl_weight: float = Field(1e-6, ge=0, description="β after warm-up.")
    kl_warmup_steps: int = Field(0, ge=0, description="Steps of linear β warm-up from 0; 0 = β from the start.")


class AETrainConfig(Section):
    max_steps: int = Field(1000, gt=0)
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    max_grad_norm: float | None = Field(1.0, description="Clip the global grad norm; null disables.")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast (convs are often no faster).")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    device: str | None = Field(None, description="cuda / cpu; default cuda when available.")


class AEStatsConfig(Section):
    """Fit the VAE's BatchNorm statistics (the latent normalisation FLUX.2 applies) on the training data."""

    fit: bool = True
    max_images: int | None = Field(None, gt=0, description="Use at most this many images; null = all.")
    batch_size: int = Field(256, gt=0)


class AutoencoderConfig(Section):
    """The whole `flowtrain autoencoder` run."""

    kind: Literal["autoencoder"] = Field(
        "autoencoder", description="Marks the file as an autoencoder config (the shipped-config tests key on it)."
    )
    family: Literal["flux2_klein"] = Field(
        "flux2_klein", description="The model family whose VAE this trains (`flowtrain autoencoder` dispatches on it)."
    )
    model: AEModelConfig = Field(default_factory=AEModelConfig)
    data: AEDataConfig = Field(default_factory=AEDataConfig)
    loss: AELossConfig = Field(default_factory=AELossConfig)
    train: AETrainConfig = Field(default_factory=AETrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(weight_decay=0.0))
    lr_scheduler: LrSchedulerConfig = Field(default_factory=LrSchedulerConfig)
    stats: AEStatsConfig = Field(default_factory=AEStatsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: str = "runs/autoencoder"

    @model_validator(mode="after")
    def _resolution_fits(self) -> AutoencoderConfig:
        if self.model.pretrained is None:
            multiple = 2 ** len(self.model.block_out_channels)
            if self.data.resolution % multiple:
                raise ValueError(
                    f"data.resolution={self.data.resolution} must be a multiple of {multiple} "
                    f"(VAE down-sampling × FLUX.2's 2×2 patchify) for {len(self.model.block_out_channels)} blocks"
                )
        return self


def load_autoencoder_config(path: str | Path, overrides: Sequence[str] = ()) -> AutoencoderConfig:
    """Read `path` (following `extends`), apply `key.path=value` overrides, validate as `AutoencoderConfig`."""
    from flowtrain.config import resolve_config, validate_config

    return validate_config(resolve_config(path, overrides), AutoencoderConfig)


def dump_autoencoder_config(cfg: AutoencoderConfig) -> str:
    from flowtrain.config.load import dump_yaml

    return dump_yaml(cfg.model_dump(mode="python"))
