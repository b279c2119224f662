"""The training config, as pydantic models.

Config classes hold data only; builders elsewhere turn them into objects. Every model forbids unknown keys, so
a typo is an error that names the key (see `config.load` for how errors are reported).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    family: str = Field("flux2_klein", description="Model adapter name (see `flowtrain.models`).")
    pretrained: str = Field(..., description="Hub id or local folder of the diffusers pipeline.")
    dit: str | None = Field(
        None, description="Optional separate transformer weights: a diffusers folder or a .safetensors file."
    )
    revision: str | None = None
    text_encoder_layers: list[int] = Field(
        default_factory=lambda: [9, 18, 27],
        description="Text-encoder hidden-state indices stacked into the prompt embedding (Klein: 9, 18, 27).",
    )
    max_sequence_length: int = Field(512, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype of the frozen base weights (LoRA) or of the loaded weights (full)."
    )
    trust_remote_code: bool = False


class DatasetConfig(Section):
    cache_dir: str | None = Field(None, description="Latent cache written by `flowtrain precompute`.")
    latent_sampling: Literal["mode", "sample"] = Field(
        "mode", description="`mode` uses the VAE posterior mean (the reference); `sample` draws from it each step."
    )
    shuffle: bool = True
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = True
    prefetch_factor: int = Field(2, ge=1)


class TrainConfig(Section):
    max_steps: int = Field(1000, gt=0, description="Optimizer steps.")
    batch_size: int = Field(1, gt=0, description="Micro-batch size per process.")
    learning_rate: float = Field(1e-4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, description="Clip the global grad norm; null disables.")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    gradient_checkpointing: bool = False
    log_every: int = Field(1, gt=0)
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of the empty-prompt embedding.")


class LoraConfig(Section):
    rank: int = Field(16, gt=0)
    alpha: float | None = Field(None, description="LoRA alpha; null means alpha = rank (scale 1).")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: str | list[str] = Field(
        "attention", description="A preset name of the model adapter, or a list of module names / regexes."
    )
    init: Literal["gaussian", "default"] = "gaussian"


class TimestepConfig(Section):
    scheme: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = Field(1.0, gt=0, description="Fixed shift σ' = sσ/(1+(s-1)σ); 1 disables.")


class LossConfig(Section):
    name: str = Field("flow_matching", description="Registered loss name or `pkg.module:Class`.")
    base: Literal["mse", "l1", "huber", "logcosh"] = "mse"
    huber_delta: float = Field(1.0, gt=0)
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    kwargs: dict = Field(default_factory=dict, description="Extra keyword arguments for a custom loss.")


class OptimizerConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0)


class LrSchedulerConfig(Section):
    name: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)


class CheckpointConfig(Section):
    every_steps: int | None = Field(500, gt=0, description="Save every N optimizer steps; null: only at the end.")
    keep_last: int | None = Field(3, gt=0, description="Keep the newest K checkpoints; null keeps all.")


class FlowtrainConfig(Section):
    """The whole run: one YAML file (after `extends` and overrides) validates into this."""

    model: ModelConfig
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    train_mode: Literal["lora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    timesteps: TimestepConfig = Field(default_factory=TimestepConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_scheduler: LrSchedulerConfig = Field(default_factory=LrSchedulerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output_dir: str = "runs/default"

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_dir must not be empty")
        return v
