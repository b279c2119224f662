"""Model paths: local folder or hub id, pipeline folders and their components, `model_index.json`. Torch-free
(the config layer uses it to detect a model's family)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flowtrain.models.base import ModelPathError

log = logging.getLogger(__name__)


def is_local(path: str) -> bool:
    """A path that is clearly local (absolute, ./, ~, or existing); anything else may be a hub id."""
    p = Path(path).expanduser()
    return p.is_absolute() or path.startswith((".", "~")) or p.exists()


def check_model_path(path: str, key: str, need: str | None = None, example: str = "") -> None:
    """A clear error for a model path that is clearly local but missing or not a diffusers folder; hub ids are
    left to diffusers. `need`: a file the folder must hold (e.g. model_index.json)."""
    if not is_local(path):
        return
    p = Path(path).expanduser()
    if not p.exists():
        hint = f" or a Hugging Face hub id such as {example}" if example else " or a Hugging Face hub id"
        raise ModelPathError(
            f"{key}={path!r}: no such file or folder. Give a local diffusers pipeline folder (with model_index.json)"
            f"{hint}"
        )
    if need is not None and p.is_dir() and not (p / need).exists():
        raise ModelPathError(
            f"{key}={path!r} is not a diffusers pipeline folder ({need} is missing); point it at the folder that "
            "holds model_index.json"
        )


def subfolder_if_exists(path: str | Path, name: str) -> str | None:
    """`name` when `path/name/config.json` exists (a pipeline folder), else None (the component folder itself)."""
    return name if (Path(path) / name / "config.json").exists() else None


def read_model_index(pretrained: str, revision: str | None = None, *, download: bool = False) -> dict | None:
    """`model_index.json` of a pipeline folder or hub id; None when it cannot be read. A hub id is looked up in
    the local Hugging Face cache only, unless `download` (which honours HF_HUB_OFFLINE): config validation must
    never wait on the network."""
    p = Path(pretrained).expanduser()
    if p.is_dir():
        f = p / "model_index.json"
        return json.loads(f.read_text()) if f.exists() else None
    if is_local(pretrained):
        return None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        if download:
            path = hf_hub_download(pretrained, "model_index.json", revision=revision)
        else:
            path = try_to_load_from_cache(pretrained, "model_index.json", revision=revision)
        return json.loads(Path(path).read_text()) if isinstance(path, str) else None
    except Exception as e:  # offline, unknown repo, malformed id: the caller says what to set instead
        log.debug("model_index.json of %s not available: %s", pretrained, e)
        return None
