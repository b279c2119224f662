"""A quantized frozen base for LoRA training (QLoRA-style): `model.quantize: int8 | float8 | nf4`.

The base transformer's block Linears are replaced by quantized ones after loading; the adapters peft adds on top
stay in float32 (`cast_training_params`), so the trained file is an ordinary adapter that loads on the
unquantized base. int8 and float8 are torchao's weight-only configs (torchao's tensor subclasses keep the
nn.Linear modules, and peft has a LoRA layer for them); nf4 is bitsandbytes' 4-bit NormalFloat Linear, which
quantizes when its weight moves to CUDA and runs there only.

Only the Linears inside the repeated transformer blocks (the children of the model's nn.ModuleLists) are
quantized: they hold nearly all the weights, while the embedders, the modulation and the final layer are small and
feed every block, so quantizing them would cost accuracy for little memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

QUANTIZE = ("none", "int8", "float8", "nf4")


def check_quantize(kind: str, *, train_mode: str, lora_kind: str, cuda: bool) -> None:
    """Refuse, before anything loads, a `model.quantize` this run cannot use (ValueError naming the keys and the
    fix). `cuda`: whether this process trains on a CUDA device."""
    if kind == "none":
        return
    if train_mode != "lora":
        raise ValueError(
            f"model.quantize={kind} needs train_mode: lora (a quantized base is frozen; a full fine-tune trains "
            "every weight in float32): set model.quantize: none, or train_mode: lora"
        )
    if kind in ("float8", "nf4") and not cuda:
        raise ValueError(
            f"model.quantize={kind} runs on a CUDA GPU only ({'torchao float8' if kind == 'float8' else 'bitsandbytes'}"
            " kernels) and this run has none; use model.quantize: int8 (runs on CPU too) or none"
        )
    package, extra = ("bitsandbytes", "optim") if kind == "nf4" else ("torchao", "lowbit")
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"model.quantize={kind} needs {package}: pip install 'flowtrain[{extra}]'")
    if kind == "nf4" and lora_kind in ("loha", "lokr"):
        raise ValueError(
            f"model.quantize=nf4 with lora.kind={lora_kind}: peft's {lora_kind} layers read the base weight's shape, "
            "which bitsandbytes packs; use lora.kind lora or dora with nf4, or model.quantize int8 / float8"
        )


def block_linears(model: torch.nn.Module) -> list[str]:
    """Names of the nn.Linear modules inside the repeated blocks (children of an nn.ModuleList), the ones to
    quantize."""
    names: list[str] = []
    for list_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList):
            for sub, m in mod.named_modules(prefix=list_name):
                if isinstance(m, torch.nn.Linear):
                    names.append(sub)
    return list(dict.fromkeys(names))


def quantize_base(model: torch.nn.Module, kind: str) -> int:
    """Quantize `model`'s block Linears in place to `kind` (int8 / float8: torchao weight-only; nf4: bitsandbytes,
    moved to the current CUDA device). Returns how many Linears were quantized."""
    if kind == "none":
        return 0
    names = set(block_linears(model))
    if kind == "nf4":
        _to_nf4(model, names)
    else:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
        quantize_(model, config, filter_fn=lambda m, name: name in names)
    log.info("model.quantize=%s: %d block Linear layers of the frozen base quantized", kind, len(names))
    return len(names)


def _to_nf4(model: torch.nn.Module, names: set[str]) -> None:
    """Swap each named nn.Linear for a bitsandbytes Linear4bit (NF4, compute in the weight's dtype) on the current
    CUDA device. bitsandbytes quantizes a Params4bit when it moves to CUDA, which is why this needs the device
    (what diffusers' own bitsandbytes loader does too, there at load time)."""
    import bitsandbytes as bnb

    device = torch.device("cuda", torch.cuda.current_device())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=old.weight.dtype, quant_type="nf4")  # fmt: skip
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, child, new.to(device))


@contextlib.contextmanager
def quiet_adapter_setup() -> Iterator[None]:
    """peft warns once per torchao-quantized Linear that merging the adapter into it is unavailable; training never
    merges (the adapter file is saved on its own), so that warning is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        yield
