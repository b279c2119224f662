"""The trainable transformer a config asks for: loaded by the model family, then LoRA through peft or all weights;
plus the frozen distillation teacher, and the trainable state a checkpoint holds."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from flowtrain.config.schema import FlowtrainConfig
from flowtrain.dtypes import torch_dtype
from flowtrain.models import ModelFamily, ModelPathError

log = logging.getLogger(__name__)


def lora_target_regex(targets: str | list[str], presets: dict[str, list[str]]) -> str:
    """One full-match regex over module names. A string names a preset; list entries are regexes or names.

    Each list entry also matches as a name suffix (`to_q` → any `....to_q`), so users can write plain names.
    """
    if isinstance(targets, str):
        if targets not in presets:
            raise ValueError(f"lora.targets: unknown preset {targets!r}; presets are {sorted(presets)}")
        patterns = presets[targets]
    else:
        patterns = list(targets)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"lora.targets: {p!r} is not a valid regex ({e})") from None
    return "|".join(f"(?:.*\\.)?(?:{p})" for p in patterns)


def matching_linear_modules(model: torch.nn.Module, regex: str) -> list[str]:
    """Names of nn.Linear modules whose full name matches `regex` (what peft will wrap)."""
    pattern = re.compile(regex)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]


def check_lora_targets(model: torch.nn.Module, targets: str | list[str], presets: dict[str, list[str]]) -> list[str]:
    """Everything peft would trip over, checked before `add_adapter` (which leaves a half-configured model when it
    fails): the targets match some Linear; no user entry matches nothing (a typo); nothing but Linear layers
    match (peft cannot wrap e.g. an attention block or a ModuleList). Returns the matched Linear names."""
    regex = lora_target_regex(targets, presets)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    modules = matching_linear_modules(model, regex)
    if not modules:
        raise ValueError(
            f"lora.targets={targets!r} matches no Linear module of the transformer; examples of names: "
            f"{linear_names[:6]}; presets: {sorted(presets)}"
        )
    if isinstance(targets, list):
        for entry in targets:
            if not matching_linear_modules(model, lora_target_regex([entry], presets)):
                raise ValueError(
                    f"lora.targets entry {entry!r} matches no Linear module (a typo?); examples of names: "
                    f"{linear_names[:6]}"
                )
    pattern = re.compile(regex)
    other = [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if n and not isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)
    ]
    if other:
        raise ValueError(
            f"lora.targets={targets!r} also matches modules that are not Linear layers: {other[:5]}; LoRA wraps "
            "Linear layers only: name the Linear inside (e.g. `attn.to_out.0`) or anchor the regex"
        )
    return modules


def apply_lora(transformer: torch.nn.Module, cfg: FlowtrainConfig, presets: dict[str, list[str]]) -> Any:
    """Freeze the base, add a peft LoRA adapter on the configured targets; returns the peft LoraConfig.

    Targets are checked before `add_adapter`: a failed add_adapter leaves the model half-configured.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    regex = lora_target_regex(cfg.lora.targets, presets)
    modules = check_lora_targets(transformer, cfg.lora.targets, presets)
    transformer.requires_grad_(False)
    lora_cfg = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.effective_alpha,
        lora_dropout=cfg.lora.dropout,
        init_lora_weights="gaussian" if cfg.lora.init == "gaussian" else True,
        target_modules=regex,
    )
    transformer.add_adapter(lora_cfg)
    # LoRA weights train in fp32 even when the frozen base is bf16 (diffusers' recipe).
    cast_training_params(transformer, dtype=torch.float32)
    n_train = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in transformer.parameters())
    log.info(
        "LoRA rank %d on %d Linear modules (lora.targets=%r): %d trainable parameters (%.3f%% of %d)",
        cfg.lora.rank, len(modules), cfg.lora.targets, n_train, 100.0 * n_train / n_all, n_all,
    )  # fmt: skip
    return lora_cfg


def build_transformer(cfg: FlowtrainConfig, family: ModelFamily) -> tuple[torch.nn.Module, Any]:
    """Load the transformer and make it trainable. Returns (transformer, peft LoraConfig or None)."""
    # Full fine-tune keeps fp32 master weights (autocast does the low-precision compute); LoRA freezes the
    # base in model.dtype.
    dtype = torch.float32 if cfg.train_mode == "full" else torch_dtype(cfg.model.dtype)
    try:
        transformer = family.load_transformer(cfg.model, dtype=dtype, weights=cfg.model.dit)
    except ModelPathError:
        raise  # already says which key and what to do
    except OSError as e:  # a family's own ValueError (e.g. "not a text-to-image model") already says what to do
        hint = " (weights are loaded only from .safetensors files: convert pickle .bin/.ckpt weights first)"
        raise FileNotFoundError(
            f"could not load the transformer from model.pretrained={cfg.model.pretrained!r}"
            f"{f' / model.dit={cfg.model.dit!r}' if cfg.model.dit else ''}: {e}"
            f"{hint if 'safetensors' in str(e) else ''}"
        ) from e
    if cfg.train.gradient_checkpointing or cfg.train.blocks_to_swap:  # true: diffusers' own; levels: train.offload
        from flowtrain.train.offload import enable_checkpointing

        enable_checkpointing(transformer, cfg.train.gradient_checkpointing, swapped=cfg.train.blocks_to_swap)
    lora_cfg = None
    if cfg.train_mode == "lora":
        lora_cfg = apply_lora(transformer, cfg, family.lora_presets)
    else:
        transformer.requires_grad_(True)
    if cfg.train.compile:  # after LoRA: the compiled graphs include the adapters
        from flowtrain.train.perf import compile_transformer

        compile_transformer(transformer, backend=cfg.train.compile_backend, regional=cfg.train.compile_regional)
    transformer.train()
    return transformer, lora_cfg


def load_teacher(cfg: FlowtrainConfig, family: ModelFamily, device: torch.device | str) -> torch.nn.Module:
    """The distillation teacher from `loss.teacher` (pipeline folder, transformer folder or .safetensors file; the
    architecture of a single file comes from model.pretrained), frozen, in eval mode, in model.dtype on `device`."""
    path = cfg.loss.teacher
    try:
        teacher = family.load_transformer(cfg.model, dtype=torch_dtype(cfg.model.dtype), weights=path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"loss.teacher={path!r}: could not load the teacher transformer ({e}); give a pipeline folder, a "
            "transformer folder or a .safetensors file of the same model family"
        ) from e
    teacher.requires_grad_(False).eval().to(device)
    n = sum(p.numel() for p in teacher.parameters())
    log.info("distillation teacher %s: %.3fM parameters, frozen", path, n / 1e6)
    return teacher


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (what a checkpoint stores)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed trainable tensors in; the set of names must match exactly."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit this model: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}) trainable tensors — "
            "was it saved with another train_mode or lora config?"
        )
    with torch.no_grad():
        for n in expected:
            params[n].copy_(state[n])
