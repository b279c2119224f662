"""Safety: weights only from safetensors, optimizer / scheduler state only through `torch.load(weights_only=True)`,
no remote code unless the config asks for it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowtrain.models import get_family
from flowtrain.testing.data import tiny_model
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.loop import train


class _Payload:
    """Unpickling this runs code: what a malicious optimizer.pt would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reseal(path: Path) -> None:
    """Rewrite COMPLETE with the current file sizes, as if the tampered checkpoint had been written that way."""
    files = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file() and f.name != ckpt.COMPLETE}
    (path / ckpt.COMPLETE).write_text(json.dumps({"files": files}))


@pytest.mark.parametrize("name", ["optimizer.pt", "lr_scheduler.pt"])
def test_checkpoint_state_is_never_unpickled(rel_cfg, tmp_path, name):
    train(rel_cfg(tmp_path / "r", train={"max_steps": 1}), progress=False)
    path = tmp_path / "r" / "checkpoint-1"
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, path / name)
    _reseal(path)
    with pytest.raises(ValueError, match=f"{name} cannot be read"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ValueError, match="resume from an older checkpoint"):
        train(rel_cfg(tmp_path / "r", train={"max_steps": 2}), resume="latest", progress=False)
    assert not marker.exists()


def test_transformer_weights_only_from_safetensors(tiny_pipeline_dir, rel_cfg, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, pipe)
    weights = pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))  # the same weights as a pickle file
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="only from .safetensors"):
        train(rel_cfg(tmp_path / "r", model={"pretrained": str(pipe)}), progress=False)
    # a separate transformer weights file must be safetensors too
    ckpt_file = tmp_path / "dit.ckpt"
    ckpt_file.write_bytes(b"whatever")
    with pytest.raises(ValueError, match="only .safetensors weight files"):
        model = tiny_model(tiny_pipeline_dir, dit=str(ckpt_file))
        get_family("flux2_klein").load_transformer(model, dtype=torch.float32, weights=model.dit)


def test_no_remote_code_by_default(tiny_pipeline_dir, monkeypatch):
    assert get_family("flux2_klein").options(pretrained="x").trust_remote_code is False
    from diffusers import Flux2KleinPipeline

    seen = {}

    def fake(pretrained, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(Flux2KleinPipeline, "from_pretrained", fake)
    with pytest.raises(FileNotFoundError):
        get_family("flux2_klein").load_encoders(tiny_model(tiny_pipeline_dir), dtype=torch.float32, device="cpu")
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
