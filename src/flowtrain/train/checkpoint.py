"""Checkpoints that hold everything needed to continue exactly, written atomically.

Layout of `{output_dir}/checkpoint-{step}/`:
  trainable.safetensors   trainable parameters by name (LoRA weights, or the whole transformer for full FT)
  optimizer.pt            optimizer state (loaded with weights_only=True)
  lr_scheduler.pt         LR scheduler state
  rng-rank{r}.json/.safetensors  python / numpy / torch (+ CUDA) RNG state of each process (no pickle)
  state.json              step, data position (epoch, batch), seed, config essentials
  pytorch_lora_weights.safetensors (LoRA) — usable directly with `load_lora_weights`
  COMPLETE                written last; a folder without it is never picked as `latest`

Atomicity: everything goes into `.checkpoint-{step}.tmp/`, files are fsynced, then the folder is renamed. A crash
or a full disk mid-write leaves only a `.tmp` folder, which is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def save_rng_state(path_stem: Path) -> None:
    """Python/numpy RNG → `{stem}.json`; torch (+CUDA) generator bytes → `{stem}.safetensors`. No pickle."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    doc = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    Path(f"{path_stem}.json").write_text(json.dumps(doc))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, f"{path_stem}.safetensors")


def restore_rng_state(path_stem: Path) -> None:
    doc = json.loads(Path(f"{path_stem}.json").read_text())
    version, mt, gauss = doc["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(f"{path_stem}.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`latest` → newest complete checkpoint in output_dir (None if there is none); a path → that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(
            f"{path} is not a complete flowtrain checkpoint (no {COMPLETE} marker); "
            f"pick one of {[str(p) for _, p in list_checkpoints(path.parent)] or 'none found'} or use `latest`"
        )
    return path


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    state: dict[str, Any],
    rank: int = 0,
    is_main: bool = True,
    barrier=lambda: None,
    extra_files=None,
) -> Path:
    """Write checkpoint-{step} atomically. Every process must call it (each saves its RNG state).

    `extra_files(tmp_dir)` lets the caller add files (e.g. the diffusers LoRA file) before the folder is sealed.
    """
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    save_rng_state(tmp / f"rng-rank{rank}")
    barrier()
    if is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        if extra_files is not None:
            extra_files(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(out)
    barrier()
    return final


def prune_checkpoints(output_dir: str | Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and stale `.tmp` folders. Returns deleted."""
    out = Path(output_dir)
    deleted = [p for p in out.glob(".checkpoint-*.tmp") if p.is_dir()]
    if keep_last is not None:
        deleted += [p for _, p in list_checkpoints(out)[:-keep_last]]
    for p in deleted:
        shutil.rmtree(p, ignore_errors=True)
    return deleted


def load_checkpoint(path: str | Path, *, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint back: trainable tensors, optimizer/scheduler state, state.json, and where the RNG is
    (pass `rng_stem` to `restore_rng_state` once the model is built, so building it cannot consume the stream)."""
    path = Path(path)
    rng_stem = path / f"rng-rank{rank}"
    if not Path(f"{rng_stem}.json").exists():  # resuming on more processes than saved: use rank 0's stream
        rng_stem = path / "rng-rank0"
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "lr_scheduler": torch.load(path / "lr_scheduler.pt", weights_only=True),
        "rng_stem": rng_stem,
        "state": json.loads((path / "state.json").read_text()),
    }
