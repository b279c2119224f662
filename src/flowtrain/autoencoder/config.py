"""The autoencoder config (`flowtrain autoencoder CONFIG`): its own pydantic schema, loaded with the training
config's YAML machinery (`extends`, dotted overrides, errors that name the file and key) through
`flowtrain.config.validate_config`.

The optimizer, LR-schedule, EMA and tracking sections are the training config's own classes, so both verbs read the
same way. Every feature beyond reconstruction + β-KL (free bits, GAN, perceptual loss, EMA, samples) is off by
default. docs/autoencoder.md lists every option (generated: `python -m flowtrain.autoencoder.reference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from flowtrain.config.schema import EmaConfig, LrSchedulerConfig, OptimizerConfig, TrackingConfig
from flowtrain.config.section import Section


class AEModelConfig(Section):
    """Architecture of a randomly initialised VAE of the config's `family`, or an existing one to fine-tune.

    The spatial down-sampling factor is 2^(len(block_out_channels) - 1); a family that patchifies latents (FLUX.1,
    FLUX.2: 2×2) needs image sides that are a multiple of that times its patch.
    """

    pretrained: str | None = Field(
        None,
        description="Start from this VAE instead of a random init: a VAE folder (config.json in it), a pipeline "
        "folder (its vae/), or a pipeline's hub id; the architecture keys below are then ignored.",
    )
    block_out_channels: list[int] = Field(
        default_factory=lambda: [32, 64], min_length=1, description="Channels per resolution level (one per block)."
    )
    layers_per_block: int = Field(1, gt=0, description="ResNet layers per block.")
    latent_channels: int = Field(
        4, gt=0, description="FLUX.2 proper uses 32 (FLUX.1: 16); patchify makes tokens 4× as wide."
    )
    norm_num_groups: int = Field(8, gt=0, description="GroupNorm groups; must divide every block's channels.")
    mid_block_add_attention: bool = Field(False, description="Self-attention in the mid blocks (slow on CPU).")
    batch_norm_eps: float = Field(1e-4, gt=0, description="flux2_klein only: eps of the VAE's latent BatchNorm.")

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
    frames: int | None = Field(
        None,
        gt=0,
        description="Video raw shards: train on clips of the first `frames` frames of each video (4k+1; batches "
        "(B, 3, F, R, R)), for a video VAE (family wan). null: images.",
    )


class AELossConfig(Section):
    """loss = rec(x̂, x) + β(step)·KL/(3·H·W) [+ perceptual + adaptive GAN term], β ramping linearly from 0 to
    `kl_weight` over `kl_warmup_steps`. Dividing the summed KL by the number of pixel values puts β on the scale of
    LDM's `kl_weight` convention."""

    reconstruction: Literal["l1", "mse"] = Field("l1", description="Pixel reconstruction loss (mean over values).")
    kl_weight: float = Field(1e-6, ge=0, description="β after warm-up.")
    kl_warmup_steps: int = Field(0, ge=0, description="Steps of linear β warm-up from 0; 0 = β from the start.")
    free_bits: float = Field(
        0.0,
        ge=0,
        description="Free bits λ, in nats per latent value: each latent channel's batch-mean KL counts as at least "
        "λ (below it, no KL gradient), so every channel may carry λ nats for free. 0: plain KL.",
    )


class AEPerceptualConfig(Section):
    """A perceptual distance on a frozen transformers vision backbone (LPIPS's construction without its learned
    heads; LPIPS itself needs torchvision, which breaks this torch: see docs/autoencoder.md)."""

    weight: float = Field(0.0, ge=0, description="Weight of the perceptual term; 0 disables it (no backbone loaded).")
    model: str = Field(
        "facebook/dinov2-small",
        description="transformers vision backbone by Hub name or local folder (its forward must return "
        "hidden_states: DINOv2, ViT, ConvNeXt, ...).",
    )
    layers: list[int] | None = Field(None, description="Hidden-state indices compared; null: every layer's output.")
    resolution: int | None = Field(
        None, gt=0, description="Resize images to this square side before the backbone; null: as they are."
    )


class AEGanConfig(Section):
    """Adversarial training against a patch discriminator (the VQGAN / LDM recipe)."""

    enabled: bool = Field(False, description="Train a patch discriminator and add the generator loss.")
    loss: Literal["hinge", "non_saturating"] = Field("hinge", description="Discriminator / generator loss pair.")
    start_step: int = Field(
        0, ge=0, description="Optimizer steps before the discriminator and the generator loss start."
    )
    weight: float = Field(0.5, ge=0, description="Generator loss weight (LDM's disc_weight), × the adaptive weight.")
    adaptive_weight: bool = Field(
        True,
        description="Scale the generator loss by ‖∇rec‖ / (‖∇G‖ + 1e-4) at the decoder's last layer (VQGAN / LDM).",
    )
    max_adaptive_weight: float = Field(1e4, gt=0, description="Clamp of the adaptive weight.")
    only: bool = Field(
        False,
        description="GAN-only mode: the autoencoder's loss is the generator loss alone (× weight; no reconstruction, "
        "KL or perceptual term, no adaptive weight).",
    )
    r1_weight: float = Field(0.0, ge=0, description="γ of the R1 penalty γ/2·E‖∇ₓD(x)‖² on real images; 0: off.")
    discriminator_channels: int = Field(64, gt=0, description="Width of the discriminator's first layer.")
    discriminator_layers: int = Field(3, gt=0, description="Stride-2 layers (images need ≥ 3·2^layers px).")
    learning_rate: float | None = Field(
        None, gt=0, description="Discriminator LR (constant); null: train.learning_rate."
    )
    betas: tuple[float, float] = Field((0.5, 0.9), description="Discriminator Adam betas (LDM's).")

    @model_validator(mode="after")
    def _only_needs_gan(self) -> AEGanConfig:
        if self.only and not self.enabled:
            raise ValueError("gan.only needs gan.enabled: true")
        return self


class AETrainConfig(Section):
    max_steps: int = Field(1000, gt=0, description="Optimizer steps of the run.")
    batch_size: int = Field(32, gt=0, description="Images per step (at most the data set's size).")
    learning_rate: float = Field(1e-3, gt=0, description="Autoencoder learning rate (the `lr_scheduler` shapes it).")
    max_grad_norm: float | None = Field(1.0, description="Clip the global grad norm; null disables.")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast (convs are often no faster).")
    seed: int = Field(0, description="Seeds the initial weights, the data order and the posterior-sample noise.")
    log_every: int = Field(10, gt=0, description="Log (metrics.jsonl, console line) every N steps, averaged over them.")
    device: str | None = Field(None, description="cuda / cpu; default cuda when available.")


class AECheckpointConfig(Section):
    """Checkpoints for exact resume (`--resume_from_checkpoint latest`), written atomically like the transformer's."""

    every_steps: int | None = Field(500, gt=0, description="Save every N optimizer steps; null: never.")
    keep_last: int | None = Field(2, gt=0, description="Keep the newest K checkpoints; null keeps all.")


class AESamplesConfig(Section):
    """Reconstruction sample grids `samples/step-XXXXXX.png`: one row per image, input | recon from the posterior
    mode | recon from a posterior sample."""

    every_steps: int | None = Field(None, gt=0, description="Write a grid every N steps (and at the end); null: off.")
    count: int = Field(8, gt=0, description="Images per grid (the first ones of the data set).")
    scale: int = Field(1, gt=0, description="Nearest-neighbour upscaling of the grid (small images).")


class AEStatsConfig(Section):
    """Fit the latent statistics the family normalises with (flux2_klein: the VAE's BatchNorm running stats)."""

    fit: bool = Field(True, description="Fit after training (flowtrain autoencoder saves the fitted VAE).")
    max_images: int | None = Field(None, gt=0, description="Use at most this many images; null = all.")
    batch_size: int = Field(256, gt=0, description="Images per encoder pass while fitting.")


class AutoencoderConfig(Section):
    """The whole `flowtrain autoencoder` run."""

    kind: Literal["autoencoder"] = Field(
        "autoencoder", description="Marks the file as an autoencoder config (the shipped-config tests key on it)."
    )
    family: str = Field(
        "flux2_klein",
        description="The model family whose VAE this trains (flux2_klein, flux1, qwen_image with data.frames 1, wan).",
    )
    model: AEModelConfig = Field(default_factory=AEModelConfig)
    data: AEDataConfig = Field(default_factory=AEDataConfig)
    loss: AELossConfig = Field(default_factory=AELossConfig)
    perceptual: AEPerceptualConfig = Field(default_factory=AEPerceptualConfig)
    gan: AEGanConfig = Field(default_factory=AEGanConfig)
    train: AETrainConfig = Field(default_factory=AETrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(weight_decay=0.0))
    lr_scheduler: LrSchedulerConfig = Field(default_factory=LrSchedulerConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    checkpointing: AECheckpointConfig = Field(default_factory=AECheckpointConfig)
    samples: AESamplesConfig = Field(default_factory=AESamplesConfig)
    stats: AEStatsConfig = Field(default_factory=AEStatsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: str = Field(
        "runs/autoencoder", description="The run folder (vae/, checkpoints, logs, graphs, samples)."
    )

    @model_validator(mode="after")
    def _family_and_resolution(self) -> AutoencoderConfig:
        from flowtrain.models import autoencoder_family

        family = autoencoder_family(self.family)  # ValueError naming the families that do
        if self.model.pretrained is None:
            multiple = family.autoencoder_pixel_multiple(self.model)
            if self.data.resolution % multiple:
                raise ValueError(
                    f"data.resolution={self.data.resolution} must be a multiple of {multiple} (the {self.family} "
                    f"VAE's down-sampling × latent patch) for {len(self.model.block_out_channels)} blocks"
                )
        if self.gan.enabled and self.data.frames is not None:  # the patch discriminator is 2-D (discriminator.py)
            raise ValueError(
                f"gan.enabled with data.frames={self.data.frames}: the patch discriminator takes images (B, 3, H, W), "
                "not clips; set gan.enabled=false for a clip-trained (causal 3-D) VAE"
            )
        return self


def load_autoencoder_config(path: str | Path, overrides: Sequence[str] = ()) -> AutoencoderConfig:
    """Read `path` (following `extends`), apply `key.path=value` overrides, validate as `AutoencoderConfig`."""
    from flowtrain.config import resolve_config, validate_config

    return validate_config(resolve_config(path, overrides), AutoencoderConfig)


def dump_autoencoder_config(cfg: AutoencoderConfig) -> str:
    from flowtrain.config.load import dump_yaml

    return dump_yaml(cfg.model_dump(mode="python"))
