"""Turning config into a trainable transformer: LoRA through peft, or full fine-tune."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from flowtrain.config.schema import FlowtrainConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


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


def apply_lora(transformer: torch.nn.Module, cfg: FlowtrainConfig, presets: dict[str, list[str]]) -> Any:
    """Freeze the base, add a peft LoRA adapter on the configured targets; returns the peft LoraConfig.

    Targets are checked before `add_adapter`: a failed add_adapter leaves the model half-configured.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    regex = lora_target_regex(cfg.lora.targets, presets)
    modules = matching_linear_modules(transformer, regex)
    if not modules:
        raise ValueError(
            f"lora.targets={cfg.lora.targets!r} matches no Linear module of the transformer; "
            f"examples of names: {[n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)][:6]}"
        )
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
    log.info("LoRA on %d modules, %.3fM trainable parameters", len(modules), n_train / 1e6)
    return lora_cfg


def build_transformer(cfg: FlowtrainConfig, adapter: Any) -> tuple[torch.nn.Module, Any]:
    """Load the transformer and make it trainable. Returns (transformer, peft LoraConfig or None)."""
    # Full fine-tune keeps fp32 master weights (autocast does the low-precision compute); LoRA freezes the
    # base in model.dtype.
    dtype = torch.float32 if cfg.train_mode == "full" else torch_dtype(cfg.model.dtype)
    try:
        transformer = adapter.load_transformer(
            cfg.model.pretrained, dit=cfg.model.dit, dtype=dtype, revision=cfg.model.revision
        )
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load the transformer from model.pretrained={cfg.model.pretrained!r}"
            f"{f' / model.dit={cfg.model.dit!r}' if cfg.model.dit else ''}: {e}"
        ) from e
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora_cfg = None
    if cfg.train_mode == "lora":
        lora_cfg = apply_lora(transformer, cfg, adapter.lora_presets)
    else:
        transformer.requires_grad_(True)
    transformer.train()
    return transformer, lora_cfg


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
