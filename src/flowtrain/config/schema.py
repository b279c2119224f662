"""The training config, as pydantic models.

Config classes hold data only; builders elsewhere turn them into objects. Every model forbids unknown keys, so
a typo is an error that names the key (see `config.load` for how errors are reported).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from flowtrain.config.buckets import BucketsConfig
from flowtrain.config.section import Section
from flowtrain.config.stages import StageConfig
from flowtrain.config.video import VideoConfig
from flowtrain.models import detect_family, family_names, family_options


class DatasetConfig(Section):
    cache_dir: str | None = Field(None, description="Latent cache written by `flowtrain precompute`.")
    latent_sampling: Literal["mode", "sample"] = Field(
        "mode", description="`mode` uses the VAE posterior mean (the reference); `sample` draws from it each step."
    )
    shuffle: bool = Field(True, description="Shuffle the rows every epoch (a resumable order from train.seed).")
    shuffle_window: int | None = Field(
        None,
        ge=0,
        description="Shuffle by blocks of the cache (a Parquet row group, or a run of one shard's row groups holding "
        "512 KiB when rows are small): blocks in random order, rows shuffled within windows of this many blocks, so "
        "each block is decoded once an epoch. 0: one global permutation (a random row group per row: slow once the "
        "cache outgrows the reader's 8-group LRU). null: 0 when the cache has at most 8 blocks or its blocks hold at "
        "most 2 rows (rows of several MiB), else 8.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes; 0 reads in the main process.")
    pin_memory: bool = Field(True, description="Pinned host memory for batches (CUDA only).")
    prefetch_factor: int = Field(2, ge=1, description="Batches each worker reads ahead (with num_workers > 0).")
    prefetch: bool | None = Field(
        None,
        description="With num_workers 0: a background thread reads prefetch_factor batches ahead while the step runs "
        "(workers prefetch on their own). null: on when training on an accelerator, off on CPU (where the thread "
        "competes with torch's intra-op threads for the cores).",
    )
    allow_other_weights: bool = Field(
        False,
        description="Train on a cache whose text encoders / VAE differ from model.pretrained's (compared by config "
        "and weights digests, not by path): only warn. For weights that are knowingly different but compatible, "
        "e.g. the same model saved in another dtype. A moved model folder needs nothing.",
    )
    class_cache_dir: str | None = Field(
        None,
        description="DreamBooth class (regularisation) images: a second latent cache; each batch adds as many class "
        "rows as instance rows. Needs loss.name: prior_preservation.",
    )
    video: VideoConfig = Field(default_factory=VideoConfig)
    buckets: BucketsConfig = Field(default_factory=BucketsConfig)


class TrainConfig(Section):
    max_steps: int = Field(1000, gt=0, description="Optimizer steps.")
    batch_size: int = Field(1, gt=0, description="Micro-batch size per process.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (the schedule multiplies it).")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step; the loss is averaged over them (and logged so)."
    )
    max_grad_norm: float | None = Field(
        1.0, description="Clip the global grad norm; null disables. `grad_norm` is logged before clipping."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast compute dtype (trainable weights stay fp32; fp16 adds a GradScaler and needs a GPU). "
        "`auto`: bf16 / fp16 when model.dtype is bfloat16 / float16, else no.",
    )
    seed: int = Field(0, description="Seeds LoRA init, data order and every per-step draw (σ, noise, dropout).")
    gradient_checkpointing: bool | str = Field(
        False,
        description="Recompute block activations in backward (`flowtrain.train.offload`): less memory, slower steps, "
        'same gradients. `true`: every transformer block; `"every:K"`: every K-th block (blocks 0, K, 2K, ... in '
        'execution order); `"single"`: only the single-stream blocks (families that have them); `false`: none.',
    )
    blocks_to_swap: int = Field(
        0,
        ge=0,
        description="Block swap: keep the frozen weights of this many transformer blocks (the last ones) on the CPU "
        "and move each one to the device just before its forward and its backward, prefetching the next "
        "(`flowtrain.train.offload`); swapped blocks are always checkpointed. LoRA only; not with train.compile, "
        "FSDP, DeepSpeed or multi-GPU DDP. 0: off.",
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_level(cls, v: Any) -> Any:
        from flowtrain.train.offload import parse_checkpointing

        try:
            parse_checkpointing(v)
        except ValueError as e:  # the loader's message names the key already
            raise ValueError(str(e).removeprefix("train.gradient_checkpointing: ")) from None
        return v

    compile: bool = Field(
        False,
        description="torch.compile the transformer (`flowtrain.train.perf`): static shapes, so a fixed resolution "
        "compiles once (the first step is slow) and never recompiles across steps; a family's variable-length "
        "text columns are then padded to their declared maximum length, so every batch has one shape.",
    )
    compile_backend: str = Field(
        "inductor", description="torch.compile backend with train.compile (inductor; aot_eager / eager to debug)."
    )
    compile_regional: bool = Field(
        True,
        description="With train.compile: compile each repeated transformer block (one graph per block kind, fast to "
        "compile) rather than the whole model.",
    )
    deterministic: bool = Field(
        False,
        description="torch deterministic algorithms (+ cuDNN / cuBLAS settings): same seed + config → identical "
        "losses, at some speed cost on GPU.",
    )
    random_draws: Literal["global", "per_process"] = Field(
        "per_process",
        description="With several processes, how σ, noise, caption dropout and posterior samples are drawn. "
        "`per_process`: each process draws only its rows, from a stream keyed by its rank (cheap at any scale; the "
        "numbers depend on the process count). `global`: every process draws them for the whole global micro-batch "
        "and keeps its rows, so N processes × batch b train like 1 × N·b (within fp32 tolerance) and a resume on "
        "another process count continues the same numbers; the CPU draw costs N times one process's share "
        "(benchmarks/distributed.py). One process: both are the same.",
    )
    log_every: int = Field(1, gt=0, description="Log metrics every N optimizer steps (means over those steps).")
    caption_dropout: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Probability per sample of training on the cached empty-prompt embedding instead of the caption "
        "(keeps the unconditional branch for classifier-free guidance).",
    )
    nonfinite: Literal["skip", "stop"] = Field(
        "skip",
        description="A step whose loss (or grad norm) is NaN/inf: `skip` its update and count it, or `stop` the run "
        "(no checkpoint is written, the last one stays intact, exit code 3).",
    )
    max_nonfinite_in_a_row: int = Field(
        5, gt=0, description="With nonfinite=skip: stop (exit code 3) after this many non-finite steps in a row."
    )
    collective_timeout_minutes: float = Field(
        30.0,
        gt=0,
        description="Distributed runs: how long a process waits in a collective for the others before it stops "
        "(exit code 76). Only a stuck process needs it (one that fails stops the others at once); keep it above "
        "the longest wait of a healthy run, e.g. the main process writing a full checkpoint.",
    )


class LoraConfig(Section):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: float | None = Field(None, description="LoRA alpha; null means alpha = rank (scale 1).")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch input.")
    targets: str | list[str] = Field(
        "attention",
        description="A preset of the model family (every family has attention, attention+ff, all; see "
        "docs/models.md), or a list of Linear module names / regexes (each also matches as a name suffix).",
    )
    init: Literal["gaussian", "default"] = Field(
        "gaussian",
        description="LoRA A init (B starts at zero either way): gaussian, or peft's default (Kaiming). lora / dora "
        "only: loha and lokr always use peft's init (one factor zero, so training starts at the base model).",
    )
    kind: Literal["lora", "loha", "lokr", "dora"] = Field(
        "lora",
        description="Adapter kind, all through peft (docs/training.md, Adapter kinds): lora (B·A); loha (Hadamard "
        "product of two low-rank products); lokr (Kronecker product, one factor low-rank); dora (LoRA plus a learned "
        "per-row magnitude). rank and alpha apply to every kind (scale alpha / rank).",
    )
    decompose_factor: int = Field(
        -1,
        description="lokr only: the Kronecker product's first factor size along each dimension, passed to peft, "
        "which splits each layer width into two factors with it (-1: factors near the square root).",
    )
    decompose_both: bool = Field(
        False, description="lokr only: also make the Kronecker product's first (small) factor low-rank."
    )
    rank_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="loha / lokr only: dropout of whole rank components of the update."
    )
    module_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="loha / lokr only: probability of skipping a module's update in a step."
    )

    @model_validator(mode="after")
    def _kind_options(self) -> LoraConfig:
        """An option of another adapter kind would be silently ignored: refuse a non-default value, naming the kind
        it belongs to (defaults pass, so a run's dumped config.yaml validates again)."""
        own = {
            "dropout": ("lora", "dora"),
            "init": ("lora", "dora"),
            "decompose_factor": ("lokr",),
            "decompose_both": ("lokr",),
            "rank_dropout": ("loha", "lokr"),
            "module_dropout": ("loha", "lokr"),
        }
        for key, kinds in own.items():
            if getattr(self, key) != type(self).model_fields[key].default and self.kind not in kinds:
                raise ValueError(
                    f"lora.{key} is an option of lora.kind {' / '.join(kinds)}, not of {self.kind!r}; remove it"
                    + (" (loha / lokr have rank_dropout and module_dropout)" if key == "dropout" else "")
                )
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"lora.decompose_factor must be -1 or a positive divisor, got {self.decompose_factor}")
        return self


class TimestepConfig(Section):
    """How the training noise level σ is drawn (see `flowtrain.flow.timesteps`)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "reference_steps" in data:
            raise ValueError(
                "timesteps.reference_steps moved to model.shift_reference_steps (the resolution shift is the model "
                "family's: docs/models.md)"
            )
        return data

    scheme: Literal["uniform", "logit_normal", "mode"] = Field(
        "logit_normal", description="σ density: U(0,1), sigmoid(N(logit_mean, logit_std²)), or SD3's mode sampling."
    )
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal before the sigmoid.")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: std of the normal before the sigmoid.")
    mode_scale: float = Field(
        1.29,
        ge=-1.0,
        le=1.75,
        description="mode: scale s of σ = 1 - u - s·(cos²(πu/2) - 1 + u); must lie in [-1, 1.75] for σ to stay "
        "monotone in u (0 is uniform).",
    )
    shift: float = Field(1.0, gt=0, description="shift_mode fixed: σ' = sσ/(1+(s-1)σ); 1 disables, > 1 favours noise.")
    shift_mode: Literal["fixed", "resolution"] = Field(
        "fixed",
        description="`resolution`: the shift the model family's sampler uses at the batch's image-token count "
        "(docs/models.md; overrides `shift`).",
    )


class LossConfig(Section):
    """The objective (docs/training.md#losses). A loss is `(LossContext) -> (scalar, log_dict)`."""

    name: str = Field(
        "flow_matching",
        description="`flow_matching`, `prior_preservation` (DreamBooth; needs dataset.class_cache_dir), "
        "`distillation` (needs loss.teacher), or a user loss as an import string `pkg.module:Class`.",
    )
    base: Literal["mse", "l1", "huber", "logcosh"] = Field(
        "mse", description="Per-element error between the predicted and target velocity."
    )
    huber_delta: float = Field(1.0, gt=0, description="base huber: quadratic below δ, linear above.")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Per-sample weight w(σ) (SD3 schemes, diffusers `compute_loss_weighting_for_sd3`)."
    )
    prior_loss_weight: float = Field(1.0, ge=0, description="prior_preservation: weight of the class-image loss.")
    teacher: str | None = Field(
        None,
        description="distillation: the frozen teacher of the same family: a pipeline folder, a transformer folder "
        "or a .safetensors file (architecture from model.pretrained).",
    )
    flow_weight: float = Field(1.0, ge=0, description="distillation: weight of the flow-matching (data) term.")
    distill_weight: float = Field(
        1.0, ge=0, description="distillation: weight of the teacher term err(v̂, v̂_teacher) at the same x_σ, σ."
    )
    kwargs: dict = Field(default_factory=dict, description="Extra keyword arguments for the loss class.")


OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "prodigy", "adamw8bit", "adafactor", "ao_adamw8bit", "ao_adamw4bit",
              "ao_adamw_fp8")  # fmt: skip
_TORCH_OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")


class OptimizerConfig(Section):
    """The optimizer (`flowtrain.train.optim`); the lr is train.learning_rate, its schedule lr_scheduler."""

    name: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "adamw",
        description="torch adamw / adam / sgd / rmsprop; prodigy (prodigyopt, use learning_rate 1.0); adamw8bit "
        "(bitsandbytes); adafactor (transformers); ao_adamw8bit / ao_adamw4bit / ao_adamw_fp8 (torchao, "
        "`pip install flowtrain[lowbit]`).",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam-family and prodigy β1, β2.")
    weight_decay: float = Field(1e-4, ge=0, description="Decoupled (AdamW-style) or L2 (adam, sgd, rmsprop) decay.")
    eps: float = Field(1e-8, gt=0, description="Adam-family / rmsprop / prodigy ε (adafactor uses its own).")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and rmsprop momentum.")
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto",
        description="torch optimizers' kernels (`flowtrain.train.perf.optimizer_kwargs`): fused (adamw / adam / sgd), "
        "foreach, for_loop, or auto (fused where torch has it for every parameter, else foreach). Fused and foreach "
        "agree up to rounding, not bitwise.",
    )
    lr_scale: dict[str, float] = Field(
        default_factory=dict,
        description="Per-parameter lr multipliers: {regex on the parameter name: factor}, first match wins, e.g. "
        "{lora_B: 4.0} (LoRA+). Unmatched parameters use 1.",
    )
    kwargs: dict = Field(default_factory=dict, description="Extra constructor arguments (e.g. prodigy d_coef).")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must each lie in [0, 1), got {list(v)}")
        return v

    @field_validator("lr_scale")
    @classmethod
    def _scales(cls, v: dict[str, float]) -> dict[str, float]:
        import re

        for pattern, factor in v.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"lr_scale key {pattern!r} is not a valid regex ({e})") from None
            if not factor > 0:
                raise ValueError(f"lr_scale[{pattern!r}] = {factor} must be > 0")
        return v

    @model_validator(mode="after")
    def _implementation(self) -> OptimizerConfig:
        if "implementation" in self.model_fields_set and self.name not in _TORCH_OPTIMIZERS:
            raise ValueError(
                f"implementation is an option of the torch optimizers {list(_TORCH_OPTIMIZERS)}, not {self.name!r}"
            )
        if self.implementation == "fused" and self.name == "rmsprop":
            raise ValueError("torch rmsprop has no fused implementation; use implementation: foreach")
        return self


class LrSchedulerConfig(Section):
    """The lr multiplier per optimizer step (`flowtrain.train.schedules`): warm-up, then the named decay."""

    name: Literal["constant", "constant_with_warmup", "linear", "cosine", "step", "exponential", "plateau"] = Field(
        "constant",
        description="constant; constant_with_warmup; linear / cosine decay to min_lr_ratio at max_steps; step "
        "(×gamma every step_size); exponential (×gamma per step_size, smoothly); plateau (×gamma when the smoothed "
        "train loss stops improving).",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 (every schedule but `constant`).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of every decay, as a fraction of learning_rate.")
    step_size: int = Field(1000, gt=0, description="step / exponential: steps per factor gamma.")
    gamma: float = Field(0.5, gt=0, le=1, description="step / exponential / plateau: the lr multiplier.")
    patience: int = Field(
        500, gt=0, description="plateau: steps without a relative improvement > threshold before lowering the lr."
    )
    threshold: float = Field(1e-3, ge=0, description="plateau: relative improvement of the smoothed loss that counts.")
    smoothing: float = Field(0.9, ge=0, lt=1, description="plateau: EMA β of the logged train loss (per logged step).")
    cooldown: int = Field(0, ge=0, description="plateau: steps after a reduction before counting again.")

    @model_validator(mode="after")
    def _warmup(self) -> LrSchedulerConfig:
        if self.name == "constant" and self.warmup_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} has no effect with name: constant; use name: constant_with_warmup"
            )
        return self


class EmaConfig(Section):
    """Exponential moving average of the trainable weights; when enabled, validation samples and the exported
    weights use it, and checkpoints hold it (`ema.safetensors`)."""

    enabled: bool = Field(False, description="Keep an EMA of the trainable weights.")
    decay: float = Field(0.999, gt=0, lt=1, description="ema ← decay·ema + (1 - decay)·weights, per update.")
    update_every: int = Field(1, gt=0, description="Update every N optimizer steps (decay applies per update).")
    start_step: int = Field(0, ge=0, description="Before this step the EMA just copies the weights.")
    device: Literal["accelerator", "cpu"] = Field(
        "accelerator", description="Where the EMA copy lives: next to the weights, or in CPU memory (saves VRAM)."
    )


class CheckpointConfig(Section):
    every_steps: int | None = Field(500, gt=0, description="Save every N optimizer steps; null: only at the end.")
    keep_last: int | None = Field(3, gt=0, description="Keep the newest K checkpoints; null keeps all.")
    every_minutes: float | None = Field(
        None, gt=0, description="Also save when this many minutes passed since the last save; null: off."
    )
    keep_every: int | None = Field(
        None, gt=0, description="Keep checkpoints whose step is a multiple of M for good (not pruned by keep_last)."
    )
    final: bool = Field(
        True,
        description="Write checkpoint-{max_steps} when the run completes. false: the exported weights (LoRA file / "
        "transformer/) are the run's only final output, saving the optimizer state's disk and write time; a run "
        "stopped by a signal at its last step still writes one.",
    )


class TrackingConfig(Section):
    """Where metrics go (see docs/tracking.md). `{output_dir}/logs/metrics.jsonl` is always written."""

    report_to: list[Literal["mlflow", "wandb", "tensorboard", "jsonl"]] = Field(
        default_factory=lambda: ["mlflow", "jsonl"],
        description="Backends, any combination; wandb / tensorboard need their packages (flowtrain[tracking]).",
    )
    uri: str | None = Field(
        None, description="MLflow tracking URI (e.g. http://host:5000); null: sqlite:///{output_dir}/mlflow.db."
    )
    mlflow_async: bool = Field(
        True,
        description="Write the MLflow run from a background process, so it neither delays nor enlarges training; "
        "false: in the training process.",
    )
    experiment_name: str = Field("flowtrain", min_length=1, description="MLflow experiment / W&B project.")
    run_name: str | None = Field(None, description="Run name in MLflow / W&B; null: the output_dir folder name.")
    log_weights: bool = Field(
        True, description="Log the final LoRA file / transformer folder as an artifact (a copy, for full fine-tunes)."
    )
    graphs: bool = Field(True, description="Write graphs/ and summary.txt at the end of training (`flowtrain plot`).")
    flush_every_s: float = Field(
        1.0,
        ge=0,
        description="Metric rows reach metrics.jsonl and the backends at most this many seconds late (and at every "
        "checkpoint); 0: every row at once, at the cost of a file flush and a pipe write per logged step.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _listify(cls, v: object) -> object:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("report_to")
    @classmethod
    def _dedupe(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class ValidationConfig(Section):
    """Sample images from fixed prompts during training (main process, eval mode, EMA weights when EMA is on)."""

    every_steps: int | None = Field(None, gt=0, description="Sample every N optimizer steps; null: never.")
    at_start: bool = Field(False, description="Also sample before the first step (the base model, for comparison).")
    prompts: list[str] = Field(default_factory=list, description="Validation prompts.")
    prompts_file: str | None = Field(None, description="Or a text file with one prompt per line.")
    num_inference_steps: int | None = Field(
        None, gt=0, description="Sampling steps; null: the model family's pipeline default (docs/models.md)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        description="The family's guidance (real CFG with the empty prompt, <= 1 disables it; or a distilled "
        "guidance value); null: the family's pipeline default (docs/models.md).",
    )
    seed: int = Field(0, description="Generator seed of every validation image (the same each time, to compare).")
    sizes: list[tuple[int, int]] = Field(
        default_factory=list,
        description="[height, width] pairs, each a multiple of the model's pixel multiple (the VAE factor × the "
        "latent patch, e.g. 16); empty: the cache's training resolution.",
    )

    @field_validator("sizes")
    @classmethod
    def _positive(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for h, w in v:
            if h <= 0 or w <= 0:
                raise ValueError(f"sizes must be positive [height, width] pairs, got [{h}, {w}]")
        return v

    @model_validator(mode="after")
    def _prompts(self) -> ValidationConfig:
        if self.prompts and self.prompts_file:
            raise ValueError("set validation.prompts or validation.prompts_file, not both")
        if (self.every_steps or self.at_start) and not (self.prompts or self.prompts_file):
            raise ValueError(
                "validation sampling is on (every_steps / at_start) but there are no prompts: "
                "set validation.prompts (a list) or validation.prompts_file"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.every_steps or self.at_start)


def _family_tag(value: Any) -> str | None:
    return value.get("family") if isinstance(value, dict) else getattr(value, "family", None)


# `model:` validates against the options class of the family it names: each family adds its own keys.
ModelConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in family_options().items())],  # noqa: UP007
    Discriminator(_family_tag),
]


def resolve_family(model: dict[str, Any]) -> dict[str, Any]:
    """`model:` with `family` filled in from `model.pretrained`'s model_index.json when not set; an error that
    names both when the configured family contradicts the pipeline's."""
    pretrained = model.get("pretrained")
    if not isinstance(pretrained, str):  # nothing to detect from: any family's options report the missing key
        return model if "family" in model else {**model, "family": family_names()[0]}
    detected, class_name = detect_family(pretrained, model.get("revision"))
    family = model.get("family")
    if family is None:
        if detected is None:
            what = (
                f"its pipeline class {class_name!r} is not one flowtrain trains"
                if class_name
                else "no model_index.json there or in the local Hugging Face cache"
            )
            raise ValueError(
                f"model.family is not set and cannot be detected from model.pretrained={pretrained!r} ({what}); "
                f"set model.family to one of {', '.join(family_names())}"
            )
        return {**model, "family": detected}
    if class_name is not None and detected != family:
        raise ValueError(
            f"model.family={family!r} but model.pretrained={pretrained!r} is a {class_name} "
            f"({f'model.family {detected!r}' if detected else 'no family flowtrain trains'}); fix one of the two"
        )
    return model


class ExportConfig(Section):
    """Extra formats of the final weights, written at the end of training (`flowtrain export`, docs/export.md)."""

    formats: list[Literal["diffusers", "comfyui", "original"]] = Field(
        default_factory=list,
        description="Also write the final LoRA / full fine-tune in these formats, next to the diffusers output "
        "(`comfyui`: ComfyUI's keys with `.alpha`; `original`: the model's original layout; docs/export.md).",
    )


class FlowtrainConfig(Section):
    """The whole run: one YAML file (after `extends` and overrides) validates into this."""

    model: ModelConfig
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    train_mode: Literal["lora", "full"] = Field(
        "lora", description="`lora`: train LoRA adapters on a frozen base; `full`: all transformer weights (fp32)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    timesteps: TimestepConfig = Field(default_factory=TimestepConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_scheduler: LrSchedulerConfig = Field(default_factory=LrSchedulerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    output_dir: str = Field("runs/default", description="Run folder: checkpoints, logs, exported weights, samples.")
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="A training pipeline: stages run in order, each this config plus its overrides, weights carried "
        "over (docs/pipelines.md); empty: one plain run.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _family(cls, v: Any) -> Any:
        return resolve_family(v) if isinstance(v, dict) else v

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_dir must not be empty")
        return v

    @model_validator(mode="after")
    def _training_choices(self) -> FlowtrainConfig:
        """Cross-section checks of the training choices (LoRA preset, precision, prior preservation, distillation)."""
        presets = type(self.model).lora_presets
        if isinstance(self.lora.targets, str) and self.lora.targets not in presets:
            raise ValueError(
                f"lora.targets: {self.lora.targets!r} is not a LoRA preset of model family {self.model.family!r} "
                f"({', '.join(presets)}); or give a list of Linear module names / regexes"
            )
        dtype, mp = self.model.dtype, self.train.mixed_precision
        if mp == "auto":
            self.train.mixed_precision = mp = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")
        needed = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype)
        if self.train_mode == "lora" and needed and mp != needed:
            raise ValueError(
                f"model.dtype={dtype} with train_mode=lora needs train.mixed_precision={needed} (the frozen "
                f"{dtype} base and the fp32 LoRA weights only meet under autocast), got {mp!r}; set "
                f"train.mixed_precision: {needed} (or auto), or model.dtype: float32"
            )
        if self.model.quantize != "none" and self.train_mode != "lora":
            raise ValueError(
                f"model.quantize={self.model.quantize} needs train_mode: lora (a quantized base is frozen; a full "
                "fine-tune trains every weight in float32): set model.quantize: none, or train_mode: lora"
            )
        name, builtin = self.loss.name, ("flow_matching", "prior_preservation", "distillation")
        if name == "prior_preservation" and not self.dataset.class_cache_dir:
            raise ValueError("loss.name=prior_preservation needs dataset.class_cache_dir (the class images' cache)")
        if self.dataset.class_cache_dir and name in builtin and name != "prior_preservation":
            raise ValueError(
                f"dataset.class_cache_dir is set but loss.name={name!r} would train on the class rows as ordinary "
                "data; set loss.name: prior_preservation (or remove dataset.class_cache_dir)"
            )
        if name == "distillation" and not self.loss.teacher:
            raise ValueError("loss.name=distillation needs loss.teacher (a path to the teacher transformer)")
        if self.loss.teacher and name in builtin and name != "distillation":
            raise ValueError(f"loss.teacher is set but loss.name={name!r}; set loss.name: distillation")
        if self.train.blocks_to_swap:
            from flowtrain.train.offload import check_swap_config

            check_swap_config(self.train.blocks_to_swap, self.train_mode, self.train.compile)
        return self

    @model_validator(mode="after")
    def _stages(self) -> FlowtrainConfig:
        """Every stage validates as a whole config (`config.stages`), so `flowtrain check` catches its typos."""
        if self.stages:
            from flowtrain.config.stages import check_stages

            check_stages(self)
        return self
