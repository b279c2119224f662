"""Training pipelines (`stages:`): run the stages of a config one after another through the one training loop.

Each stage is a whole run in `{output_dir}/stages/{name}` (its own checkpoints, logs/metrics.jsonl, graphs and
MLflow run), made from the base config plus the stage's overrides (`flowtrain.config.stages`). What ties the
stages together:

- weights carry over: consecutive transformer stages that train the same tensors (all weights, or one LoRA shape:
  a *segment*) load the trainable tensors of the segment's earlier final checkpoints, in order, by name (a tensor
  frozen in stage 2 keeps what stage 1 made of it);
- where the trained tensors change (train_mode LoRA ↔ full, or another LoRA rank / kind / targets), the earlier
  segments are *baked* into the base weights before the stage's own adapter is added: a full segment's tensors are
  copied in, a LoRA segment is merged by peft (`fuse_lora`, exact in fp32). A LoRA trained on such a base is
  relative to it: pipeline.json names the base transformer to sample it with (`lora_base`);
- the optimizer state carries over when the stage says `optimizer_state: keep`;
- `{output_dir}/pipeline.json` records which stages are done, at which step and why they ended, so
  `--resume_from_checkpoint latest` skips finished stages and resumes the current one from its own checkpoint,
  exactly (the end condition's state is in every checkpoint).

The end conditions are small pure functions below; the loop calls `StageEnd.observe` on each logged loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowtrain.config.stages import STAGES_DIR, StageConfig, StageEndConfig, check_stages, segment_key

log = logging.getLogger(__name__)

RECORD = "pipeline.json"


# ---------------------------------------------------------------------------------------------------------------
# End conditions: pure functions of the logged losses.


def smoothed(acc: float, n: int, loss: float, beta: float) -> tuple[float, int, float]:
    """One EMA update of the logged loss: acc ← β·acc + (1-β)·loss over n+1 losses. Returns (acc, n+1, value),
    value bias-corrected (acc / (1 - β^(n+1))) so the first values are not pulled towards 0; β = 0: the loss."""
    acc = beta * acc + (1.0 - beta) * loss
    n += 1
    return acc, n, acc / (1.0 - beta**n)


def below(value: float, threshold: float | None) -> bool:
    """The loss-threshold end: the smoothed loss is strictly below `threshold` (None: never)."""
    return threshold is not None and value < threshold


def plateau_update(
    best: float | None, best_step: int, value: float, step: int, patience: int | None, min_delta: float
) -> tuple[float, int, bool]:
    """The early stop: (best, best_step, stop). An improvement is a value below best - min_delta; the stage stops
    once `patience` optimizer steps have passed since the last one (None: never)."""
    if best is None or value < best - min_delta:
        return value, step, False
    return best, best_step, patience is not None and step - best_step >= patience


@dataclass
class StageEnd:
    """A stage's end condition, fed the logged loss after each logged step; its state rides in every checkpoint,
    so a resumed stage ends at the same step as an uninterrupted one."""

    cfg: StageEndConfig
    acc: float = 0.0
    n: int = 0
    value: float | None = None  # the smoothed loss
    best: float | None = None
    best_step: int = 0
    reason: str | None = None  # "loss_below" / "plateau" once ended

    @property
    def active(self) -> bool:
        return self.cfg.loss_below is not None or self.cfg.patience is not None

    @property
    def ended(self) -> bool:
        return self.reason is not None

    def observe(self, step: int, loss: float) -> bool:
        """Take the logged (process-averaged) loss of `step`; True when the stage ends here. A NaN (every step of
        the log window skipped as non-finite) is not taken."""
        if self.ended:
            return True
        if not math.isfinite(loss):
            return False
        self.acc, self.n, self.value = smoothed(self.acc, self.n, loss, self.cfg.smoothing)
        if step < self.cfg.min_steps:
            return False
        if below(self.value, self.cfg.loss_below):
            self.reason = "loss_below"
        else:
            self.best, self.best_step, stop = plateau_update(
                self.best, self.best_step, self.value, step, self.cfg.patience, self.cfg.min_delta
            )
            if stop:
                self.reason = "plateau"
        return self.ended

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "n": self.n, "value": self.value, "best": self.best, "best_step": self.best_step,
                "reason": self.reason}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        for k, v in (state or {}).items():
            setattr(self, k, v)


# ---------------------------------------------------------------------------------------------------------------
# What a stage does to the model and optimizer build_run made.


def _param_regex(patterns: list[str]) -> re.Pattern | None:
    """A parameter matches a pattern that names it, a module above it, or a suffix of either."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:.*\\.)?(?:{p})(?:\\..*)?" for p in patterns))


def apply_freeze(model: torch.nn.Module, freeze: list[str], unfreeze: list[str]) -> list[str]:
    """Set requires_grad False on the trainable parameters `freeze` matches and `unfreeze` does not. Returns the
    frozen names. A pattern that matches no trainable parameter is an error (a typo would silently train all)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for key, patterns in (("freeze", freeze), ("unfreeze", unfreeze)):
        for p in patterns:
            if not any(_param_regex([p]).fullmatch(n) for n in trainable):
                raise ValueError(
                    f"stage {key} pattern {p!r} matches no trainable parameter; examples of names: {trainable[:4]}"
                )
    fr, un = _param_regex(freeze), _param_regex(unfreeze)
    frozen = [n for n in trainable if fr is not None and fr.fullmatch(n) and not (un is not None and un.fullmatch(n))]
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    if frozen and len(frozen) == len(trainable):
        raise ValueError(f"stage freeze {freeze} freezes every trainable parameter: nothing would train")
    return frozen


def load_carried(model: torch.nn.Module, files: list[Path]) -> int:
    """Copy the tensors of earlier stages' final checkpoints (trainable.safetensors, oldest first) into `model` by
    name, trainable or not. Returns the number of tensors loaded."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    loaded = set()
    with torch.no_grad():
        for f in files:
            state = load_file(str(f))
            unknown = sorted(state.keys() - params.keys())
            if unknown:
                raise ValueError(f"{f}: {len(unknown)} tensors the stage's model does not have (e.g. {unknown[:3]})")
            for n, t in state.items():
                params[n].copy_(t)
                loaded.add(n)
    return len(loaded)


def load_optimizer_moments(optimizer: Any, path: Path) -> None:
    """The previous stage's optimizer state (moments, step counts) into this stage's optimizer, keeping this
    stage's param groups (lr, betas, weight decay), so the stage's own settings apply."""
    old = torch.load(path, map_location="cpu", weights_only=False)
    new = optimizer.state_dict()
    n_old = sum(len(g["params"]) for g in old["param_groups"])
    n_new = sum(len(g["params"]) for g in new["param_groups"])
    if n_old != n_new:
        raise ValueError(
            f"optimizer_state keep: {path} holds the state of {n_old} parameters, this stage trains {n_new}; use "
            "optimizer_state: reset"
        )
    optimizer.load_state_dict({"state": old["state"], "param_groups": new["param_groups"]})


@dataclass
class Segment:
    """Consecutive transformer stages that train the same tensors: their final checkpoints in order, and the
    `lora:` section of the last one (None: full weights)."""

    key: tuple
    lora: Any
    presets: dict[str, list[str]]
    files: list[Path] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)  # each stage's exported weights (transformer/ or LoRA file)


def merge_lora_into(model: torch.nn.Module, lora: Any, presets: dict[str, list[str]], files: list[Path]) -> int:
    """Merge a LoRA segment (`lora:` section, its checkpoints' trainable.safetensors in order) into the plain
    transformer `model` with peft's merge, and remove the adapter layers again. The adapter is made in fp32 (its
    training dtype), so in an fp32 model the merge is W + scale·ΔW in fp32. Returns the number of tensors loaded.
    The adapter's random init draws from a forked RNG: the stage's own seeded draws stay as in a plain run."""
    from diffusers.training_utils import cast_training_params

    from flowtrain.train.trainable import adapter_config, lora_target_regex

    with torch.random.fork_rng(devices=[]):
        model.add_adapter(adapter_config(lora, lora_target_regex(lora.targets, presets)))
    cast_training_params(model, dtype=torch.float32)
    n = load_carried(model, files)
    model.fuse_lora()
    model.unload_lora()
    return n


@dataclass
class StageContext:
    """What `train(..., stage=)` needs to run one stage: build_run calls `prepare_model` on the new transformer
    (before the optimizer exists) and `prepare_optimizer` on a stage that does not resume its own checkpoint; the
    loop feeds `end`."""

    name: str
    index: int
    count: int
    end: StageEnd
    freeze: list[str] = field(default_factory=list)
    unfreeze: list[str] = field(default_factory=list)
    carry: list[Path] = field(default_factory=list)  # the segment's earlier final trainable.safetensors, in order
    optimizer_from: Path | None = None  # the previous stage's final optimizer.pt, with optimizer_state keep
    bake: list[Segment] = field(default_factory=list)  # earlier segments, baked into the base in order

    def prepare_base(self, model: torch.nn.Module) -> None:
        """Bake the earlier segments into the freshly loaded transformer, before any adapter of this stage (a
        full segment's tensors copied in by name; a LoRA segment merged). Nothing when the stage's segment is
        the first."""
        for seg in self.bake:
            n = (
                load_carried(model, seg.files)
                if seg.lora is None
                else merge_lora_into(model, seg.lora, seg.presets, seg.files)
            )
            log.info("stage %d/%d %s: base + %s of %s (%d tensors)", self.index + 1, self.count, self.name,
                     "full weights" if seg.lora is None else "merged LoRA", seg.stages, n)  # fmt: skip

    def prepare_model(self, model: torch.nn.Module) -> None:
        n = load_carried(model, self.carry)
        frozen = apply_freeze(model, self.freeze, self.unfreeze)
        log.info("stage %d/%d %s: %d tensors carried over, %d parameters frozen", self.index + 1, self.count,
                 self.name, n, len(frozen))  # fmt: skip

    def sample_prefix(self, sampler: Any, start_step: int, accumulation: int) -> Any:
        """step → `{stage}_epoch{epoch:03d}_` for validation image names: the epoch the metrics log at that step
        (the data position after it; `sampler` counts from the run's start position, `start_step`)."""
        return lambda step: f"{self.name}_epoch{sampler.position_after((step - start_step) * accumulation)[0]:03d}_"

    def prepare_optimizer(self, optimizer: Any) -> None:
        if self.optimizer_from is not None:
            load_optimizer_moments(optimizer, self.optimizer_from)


# ---------------------------------------------------------------------------------------------------------------
# The plan and the runner.


def steps_for_epochs(epochs: float, rows: int, batch_size: int, world: int, accumulation: int) -> int:
    """Optimizer steps in `epochs` epochs of `rows` rows (the sampler drops the incomplete last batch), rounded up."""
    batches = rows // (batch_size * world)
    if batches == 0:
        raise ValueError(f"{rows} rows make no batch of {batch_size} × {world} processes: lower train.batch_size")
    return max(1, math.ceil(epochs * batches / accumulation))


def resolve_length(stage: StageConfig, cfg: Any) -> Any:
    """The stage's config with an `epochs` length turned into train.max_steps (reads the cache's row count)."""
    if stage.epochs is None:
        return cfg
    from flowtrain.data.cache import CacheDataset

    if cfg.dataset.cache_dir is None:
        raise ValueError(f"stage {stage.name!r}: a length in epochs needs dataset.cache_dir")
    rows = len(CacheDataset(cfg.dataset.cache_dir))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = cfg.model_copy(deep=True)
    cfg.train.max_steps = steps_for_epochs(
        stage.epochs, rows, cfg.train.batch_size, world, cfg.train.gradient_accumulation_steps
    )
    return cfg


def read_record(out: Path) -> dict[str, Any]:
    path = out / RECORD
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _write_record(out: Path, record: dict[str, Any]) -> None:
    tmp = out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / RECORD)  # atomic: a kill leaves the old record or the new one


@dataclass
class PipelineResult:
    """What `flowtrain train` reports for a pipeline: the attributes of a TrainResult (of the stage that ran
    last), plus every stage's end."""

    output_dir: Path
    step: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    interrupted: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → {"step", "ended", "checkpoint"}


def run_pipeline(cfg: Any, *, resume: str | None = None, progress: bool = True) -> PipelineResult:
    """Run `cfg.stages` in order. `resume='latest'` skips the stages `pipeline.json` records as done and resumes
    the current one from its newest checkpoint (or starts it afresh when it has none)."""
    from flowtrain.config import save_config
    from flowtrain.train.checkpoint import list_checkpoints
    from flowtrain.train.loop import train

    if resume not in (None, "latest"):
        raise ValueError(
            f"--resume_from_checkpoint {resume}: a pipeline resumes with `latest` (each stage from its own newest "
            "checkpoint)"
        )
    configs = check_stages(cfg)
    out = Path(cfg.output_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    single = [s.name for s in cfg.stages if s.kind != "transformer"]
    if single and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"stages {single} (autoencoder / python) run in one process: launch this pipeline without "
                         "accelerate launch / torchrun, or split it")  # fmt: skip
    record = read_record(out) if resume else {"stages": {}}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    result = PipelineResult(output_dir=out)
    parent = _mlflow_parent(cfg, record) if main else None
    if parent is not None:
        _write_record(out, record)
    segments: list[Segment] = []  # the transformer stages so far, grouped by what they train
    last_final: Path | None = None
    for i, (stage, scfg) in enumerate(zip(cfg.stages, configs, strict=True)):
        done = record["stages"].get(stage.name)
        if done is not None and done.get("status") == "done" and stage.kind != "transformer":
            last_final, result.stages[stage.name] = None, done  # nothing of it carries into the transformer
            continue
        if done is not None and done.get("status") == "done":
            final = Path(done["checkpoint"])
            if not (final / "trainable.safetensors").exists():
                raise FileNotFoundError(
                    f"{out / RECORD} records stage {stage.name!r} as done at {final}, but that checkpoint is gone; "
                    "the stages after it start from it: restore it, or delete the stage's entry to train it again"
                )
            _add_to_segments(segments, stage.name, scfg, final)
            last_final, result.stages[stage.name] = final, done
            continue
        if stage.kind == "python":
            if main:
                log.info("stage %d/%d %s: %s", i + 1, len(configs), stage.name, stage.call)
                value = run_python_stage(cfg, stage, Path(cfg.output_dir) / STAGES_DIR / stage.name, progress=progress)
                entry = {"status": "done", "step": 0, "ended": "done", "checkpoint": None, "result": value}
                result.stages[stage.name] = record["stages"][stage.name] = entry
                _write_record(out, record)
            last_final = None
            continue
        if stage.kind == "autoencoder":
            if main:
                log.info("stage %d/%d %s: training the autoencoder", i + 1, len(configs), stage.name)
            ae = run_autoencoder_stage(scfg, progress=progress)
            if parent is not None:
                _nest(parent, Path(scfg.output_dir))
            stats = getattr(ae, "stats", None) or {}
            entry = {"status": "done", "step": ae.step, "ended": "length", "checkpoint": None,
                     "vae": str(ae.vae_dir), "final": getattr(ae, "final", None),
                     "reconstruction_l1": stats.get("reconstruction_l1")}  # fmt: skip
            result.stages[stage.name] = record["stages"][stage.name] = entry
            result.output_dir, result.step, result.losses = Path(scfg.output_dir), ae.step, {}
            if main:
                _write_record(out, record)
            last_final = None
            continue
        scfg = resolve_length(stage, scfg)
        stage_out = Path(scfg.output_dir)
        same = bool(segments) and segments[-1].key == segment_key(scfg)
        carry, bake = (segments[-1].files, segments[:-1]) if same else ([], segments)
        own = resume is not None and bool(list_checkpoints(stage_out))
        if not own and main and stage_out.exists():
            shutil.rmtree(stage_out)  # an attempt that wrote no checkpoint: nothing in it to keep
        ctx = StageContext(
            name=stage.name, index=i, count=len(configs), end=StageEnd(stage.end), freeze=stage.freeze,
            unfreeze=stage.unfreeze, carry=list(carry), bake=list(bake),
            optimizer_from=last_final / "optimizer.pt" if stage.optimizer_state == "keep" and last_final else None,
        )  # fmt: skip
        if main:
            log.info("stage %d/%d %s: %s", i + 1, len(configs), stage.name, "resuming" if own else "starting")
        _fresh_precision(scfg, i)
        r = train(scfg, resume="latest" if own else None, progress=progress, stage=ctx)
        result.output_dir, result.step, result.losses = r.output_dir, r.step, r.losses
        if parent is not None:
            _nest(parent, stage_out)
        if r.interrupted:
            result.interrupted = r.interrupted
            return result
        final = stage_out / f"checkpoint-{r.step}"
        entry = {"status": "done", "step": r.step, "ended": ctx.end.reason or "length", "checkpoint": str(final)}
        if scfg.train_mode == "lora" and bake and main:
            entry["lora_base"] = lora_base(scfg, ctx, stage_out)
        result.stages[stage.name] = record["stages"][stage.name] = entry
        if main:
            _write_record(out, record)
            log.info("stage %d/%d %s ended at step %d (%s)", i + 1, len(configs), stage.name, r.step, entry["ended"])
        _add_to_segments(segments, stage.name, scfg, final)
        last_final = final
    if parent is not None:
        _mlflow_client(parent).set_terminated(parent["run_id"], "FINISHED")
    return result


def _add_to_segments(segments: list[Segment], name: str, cfg: Any, final: Path) -> None:
    """Record a finished transformer stage (its config, final checkpoint) in its segment, or start a new one."""
    from flowtrain.models import get_family

    key = segment_key(cfg)
    if not segments or segments[-1].key != key:
        lora = cfg.lora if cfg.train_mode == "lora" else None
        segments.append(Segment(key, lora, dict(get_family(cfg.model.family).lora_presets)))
    seg = segments[-1]
    seg.lora = cfg.lora if cfg.train_mode == "lora" else None  # the last stage's alpha scales the merge
    seg.files.append(final / "trainable.safetensors")
    seg.stages.append(name)
    export = "pytorch_lora_weights.safetensors" if cfg.train_mode == "lora" else "transformer"
    seg.exports.append(Path(cfg.output_dir) / export)


BASE_DIR = "base"  # a LoRA stage's own copy of its base, when no earlier export is it: {stage}/base/transformer


def lora_base(cfg: Any, ctx: StageContext, stage_out: Path) -> dict[str, Any]:
    """The base a LoRA stage trained on, for pipeline.json: the earlier stages baked into it and the transformer
    folder that is exactly that base. When the last baked segment trained all weights, its last stage's export is
    the base (it saves every weight); after a merged LoRA no export is, so the merged base (in model.dtype, as it
    trained) is written to `{stage}/base/transformer`."""
    last = ctx.bake[-1]
    stages = [n for seg in ctx.bake for n in seg.stages]
    if last.lora is None:
        return {"stages": stages, "transformer": str(last.exports[-1])}
    from flowtrain.dtypes import torch_dtype
    from flowtrain.models import get_family

    path = stage_out / BASE_DIR / "transformer"
    if not path.is_dir():  # written once: a resumed stage finds it
        family = get_family(cfg.model.family)
        model = family.load_transformer(cfg.model, dtype=torch_dtype(cfg.model.dtype), weights=cfg.model.dit)
        ctx.prepare_base(model)
        tmp = stage_out / f".{BASE_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        family.save_full(tmp, model)
        shutil.rmtree(stage_out / BASE_DIR, ignore_errors=True)
        tmp.rename(stage_out / BASE_DIR)
        log.info("stage %s: its LoRA is relative to the merged base of %s, saved to %s", ctx.name, stages, path)
    return {"stages": stages, "transformer": str(path)}


def sampling_base(lora_file: Path) -> Path | None:
    """The base transformer a pipeline stage's exported LoRA was trained on, when it is not the pretrained model
    (`lora_base` in the pipeline's pipeline.json), else None. `lora_file`: {output_dir}/stages/{name}/<file>."""
    stage_dir = lora_file.parent if lora_file.is_file() else lora_file
    record = stage_dir.parent.parent / RECORD
    if stage_dir.parent.name != STAGES_DIR or not record.exists():
        return None
    entry = json.loads(record.read_text()).get("stages", {}).get(stage_dir.name) or {}
    base = (entry.get("lora_base") or {}).get("transformer")
    if base is None:
        return None
    if not Path(base).is_dir():
        raise FileNotFoundError(
            f"{lora_file}: pipeline stage {stage_dir.name!r} trained its LoRA on the base {base} ({record}), which "
            "is gone: the LoRA is relative to it, not to model.pretrained; restore that folder to sample it"
        )
    return Path(base)


def _mlflow_client(parent: dict[str, str]) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=parent["uri"])


def _mlflow_parent(cfg: Any, record: dict[str, Any]) -> dict[str, str] | None:
    """The pipeline's own MLflow run, under which each transformer stage's run nests (`mlflow.parentRunId`):
    made once (its id in pipeline.json, so a resumed pipeline keeps it), in the store every stage logs to."""
    from flowtrain.config.stages import pipeline_store_uri

    t = cfg.tracking
    if "mlflow" not in t.report_to:
        return None
    if record.get("mlflow_parent"):
        return record["mlflow_parent"]
    from flowtrain.track.mlflow_store import telemetry_off_by_default

    telemetry_off_by_default(os.environ)
    out = Path(cfg.output_dir).resolve()
    parent = {"uri": t.uri or pipeline_store_uri(cfg.output_dir)}
    client = _mlflow_client(parent)
    exp = client.get_experiment_by_name(t.experiment_name)
    if exp is None:  # made here first, with the artifact folder a plain run's local store gets
        exp_id = client.create_experiment(
            t.experiment_name, artifact_location=None if t.uri else (out / "mlartifacts").as_uri()
        )
    else:
        exp_id = exp.experiment_id
    tags = {"flowtrain.output_dir": str(out), "flowtrain.pipeline": ",".join(s.name for s in cfg.stages)}
    run = client.create_run(exp_id, run_name=t.run_name or out.name, tags=tags)
    parent["run_id"] = run.info.run_id
    record["mlflow_parent"] = parent
    return parent


def _nest(parent: dict[str, str], stage_dir: Path) -> None:
    """Tag a stage's MLflow run (its id in logs/mlflow_run.json) as a child of the pipeline's run."""
    from flowtrain.track.mlflow_store import RUN_FILE

    path = stage_dir / RUN_FILE
    if not path.exists():
        log.warning("mlflow: %s is missing; stage run not nested under the pipeline's run", path)
        return
    _mlflow_client(parent).set_tag(json.loads(path.read_text())["run_id"], "mlflow.parentRunId", parent["run_id"])


def run_python_stage(cfg: Any, stage: StageConfig, stage_dir: Path, *, progress: bool = True) -> Any:
    """Call a kind python stage's `call` (imported like a user loss, `package.module:function`) in a fresh stage
    folder: function(base config, stage_dir, args, progress=...). A stage cut short runs again from its start."""
    import importlib

    module, _, name = stage.call.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"stage {stage.name!r}: call {stage.call!r} cannot be imported ({e})") from None
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    value = fn(cfg, stage_dir, dict(stage.args), progress=progress)
    return json.loads(json.dumps(value if value is not None else {}, default=str))


def run_autoencoder_stage(cfg: Any, *, progress: bool = True) -> Any:
    """The one call into the autoencoder trainer (`flowtrain.autoencoder`; the config's model family builds the VAE
    and fits its own latent statistics at the end): `cfg` trained in its output_dir, the stage's folder; returns its
    result (`step`, `vae_dir`). A stage cut short continues from its newest checkpoint (`checkpointing.every_steps`),
    exactly; without one it starts over, to the same weights (the trainer is seeded). A finished stage is never
    redone (pipeline.json)."""
    from flowtrain.autoencoder import train_autoencoder

    return train_autoencoder(cfg, run_dir=cfg.output_dir, resume="latest", progress=progress)


_PRECISION: dict[str, str] = {}


def _fresh_precision(cfg: Any, index: int) -> None:
    """accelerate fixes a process's mixed precision at the first Accelerator(); a stage with another one gets a
    new accelerator state (the process group, in PartialState, stays)."""
    prev = _PRECISION.get("last")
    if index > 0 and prev is not None and prev != cfg.train.mixed_precision:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    _PRECISION["last"] = cfg.train.mixed_precision
