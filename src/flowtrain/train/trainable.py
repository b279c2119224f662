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
from flowtrain.train.quantize import check_quantize, quantize_base

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


_KIND_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def adapter_config(lora: Any, target_regex: str) -> Any:
    """The peft config of `lora:` (a `LoraConfig` section) for its `kind`: peft's LoraConfig (lora; dora with
    use_dora), LoHaConfig or LoKrConfig. rank / alpha mean the same for every kind (scale alpha / rank)."""
    import peft

    if lora.kind in ("lora", "dora"):
        kw = {"use_dora": True} if lora.kind == "dora" else {}  # kept out for lora: the config stays as it was
        return peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.effective_alpha,
            lora_dropout=lora.dropout,
            init_lora_weights="gaussian" if lora.init == "gaussian" else True,
            target_modules=target_regex,
            **kw,
        )
    common = dict(r=lora.rank, alpha=lora.effective_alpha, rank_dropout=lora.rank_dropout,
                  module_dropout=lora.module_dropout, target_modules=target_regex)  # fmt: skip
    if lora.kind == "loha":
        return peft.LoHaConfig(**common)
    return peft.LoKrConfig(**common, decompose_factor=lora.decompose_factor, decompose_both=lora.decompose_both)


def apply_lora(transformer: torch.nn.Module, cfg: FlowtrainConfig, presets: dict[str, list[str]]) -> Any:
    """Freeze the base, add a peft adapter of `lora.kind` on the configured targets; returns its peft config.

    Targets are checked before `add_adapter`: a failed add_adapter leaves the model half-configured.
    """
    from diffusers.training_utils import cast_training_params

    from flowtrain.train.quantize import quiet_adapter_setup

    regex = lora_target_regex(cfg.lora.targets, presets)
    modules = check_lora_targets(transformer, cfg.lora.targets, presets)
    transformer.requires_grad_(False)
    lora_cfg = adapter_config(cfg.lora, regex)
    with quiet_adapter_setup():
        transformer.add_adapter(lora_cfg)
    # LoRA weights train in fp32 even when the frozen base is bf16 (diffusers' recipe).
    cast_training_params(transformer, dtype=torch.float32)
    n_train = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in transformer.parameters())
    log.info(
        "%s rank %d on %d Linear modules (lora.targets=%r): %d trainable parameters (%.3f%% of %d)",
        _KIND_NAMES[cfg.lora.kind], cfg.lora.rank, len(modules), cfg.lora.targets, n_train,
        100.0 * n_train / n_all, n_all,
    )  # fmt: skip
    return lora_cfg


def build_transformer(
    cfg: FlowtrainConfig, family: ModelFamily, prepare_base: Any = None
) -> tuple[torch.nn.Module, Any]:
    """Load the transformer (its block Linears quantized with model.quantize) and make it trainable. Returns
    (transformer, the peft adapter config, or None for a full fine-tune). `prepare_base(transformer)`: a pipeline
    stage's change of the loaded base weights, before quantization and adapters (`train.stages`)."""
    # Full fine-tune keeps fp32 master weights (autocast does the low-precision compute); LoRA freezes the
    # base in model.dtype.
    dtype = torch.float32 if cfg.train_mode == "full" else torch_dtype(cfg.model.dtype)
    if cfg.model.quantize != "none":  # before loading: a run that cannot use it fails at once
        check_quantize(cfg.model.quantize, train_mode=cfg.train_mode, lora_kind=cfg.lora.kind,
                       cuda=torch.cuda.is_available())  # fmt: skip
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
    if prepare_base is not None:
        prepare_base(transformer)
    if cfg.train.gradient_checkpointing or cfg.train.blocks_to_swap:  # true: diffusers' own; levels: train.offload
        from flowtrain.train.offload import enable_checkpointing

        enable_checkpointing(transformer, cfg.train.gradient_checkpointing, swapped=cfg.train.blocks_to_swap)
    lora_cfg = None
    if cfg.train_mode == "lora":
        quantize_base(transformer, cfg.model.quantize)  # before the adapters: peft wraps the quantized Linears
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
