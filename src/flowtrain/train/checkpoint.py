"""Checkpoints that hold everything needed to continue exactly, written atomically.

Layout of `{output_dir}/checkpoint-{step}/`:
  trainable.safetensors   trainable parameters by name (LoRA weights, or the whole transformer for full FT)
  optimizer.pt            optimizer state (loaded with weights_only=True)
  lr_scheduler.pt         LR scheduler state (weights_only=True)
  scaler.pt               fp16 GradScaler state, when mixed_precision is fp16 (weights_only=True)
  ema.safetensors         EMA weights, when the run keeps an EMA
  rng-rank{r}.json/.safetensors  python / numpy / torch (+ CUDA) RNG state of each process (no pickle)
  loop-rank{r}.json       per-process loop counters (the partly accumulated logged loss) for exact logging
  state.json              step, data position (epoch, batch, shuffle seed), config essentials, counters
  pytorch_lora_weights.safetensors (LoRA) — usable directly with `load_lora_weights`
  deepspeed/              under DeepSpeed, instead of trainable.safetensors and optimizer.pt: the engine's own
                          checkpoint, one shard per process (written by every process; see train/engines/deepspeed.py)
  .metadata, __{r}_0.distcp  under FSDP, instead of trainable / optimizer / ema: every process's shards, written by
                          torch.distributed.checkpoint (see `flowtrain.train.engines.fsdp`)
  COMPLETE                written last: the size of every file above (sub-folders included); a folder without it
                          is never `latest`

Atomicity: everything goes into `.checkpoint-{step}.tmp/`, every file is fsynced, COMPLETE is written and fsynced,
then the folder is renamed into place and the parent directory fsynced. A crash, SIGKILL or full disk mid-write
leaves only a `.tmp` folder, which `latest` ignores and the next save removes. A write error is turned into a
`CheckpointWriteError` on every process (so no rank waits forever at a barrier) after removing the `.tmp` folder.
Old checkpoints are pruned by renaming them to `.checkpoint-{step}.deleting` first, so a kill during the
deletion cannot leave a half-deleted folder that still looks complete.

Test hook: `FLOWTRAIN_TEST_CHECKPOINT_SLEEP=<seconds>` makes `write_checkpoint` sleep after the weights and the
optimizer state are written and before the checkpoint is sealed. It exists only so the kill-9 tests
(tests/reliability) can reliably kill a process in the middle of a write; it has no other use. The
`FLOWTRAIN_TEST_FAULT` hook (`flowtrain.train.faults`) can make one process's part of a write fail.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowtrain.train import faults
from flowtrain.train.errors import CheckpointWriteError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TEST_SLEEP_ENV = "FLOWTRAIN_TEST_CHECKPOINT_SLEEP"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STALE = re.compile(r"^\.checkpoint-\d+\.(tmp|deleting|replaced)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


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
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different number of visible devices: restore what lines up
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (COMPLETE marker present), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def verify_checkpoint(path: str | Path) -> str | None:
    """None when `path` is a complete checkpoint whose files all have the sizes COMPLETE recorded, else why not."""
    path = Path(path)
    marker = path / COMPLETE
    if not marker.exists():
        return f"no {COMPLETE} marker (the write did not finish)"
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None  # a marker without a file list (older format): nothing more to check
    for name, size in (doc.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`latest` → newest complete, intact checkpoint in output_dir (None if there is none); a path → that one."""
    if resume is None:
        return None
    if resume == "latest":
        for _, path in reversed(list_checkpoints(output_dir)):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            log.warning("skipping %s for `latest`: %s", path, problem)
        return None
    path = Path(resume)
    problem = verify_checkpoint(path) if path.is_dir() else "not a folder"
    if problem is not None:
        found = [str(p) for _, p in list_checkpoints(path.parent)] if path.parent.is_dir() else []
        where = f"complete ones next to it: {', '.join(found)}" if found else f"{path.parent} holds none"
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a usable flowtrain checkpoint ({problem}); {where}. Give one "
            "of those, or `latest` (the newest complete checkpoint in output_dir)"
        )
    return path


def _test_hook_sleep() -> None:
    """See the module docstring: a test-only pause in the middle of a checkpoint write."""
    seconds = float(os.environ.get(TEST_SLEEP_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: Any,
    state: dict[str, Any],
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    sync: Callable[[bool], bool] | None = None,
    extra_files: Callable[[Path], Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    scaler: Any = None,
    rank_state: dict[str, Any] | None = None,
    rank_files: Callable[[Path], Any] | None = None,
) -> Path:
    """Write checkpoint-{step} atomically. Every process must call it (each saves its RNG state).

    `sync(failed_here) -> failed_anywhere` is a collective that also acts as a barrier; with it, an error on one
    process becomes a `CheckpointWriteError` on all of them. Without it, `barrier` is used and errors stay local
    (fine for one process). `extra_files(tmp_dir)` lets the caller add files (e.g. the diffusers LoRA file) before
    the folder is sealed. `rank_files(tmp_dir)` runs on every process once the folder exists and every process's
    RNG state is written (a sharding engine writes its shards there: a collective); pass `trainable` / `optimizer`
    as None when it writes those.
    """
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if sync is None:

        def sync(failed: bool) -> bool:
            barrier()
            return failed

    error: list[BaseException] = []

    def attempt(fn: Callable[[], Any]) -> None:
        if not error:
            try:
                fn()
            except Exception as e:  # noqa: BLE001  reported below, on every process, as CheckpointWriteError
                error.append(e)

    def phase_done() -> None:
        if sync(bool(error)):
            _fail(out, step, tmp, is_main, error[0] if error else None, rank)

    if is_main:
        attempt(lambda: _fresh_dir(tmp))
    phase_done()
    attempt(lambda: faults.at_checkpoint(rank, step))  # test hook (train.faults); a no-op unless set
    attempt(lambda: save_rng_state(tmp / f"rng-rank{rank}"))
    if rank_state is not None:
        attempt(lambda: (tmp / f"loop-rank{rank}.json").write_text(json.dumps(rank_state)))
    phase_done()
    if rank_files is not None:  # after a phase every process passed: a collective inside must not meet a no-show
        attempt(lambda: rank_files(tmp))
        phase_done()
    if is_main:
        attempt(
            lambda: _write_main_files(
                tmp, step, trainable, optimizer, lr_scheduler, state, extra_files, ema, scaler, final, out
            )
        )
    phase_done()
    return final


def _fresh_dir(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def _write_main_files(tmp, step, trainable, optimizer, lr_scheduler, state, extra_files, ema, scaler, final, out):
    if trainable is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _test_hook_sleep()
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    if extra_files is not None:
        extra_files(tmp)
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    files = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            _fsync_file(f)
            files[f.relative_to(tmp).as_posix()] = f.stat().st_size
    for d in sorted((d for d in tmp.rglob("*") if d.is_dir()), reverse=True):  # a sharding engine's sub-folders
        _fsync_dir(d)
    (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    _fsync_file(tmp / COMPLETE)
    _fsync_dir(tmp)
    aside = out / f".checkpoint-{step}.replaced"
    if final.exists():  # a re-save of the same step: move the old one aside first, so one of them is always whole
        if aside.exists():
            shutil.rmtree(aside)
        final.rename(aside)
    try:
        tmp.rename(final)
    except OSError:
        if aside.exists():
            aside.rename(final)
        raise
    try:  # published: a failure from here on must not report the checkpoint as lost
        _fsync_dir(out)
    except OSError as e:
        log.warning("checkpoint %s written, but fsync of %s failed: %s", final, out, e)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def _fail(out: Path, step: int, tmp: Path, is_main: bool, err: BaseException | None, rank: int) -> None:
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
    ckpts = list_checkpoints(out)
    previous = f"the previous checkpoint {ckpts[-1][1]} is intact" if ckpts else "no earlier checkpoint exists"
    what = f"{type(err).__name__}: {err}" if err is not None else "another process failed to write its part"
    raise CheckpointWriteError(
        f"could not write checkpoint-{step} in {out} (rank {rank}: {what}); nothing of it was kept and "
        f"{previous}. Free disk space / fix the problem, then resume with --resume_from_checkpoint latest."
    ) from err


def prune_checkpoints(output_dir: str | Path, keep_last: int | None, keep_every: int | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (those whose step is a multiple of `keep_every`
    are kept for good), and leftovers of interrupted writes / deletions. Returns what was deleted."""
    out = Path(output_dir)
    stale = [p for p in out.iterdir() if _STALE.match(p.name) and p.is_dir()] if out.is_dir() else []
    doomed = []
    if keep_last is not None:
        for step, p in list_checkpoints(out)[:-keep_last]:
            if not (keep_every and step % keep_every == 0):
                doomed.append(p)
    deleted = []
    for p in doomed:
        trash = p.with_name(f".{p.name}.deleting")
        try:
            p.rename(trash)  # atomic: from here on it is no checkpoint at all, however far the deletion gets
        except OSError as e:
            log.warning("could not delete old checkpoint %s: %s", p, e)
            continue
        stale.append(trash)
        deleted.append(p)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return deleted + [p for p in stale if p.name.endswith(".tmp")]


def load_checkpoint(path: str | Path, *, rank: int = 0, world_size: int | None = None) -> dict[str, Any]:
    """Read a checkpoint back: trainable tensors, optimizer/scheduler state, state.json, and where the RNG is
    (pass `rng_stem` to `restore_rng_state` once the model is built, so building it cannot consume the stream).
    `world_size`: the resuming run's process count, when it may differ from the saved one (see `_loop_state`).

    Weights come only from safetensors; the optimizer / scheduler / scaler state with `weights_only=True`. A sharded
    checkpoint has no `trainable.safetensors` / `optimizer.pt`: those entries are None and `sharded` is True (the
    caller reads the shards with `train.engines.fsdp.load_shards`, a collective).
    """
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise FileNotFoundError(f"{path} is not a usable checkpoint: {problem}")
    rng_stem = path / f"rng-rank{rank}"
    if not Path(f"{rng_stem}.json").exists():  # resuming on more processes than saved: use rank 0's stream
        rng_stem = path / "rng-rank0"

    def read(name: str, fn: Callable[[Path], Any]) -> Any:
        try:
            return fn(path / name)
        except Exception as e:
            raise ValueError(
                f"{path / name} cannot be read ({type(e).__name__}: {e}); resume from an older checkpoint"
            ) from e

    def optional(name: str, fn: Callable[[Path], Any]) -> Any:
        return read(name, fn) if (path / name).exists() else None

    sharded = (path / ".metadata").is_file()  # torch.distributed.checkpoint's index of the shards
    state = read("state.json", lambda p: json.loads(p.read_text()))
    return {
        "sharded": sharded,
        # None in a sharding engine's checkpoint (FSDP's shards or DeepSpeed's `deepspeed/` folder hold them).
        "trainable": optional("trainable.safetensors", lambda p: load_file(str(p))),
        "optimizer": optional("optimizer.pt", lambda p: torch.load(p, weights_only=True)),
        "lr_scheduler": read("lr_scheduler.pt", lambda p: torch.load(p, weights_only=True)),
        "scaler": optional("scaler.pt", lambda p: torch.load(p, weights_only=True)),
        "ema": optional("ema.safetensors", lambda p: load_file(str(p))),
        "loop": _loop_state(path, rank, world_size, state.get("world_size", 1)),
        "rng_stem": rng_stem,
        "state": state,
    }


def _loop_state(path: Path, rank: int, world_size: int | None, saved_world: int) -> dict[str, Any] | None:
    """The partly accumulated log window this process continues: its own file when the process count is the
    saved one. On another count, every process takes the mean of the saved processes' partial loss sums (the
    logged loss is a mean over processes, and every process counts the same steps), so the first logged value
    after the change is the one the unchanged run logs, within float rounding."""
    own = path / f"loop-rank{rank}.json"
    if world_size is None or world_size == saved_world:
        return json.loads(own.read_text()) if own.exists() else None
    saved = [json.loads(p.read_text()) for p in sorted(path.glob("loop-rank*.json"))]
    if not saved:
        return None
    return {"loss_acc": sum(d["loss_acc"] for d in saved) / len(saved), "steps_acc": saved[0]["steps_acc"]}
