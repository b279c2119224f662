"""`stages:`: a training pipeline, one stage after another, each the base config plus its own overrides.

A stage is validated here as a whole config (the base with its `overrides` merged in), so a typo in any stage
fails at load time with the stage's name. Running the stages is `flowtrain.train.stages`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from flowtrain.config.section import Section

STAGES_DIR = "stages"  # each stage runs in {output_dir}/stages/{name}
# Keys a stage may not override: the pipeline owns them (where each stage writes; the stage list itself).
_FIXED = ("stages", "output_dir")


class StageEndConfig(Section):
    """When a stage ends before its length: on the smoothed logged train loss (`train.log_every` sets how often
    it is looked at). Both conditions may be set; the first to hold ends the stage."""

    loss_below: float | None = Field(
        None, description="End the stage once the smoothed loss is below this value; null: off."
    )
    patience: int | None = Field(
        None,
        gt=0,
        description="Early stop: end the stage when the smoothed loss has not improved by more than min_delta for "
        "this many optimizer steps; null: off.",
    )
    min_delta: float = Field(
        0.0, ge=0, description="Plateau: the absolute decrease of the smoothed loss that counts as an improvement."
    )
    smoothing: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="EMA β over the logged losses: s ← β·s + (1-β)·loss, bias-corrected (0: the logged loss as is).",
    )
    min_steps: int = Field(0, ge=0, description="Neither condition is looked at before this many steps of the stage.")


class StageConfig(Section):
    """One stage of `stages:`."""

    name: str = Field(description="Unique; the stage's run folder is {output_dir}/stages/{name}.")
    kind: Literal["transformer", "autoencoder", "python"] = Field(
        "transformer",
        description="`transformer`: the base config plus `overrides`, through `flowtrain train`'s loop; "
        "`autoencoder`: the model family's autoencoder trainer (`flowtrain autoencoder`) on the config file "
        "`autoencoder` plus `autoencoder_overrides`; `python`: the function `call` (a step between trainings, "
        "e.g. assembling a pipeline folder and encoding a latent cache).",
    )
    call: str | None = Field(
        None,
        description="kind python: `package.module:function`, called as function(config, stage_dir, args, "
        "progress=...) with the pipeline's base config; what it returns (a JSON mapping) is recorded.",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="kind python: keyword data handed to `call`.")
    autoencoder: str | None = Field(
        None, description="kind autoencoder: its config file (absolute, or relative to the working directory)."
    )
    autoencoder_overrides: list[str] = Field(
        default_factory=list, description="kind autoencoder: dotted overrides of that file, e.g. [train.batch_size=8]."
    )
    autoencoder_from: str | None = Field(
        None,
        description="kind autoencoder: the name of an earlier autoencoder stage whose trained VAE this one starts "
        "from (its model.pretrained), e.g. to go on with longer clips or another loss; null: the config's own model.",
    )
    steps: int | None = Field(
        None, gt=0, description="Length in optimizer steps (sets the stage's train.max_steps); null: see epochs."
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="Length in epochs of the stage's dataset (rounded up to whole steps); null with steps null: "
        "the stage's train.max_steps.",
    )
    end: StageEndConfig = Field(default_factory=StageEndConfig)
    optimizer_state: Literal["keep", "reset"] = Field(
        "reset",
        description="`keep`: start from the previous stage's optimizer state (moments; the stage's own lr and "
        "hyper-parameters apply), which needs the same optimizer and the same trainable parameters; `reset`: a "
        "new optimizer.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Regexes of parameter names or module prefixes to keep fixed in this stage (each also matches "
        "as a name suffix: `proj_out` freezes `proj_out.weight` and `proj_out.bias`).",
    )
    unfreeze: list[str] = Field(
        default_factory=list,
        description="Exceptions to `freeze`, same syntax: parameters matched here train even if `freeze` matches "
        "them (only parameters the train_mode trains: LoRA never unfreezes the base).",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Sections of the base config this stage changes, deep-merged, e.g. {train: {learning_rate: "
        "1e-4}, train_mode: full, loss: {base: l1}, dataset: {cache_dir: ...}}.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"stage name {v!r}: use letters, digits, '_', '-', '.' (it names a folder)")
        return v

    @field_validator("freeze", "unfreeze")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regex ({e})") from None
        return v

    @field_validator("overrides")
    @classmethod
    def _not_fixed(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in _FIXED:
            if key in v:
                raise ValueError(f"overrides.{key}: the pipeline sets it for every stage; remove it from the stage")
        return v

    @model_validator(mode="after")
    def _one_length(self) -> StageConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"stage {self.name!r}: give steps or epochs, not both")
        if self.kind == "autoencoder":
            if self.autoencoder is None:
                raise ValueError(f"stage {self.name!r}: kind autoencoder needs `autoencoder:` (its config file)")
            fixed = StageEndConfig()
            other = {"epochs": self.epochs is not None, "end": self.end != fixed, "freeze": bool(self.freeze),
                     "unfreeze": bool(self.unfreeze), "overrides": bool(self.overrides),
                     "optimizer_state": self.optimizer_state != "reset"}  # fmt: skip
            if any(other.values()):
                raise ValueError(
                    f"stage {self.name!r} (kind autoencoder): {[k for k, v in other.items() if v]} are options of "
                    "transformer stages; an autoencoder stage takes steps and autoencoder_overrides"
                )
        elif self.autoencoder is not None or self.autoencoder_overrides or self.autoencoder_from is not None:
            raise ValueError(
                f"stage {self.name!r}: autoencoder / autoencoder_overrides / autoencoder_from need kind: autoencoder"
            )
        if self.kind == "python":
            if not self.call or ":" not in self.call:
                raise ValueError(f"stage {self.name!r}: kind python needs `call: package.module:function`")
            given = [k for k in ("steps", "epochs", "autoencoder") if getattr(self, k) is not None]
            given += [k for k in ("freeze", "unfreeze", "overrides") if getattr(self, k)]
            if given or self.end != StageEndConfig() or self.optimizer_state != "reset":
                raise ValueError(f"stage {self.name!r} (kind python) takes only call and args, not {given or 'end'}")
        elif self.call is not None or self.args:
            raise ValueError(f"stage {self.name!r}: call / args need kind: python")
        return self


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` deep-merged in (mappings merge key by key; anything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_dict(base: dict[str, Any], stage: StageConfig) -> dict[str, Any]:
    """The config dict a stage runs: the base (without `stages`) with the stage's overrides, its own run folder,
    its length in steps, and a final checkpoint (the next stage starts from it)."""
    d = merge({k: v for k, v in base.items() if k != "stages"}, stage.overrides)
    d["output_dir"] = f"{base['output_dir']}/{STAGES_DIR}/{stage.name}"
    d["train"] = {**d.get("train", {}), **({"max_steps": stage.steps} if stage.steps else {})}
    d["checkpoint"] = {**d.get("checkpoint", {}), "final": True}
    tracking = d.get("tracking", {})
    if "mlflow" in tracking.get("report_to", ["mlflow"]) and not tracking.get("uri"):
        # one MLflow store for the pipeline, so each stage's run can nest under the pipeline's run
        d["tracking"] = {**tracking, "uri": pipeline_store_uri(base["output_dir"])}
    return d


def pipeline_store_uri(output_dir: str) -> str:
    """The MLflow store of a pipeline whose tracking.uri is unset: `{output_dir}/mlflow.db`."""
    from pathlib import Path

    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def stage_configs(cfg: Any) -> list[Any]:
    """Each stage of `cfg` (a FlowtrainConfig with `stages`) as the whole FlowtrainConfig it runs. Raises
    ValueError naming the stage and the key when one does not validate."""
    from pydantic import ValidationError

    base = cfg.model_dump(mode="json", exclude_unset=True, exclude={"stages"})
    base["output_dir"] = cfg.output_dir
    out = []
    for i, stage in enumerate(cfg.stages):
        if stage.kind == "autoencoder":
            out.append(autoencoder_config(cfg, stage, i))
            continue
        if stage.kind == "python":
            out.append(None)  # nothing to validate beyond the stage itself: `call` is imported when it runs
            continue
        try:
            out.append(type(cfg).model_validate(stage_dict(base, stage)))
        except ValidationError as e:
            lines = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(
                f"stages[{i}] ({stage.name!r}): the base config with this stage's overrides is invalid: {lines}"
            ) from None
    return out


def autoencoder_config(cfg: Any, stage: StageConfig, index: int) -> Any:
    """An autoencoder stage's config, validated by the model family that trains it, run in the stage's folder."""
    from flowtrain.autoencoder import load_autoencoder_config
    from flowtrain.models import TrainsAutoencoder, get_family

    family = get_family(cfg.model.family)
    if not isinstance(family, TrainsAutoencoder):
        raise ValueError(
            f"stages[{index}] ({stage.name!r}): model family {cfg.model.family!r} has no autoencoder trainer"
        )
    overrides = [*stage.autoencoder_overrides, f"output_dir={cfg.output_dir}/{STAGES_DIR}/{stage.name}"]
    if stage.autoencoder_from is not None:  # that stage's folder holds its trained `vae/`
        overrides.append(f"model.pretrained={cfg.output_dir}/{STAGES_DIR}/{stage.autoencoder_from}")
    if stage.steps is not None:
        overrides.append(f"train.max_steps={stage.steps}")
    try:
        ae = load_autoencoder_config(stage.autoencoder, overrides)
    except (ValueError, OSError) as e:
        raise ValueError(f"stages[{index}] ({stage.name!r}): autoencoder {stage.autoencoder}: {e}") from None
    t = ae.tracking
    if "mlflow" in t.report_to and not t.uri:  # the pipeline's store, so its run nests under the pipeline's run
        uri = cfg.tracking.uri or pipeline_store_uri(cfg.output_dir)
        ae = ae.model_copy(update={"tracking": t.model_copy(update={"uri": uri})})
    return ae


def _model_key(c: Any) -> tuple:
    """What must stay the same across transformer stages: the model every stage trains."""
    return c.model.family, c.model.pretrained, c.model.dit


def segment_key(c: Any) -> tuple:
    """What a stage's trained tensors are: all weights (`full`), or one LoRA shape. Consecutive transformer stages
    with the same key form a segment whose tensors carry over by name; at a change the earlier segments are
    baked into the base weights (`flowtrain.train.stages`)."""
    lora = (c.lora.rank, c.lora.kind, str(c.lora.targets)) if c.train_mode == "lora" else None
    return c.train_mode, lora


def _trains(c: Any) -> str:
    return f"LoRA rank {c.lora.rank} ({c.lora.kind}) on {c.lora.targets}" if c.train_mode == "lora" else "all weights"


def transition_text(prev: Any, c: Any) -> str:
    """What carries over from a transformer stage (config `prev`) into the next one (`c`), for the plan."""
    if segment_key(prev) == segment_key(c):
        return f"{'its LoRA adapter' if c.train_mode == 'lora' else 'its trained weights'}, by name"
    if prev.train_mode == "lora" and c.train_mode == "full":
        return "the base with its LoRA merged in (peft's merge, in fp32); all weights train from it"
    if prev.train_mode == "full":
        return (f"its full weights, as the frozen base ({c.model.dtype}) of a new LoRA, which is relative to them "
                "(pipeline.json names the base to sample with)")  # fmt: skip
    return (f"the base with its LoRA merged in; a new LoRA ({_trains(c)}) starts on it, relative to that base "
            "(pipeline.json names the base to sample with)")  # fmt: skip


def check_stages(cfg: Any) -> list[Any]:
    """Validate the pipeline as a whole; returns the stage configs (`stage_configs`)."""
    names = [s.name for s in cfg.stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"stages: names must be unique (each names a folder); repeated: {dup}")
    for i, stage in enumerate(cfg.stages):
        earlier = {s.name for s in cfg.stages[:i] if s.kind == "autoencoder"}
        if stage.autoencoder_from is not None and stage.autoencoder_from not in earlier:
            raise ValueError(
                f"stages[{i}] ({stage.name!r}): autoencoder_from {stage.autoencoder_from!r} is not an earlier "
                f"autoencoder stage (earlier ones: {sorted(earlier) or 'none'})"
            )
    configs = stage_configs(cfg)
    last = None  # the previous transformer stage's index
    for i, (stage, c) in enumerate(zip(cfg.stages, configs, strict=True)):
        if stage.kind != "transformer":
            continue
        j, last = last, i
        if j is None or cfg.stages[i - 1].kind != "transformer":
            if stage.optimizer_state == "keep":
                raise ValueError(
                    f"stages[{i}] ({stage.name!r}): optimizer_state keep needs a previous transformer stage right "
                    "before it; use reset"
                )
            if j is None:
                continue
        prev = configs[j]
        if _model_key(prev) != _model_key(c):
            raise ValueError(
                f"stages[{i}] ({stage.name!r}) changes the model of stage {cfg.stages[j].name!r} "
                f"({_model_key(prev)} → {_model_key(c)}): weights carry over from stage to stage, so every "
                "transformer stage trains the same model (model.family, model.pretrained, model.dit)"
            )
        if stage.optimizer_state == "keep":
            if segment_key(prev) != segment_key(c):
                raise ValueError(
                    f"stages[{i}] ({stage.name!r}): optimizer_state keep, but the trained tensors change "
                    f"({_trains(prev)} → {_trains(c)}); use optimizer_state: reset"
                )
            if prev.optimizer.name != c.optimizer.name:
                raise ValueError(
                    f"stages[{i}] ({stage.name!r}): optimizer_state keep, but the optimizer changes "
                    f"{prev.optimizer.name} → {c.optimizer.name}; use optimizer_state: reset"
                )
            if (cfg.stages[j].freeze, cfg.stages[j].unfreeze) != (stage.freeze, stage.unfreeze):
                raise ValueError(
                    f"stages[{i}] ({stage.name!r}): optimizer_state keep, but freeze / unfreeze differ from stage "
                    f"{cfg.stages[j].name!r}, so the trained parameters differ; use optimizer_state: reset"
                )
    return configs


def _length_text(stage: StageConfig, cfg: Any) -> str:
    if stage.epochs is not None:
        return f"{stage.epochs:g} epochs of {cfg.dataset.cache_dir}"
    return f"{cfg.train.max_steps} steps"


def plan_lines(cfg: Any) -> list[str]:
    """The pipeline as `flowtrain check` prints it: per stage what it trains and freezes and how it ends."""
    configs = check_stages(cfg)
    lines = [f"pipeline: {len(configs)} stages in {cfg.output_dir}/stages/"]
    prev, prev_name = None, None  # the previous transformer stage's config and name
    for i, (stage, c) in enumerate(zip(cfg.stages, configs, strict=True)):
        if stage.kind == "autoencoder":
            lines.append(f"{i + 1}. {stage.name}: trains the autoencoder ({stage.autoencoder}), all its weights")
            lines.append(f"   data {c.data.raw_dir}, {c.train.max_steps} steps at lr {c.train.learning_rate:g}")
            lines.append(f"   ends after {c.train.max_steps} steps")
            continue
        if stage.kind == "python":
            lines.append(f"{i + 1}. {stage.name}: runs {stage.call} (trains nothing)")
            continue
        lines.append(f"{i + 1}. {stage.name}: trains the transformer, {_trains(c)}")
        if prev is not None:
            lines.append(f"   carries over from {prev_name}: {transition_text(prev, c)}")
        prev, prev_name = c, stage.name
        lines.append(f"   data {c.dataset.cache_dir}, loss {c.loss.name} ({c.loss.base})")
        lines.append(f"   optimizer {c.optimizer.name} lr {c.train.learning_rate:g} ({c.lr_scheduler.name}), state "
                     f"{'kept from the previous stage' if stage.optimizer_state == 'keep' else 'new'}")  # fmt: skip
        if stage.freeze:
            lines.append(f"   freezes {stage.freeze}" + (f" except {stage.unfreeze}" if stage.unfreeze else ""))
        ends = [f"after {_length_text(stage, c)}"]
        e = stage.end
        since = f" from step {e.min_steps}" if e.min_steps else ""
        if e.loss_below is not None:
            ends.append(f"when the smoothed loss (β {e.smoothing:g}) < {e.loss_below:g}{since}")
        if e.patience is not None:
            ends.append(f"on a plateau: no improvement > {e.min_delta:g} for {e.patience} steps{since} (early stop)")
        lines.append("   ends " + ", or ".join(ends))
    return lines
