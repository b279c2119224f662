"""Checks of the model and weight paths `flowtrain sample` is given, made before anything loads.

A wrong path used to fail after ~15 s of loading, with a diffusers message that named neither the file nor the fix
("When using the offline mode, you must specify a `weight_name`"), and a damaged or foreign file with a traceback.
These checks read only file headers (safetensors' header is a few KB), so they cost milliseconds, and each problem
gets one message that names the flag, the file and what to give instead. `load_errors` translates the errors that
only loading can find (a LoRA made for another model) the same way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flowtrain.models.paths import is_local, subfolder_if_exists

LORA_FILE = "pytorch_lora_weights.safetensors"  # what `flowtrain train` exports (diffusers' default name)


def _exists(path: str, flag: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or folder; give {what}")
    return p


def safetensors_keys(path: Path, flag: str) -> list[str]:
    """The tensor names of a safetensors file; its header is read and validated (lengths, offsets, file size)."""
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":
        raise ValueError(
            f"{flag} {path}: only .safetensors weights are loaded (pickle-based .bin/.pt/.ckpt files can run code); "
            "convert it to safetensors first"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:  # numpy: the header check needs no torch
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{flag} {path}: not a readable safetensors file ({e}); it is damaged or not weights") from e
    if not keys:
        raise ValueError(f"{flag} {path}: the safetensors file holds no tensors")
    return keys


def lora_file(path: str, flag: str = "--lora") -> Path:
    """The LoRA file `--lora PATH` means: the file itself, or the one LoRA file of a folder (a training run's
    `pytorch_lora_weights.safetensors`, or a folder's only `.safetensors` file). Its header must read as LoRA
    weights."""
    p = _exists(path, flag, f"a LoRA .safetensors file or the training run folder holding {LORA_FILE}")
    if p.is_dir():
        p = _lora_in_folder(p, path, flag)
    keys = safetensors_keys(p, flag)
    if not any(f in k.lower() for k in keys for f in _ADAPTER_FRAGMENTS):
        raise ValueError(
            f"{flag} {p}: holds no LoRA tensors (names with lora_A / lora_B, or LoHa / LoKr's hada_ / lokr_, e.g. "
            f"{keys[0]!r} is not one): is it a full model's weights? Give those with --transformer"
        )
    return p


_ADAPTER_FRAGMENTS = ("lora", "hada_", "lokr_")  # key fragments of the adapter kinds `lora.kind` trains


def adapter_metadata(path: Path) -> dict:
    """The peft adapter config diffusers' `save_lora_weights` writes into a LoRA file's header
    (`lora_adapter_metadata`), its keys without their `transformer.` prefix; {} when there is none."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()} if raw else {}


def adapter_kind(path: Path) -> str:
    """The `lora.kind` a LoRA file was trained as: lora, dora, loha or lokr, from the peft config in its header
    (`peft_type`, `use_dora`: flowtrain saves it there), else from its key names (files of other trainers)."""
    meta = adapter_metadata(path)
    peft_type = meta.get("peft_type")
    if peft_type in ("LOHA", "LOKR"):
        return peft_type.lower()
    if peft_type == "LORA":
        return "dora" if meta.get("use_dora") else "lora"
    keys = safetensors_keys(path, "--lora")
    for fragment, kind in (("hada_", "loha"), ("lokr_", "lokr"), ("lora_magnitude_vector", "dora")):
        if any(fragment in k for k in keys):
            return kind
    return "lora"


def _lora_in_folder(folder: Path, given: str, flag: str) -> Path:
    if (folder / LORA_FILE).is_file():
        return folder / LORA_FILE
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"{flag} {given}: the folder holds no .safetensors LoRA file ({LORA_FILE} is what a training run "
            "writes when it finishes); give the file, or the folder of a finished LoRA run"
        )
    names = ", ".join(p.name for p in found[:4])
    raise ValueError(f"{flag} {given}: the folder holds several .safetensors files ({names}); give the LoRA file")


def transformer_folder(path: str, flag: str = "--transformer") -> Path:
    """A full fine-tune's diffusers transformer folder (RUN/transformer, or RUN itself): config.json plus readable
    .safetensors weights."""
    p = _exists(path, flag, "the diffusers transformer folder a full fine-tune writes (RUN/transformer)")
    if p.is_file():
        raise ValueError(
            f"{flag} {path} is a file; give the diffusers transformer folder a full fine-tune writes "
            "(RUN/transformer), or a LoRA file with --lora"
        )
    folder = p / (subfolder_if_exists(p, "transformer") or "")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{flag} {path} is not a diffusers model folder (config.json is missing); give RUN/transformer of a "
            "finished full fine-tune"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{flag} {folder}: holds no .safetensors weights (only those are loaded)")
    for w in weights:
        safetensors_keys(w, flag)
    return folder


def pipeline_path(model: str, flag: str = "--model") -> None:
    """A model that is clearly a local path (absolute, ./, ~, or existing) must be a diffusers pipeline folder;
    anything else may be a hub id, which only loading can check (see `load_errors`)."""
    if not is_local(model):
        return
    p = Path(model).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{flag} {model}: no such folder; give a diffusers pipeline folder (with model_index.json) or a hub id"
        )
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{flag} {model} is not a diffusers pipeline folder (model_index.json is missing); give the folder that "
            "holds it"
        )


# torch's load_state_dict message, one line per tensor: "size mismatch for NAME: copying a param with shape A from
# checkpoint, the shape in current model is B."
_MISMATCH = re.compile(
    r"size mismatch for (\S+?):? copying a param with shape (.+?) from checkpoint, the shape in current model is "
    r"(.+?)\.?$",
    re.M,
)


@contextmanager
def load_errors(model: str, lora: str | Path | None = None) -> Iterator[None]:
    """Turn what diffusers raises for a model it cannot find, or a LoRA that does not fit the model, into one
    line that names both (the CLI prints it and exits 2)."""
    # diffusers logs a failed LoRA load at ERROR, state_dict dump included, before raising; the message below
    # says it in one line.
    peft_log = logging.getLogger("diffusers.loaders.peft")
    level = peft_log.level
    peft_log.setLevel(logging.CRITICAL)
    try:
        yield
    except OSError as e:  # diffusers / the hub report a missing model or file as OSError
        # diffusers points at "the stacktrace above", which the CLI does not show
        why = " ".join(str(e).replace("Please check out the root cause in the stacktrace above.", "").split())
        raise FileNotFoundError(f"could not load {model!r}: {why}") from e
    except ValueError as e:  # peft's NoMatchingPeftModuleError: not one module of the file exists in the model
        if lora is None or "not found in the base model" not in str(e):
            raise
        raise ValueError(
            f"LoRA {lora} does not fit the model {model}: none of its modules exists in the model ({e}); it was "
            "trained for another model"
        ) from e
    except RuntimeError as e:
        m = _MISMATCH.search(str(e))
        if lora is None or m is None:
            raise
        name, theirs, ours = (re.sub(r"torch\.Size\((\[.*?\])\)", r"\1", g) for g in m.groups())
        raise ValueError(
            f"LoRA {lora} does not fit the model {model}: {name} has shape {theirs} in the file but {ours} in the "
            "model; it was trained for another model (or a changed architecture)"
        ) from e
    finally:
        peft_log.setLevel(level)


def lora_modules(keys: list[str]) -> set[str]:
    """The modules a diffusers-format adapter file adapts: `transformer.X.lora_A.weight` → `X` (LoHa:
    `X.hada_w1_a`, LoKr: `X.lokr_w1` or `X.lokr_w1_a`). Empty for files in other formats (kohya, original), whose
    names diffusers converts while loading."""
    suffixes = (".lora_A.weight", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a")
    return {
        k[len("transformer.") : -len(sfx)]
        for k in keys
        if k.startswith("transformer.")
        for sfx in suffixes
        if k.endswith(sfx)
    }


def check_lora_applied(lora: str | Path, model: str, wanted: set[str], adapted: set[str]) -> None:
    """Every module a diffusers-format LoRA file names must have been adapted: peft skips names the model lacks
    (a LoRA for a variant with other blocks) without a word, which leaves part of the LoRA silently unused."""
    missing = sorted(wanted - adapted)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"LoRA {lora} does not fit the model {model}: {len(missing)} of its {len(wanted)} modules do not exist "
            f"in the model ({shown}); it was trained for another model (or a changed architecture)"
        )
