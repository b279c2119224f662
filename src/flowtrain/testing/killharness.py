"""Kill -9 harness: prove that no crash point loses or changes a run.

`flowtrain train` runs as a subprocess and is killed with SIGKILL at seeded random points, some inside an
optimizer step and some inside a checkpoint write; after each kill it is started again with
`--resume_from_checkpoint latest`, until it finishes. The final trainable weights and the logged loss sequence
must then equal those of an uninterrupted run bitwise.

To land kills inside checkpoint writes reliably, the killed runs set the test hook
`FLOWTRAIN_TEST_CHECKPOINT_SLEEP` (see `flowtrain.train.checkpoint`), which pauses each write after the weights
and optimizer state are on disk and before the checkpoint is sealed. The harness watches the run folder (the
`.checkpoint-N.tmp` folder of a write, the `checkpoint-N` folders, logs/metrics.jsonl) rather than the clock, so
it works the same on a loaded machine.

Used by tests/reliability/test_kill_resume.py (FLOWTRAIN_KILL_POINTS kills, default 5), by
tests/data/test_buckets_kill.py on an aspect-ratio bucketed cache (`flowtrain.testing.buckets`: each step's batch
from one bucket, so a resume that lost its place in the bucket order changes the losses) and by
benchmarks/kill_resume.py (many more).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowtrain.train.checkpoint import TEST_SLEEP_ENV, list_checkpoints

KILL_POINTS_ENV = "FLOWTRAIN_KILL_POINTS"
_TMP = re.compile(r"^\.checkpoint-(\d+)\.tmp$")


@dataclass
class Kill:
    """One interruption: where it was aimed, and what the run folder showed right after it."""

    target_step: int  # aimed at the step after this many completed checkpoints / inside this step's write
    phase: str  # "write": inside checkpoint-N's write; "step": inside the optimizer step after checkpoint-N
    latest_before: int  # newest complete checkpoint when the process was started
    latest_after: int = 0  # newest complete checkpoint after the kill (what the next run resumes from)
    in_write: bool = False  # a `.checkpoint-*.tmp` folder was left behind: the kill hit a write
    write_step: int | None = None  # ...of this step
    returncode: int | None = None
    log_tail: str = ""


@dataclass
class HarnessResult:
    kills: list[Kill] = field(default_factory=list)
    final_returncode: int | None = None
    starts: int = 0
    wall_s: float = 0.0


def kill_points(default: int = 5) -> int:
    """How many kills to make: FLOWTRAIN_KILL_POINTS, or `default`."""
    return int(os.environ.get(KILL_POINTS_ENV) or default)


def train_command(config: Path, output_dir: Path, overrides: list[str] = (), resume: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "flowtrain", "train", str(config), f"output_dir={output_dir}", *overrides, "--quiet"]
    return cmd + (["--resume_from_checkpoint", "latest"] if resume else [])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(TEST_SLEEP_ENV, None)
    env.update(extra or {})
    return env


def run_once(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float = 600) -> int:
    """Run to the end; returns the exit code (the output goes to `log_path`)."""
    with open(log_path, "ab") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode


def latest_step(output_dir: Path) -> int:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][0] if ckpts else 0


def _writing(output_dir: Path, at_least: int) -> bool:
    """A checkpoint write of step >= at_least is under way, past its first files."""
    if not output_dir.is_dir():
        return False
    for p in output_dir.iterdir():
        m = _TMP.match(p.name)
        if m and int(m.group(1)) >= at_least and (p / "optimizer.pt").exists():
            return True
    return False


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def kill_and_resume(
    config: Path,
    output_dir: Path,
    max_steps: int,
    *,
    kills: int,
    seed: int = 0,
    overrides: list[str] = (),
    write_pause_s: float = 0.25,
    poll_s: float = 0.005,
    timeout_s: float = 300,
) -> HarnessResult:
    """Start, SIGKILL `kills` times at seeded random points, then run to completion. Never raises on a bad run:
    the caller checks `final_returncode` and compares outputs."""
    rng = random.Random(seed)
    result = HarnessResult()
    log_path = output_dir.parent / f"{output_dir.name}.log"
    cmd = train_command(config, output_dir, list(overrides))
    env = child_env({TEST_SLEEP_ENV: str(write_pause_s)})
    t0 = time.monotonic()
    phases = ["write", "step"] * ((kills + 1) // 2)
    rng.shuffle(phases)
    for i in range(kills):
        latest = latest_step(output_dir)
        # leave room for the remaining kills and a final uninterrupted stretch
        room = max_steps - 1 - latest - (kills - 1 - i)
        target = latest + rng.randint(1, max(1, min(3, room)))
        kill = Kill(target_step=target, phase=phases[i], latest_before=latest)
        with open(log_path, "ab") as log:
            log.write(f"\n=== start {result.starts}: kill {i} aimed at {kill.phase} of step {target}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            result.starts += 1
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                if kill.phase == "write" and _writing(output_dir, target):
                    break
                if kill.phase == "step" and latest_step(output_dir) >= target:
                    time.sleep(rng.uniform(0.0, 0.05))  # somewhere in the next step's forward/backward/optimizer
                    break
                time.sleep(poll_s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            kill.returncode = proc.wait()
        names = [p.name for p in output_dir.iterdir()] if output_dir.is_dir() else []
        tmps = [int(m.group(1)) for n in names if (m := _TMP.match(n))]
        kill.in_write, kill.write_step = bool(tmps), max(tmps, default=None)
        kill.latest_after = latest_step(output_dir)
        kill.log_tail = _tail(log_path, 600)
        result.kills.append(kill)
    with open(log_path, "ab") as log:
        log.write(f"\n=== start {result.starts}: run to the end\n".encode())
    result.final_returncode = run_once(cmd, child_env(), log_path, timeout=timeout_s)
    result.starts += 1
    result.wall_s = time.monotonic() - t0
    return result


def loss_sequence(output_dir: Path) -> list[tuple[int, float, float, Any]]:
    """(step, loss, lr, grad_norm) of every row of logs/metrics.jsonl, in file order."""
    rows = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["step"], r["loss"], r["lr"], r.get("grad_norm")) for r in rows]


def final_weights(output_dir: Path) -> dict[str, Any]:
    """Trainable tensors of the newest complete checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(list_checkpoints(output_dir)[-1][1] / "trainable.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Pipelines (`stages:`): kills aimed at a stage's step, inside a stage's checkpoint write, and at the transitions.


@dataclass
class StageKill:
    """A kill aimed at a point of a pipeline: `phase` "step" (inside the step after `stage`'s checkpoint-`step`),
    "write" (inside the write of `stage`'s checkpoint-`step`), "final" (the moment `stage`'s checkpoint-`step`,
    its last, is complete: before pipeline.json records the stage), or "next" (the moment pipeline.json records
    `stage` as done: the next stage is being built)."""

    phase: str
    stage: str
    step: int = 0
    returncode: int | None = None
    hit: bool = False  # the aimed-at point was seen before the kill (not the process ending on its own)
    recorded: bool = False  # pipeline.json recorded `stage` as done when the process was dead
    log_tail: str = ""


def _stage_done(output_dir: Path, stage: str) -> bool:
    try:
        record = json.loads((output_dir / "pipeline.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("stages", {}).get(stage, {}).get("status") == "done"


def _reached(output_dir: Path, kill: StageKill) -> bool:
    d = output_dir / "stages" / kill.stage
    if kill.phase == "write":
        return _writing(d, kill.step)
    if kill.phase in ("step", "final"):
        return latest_step(d) >= kill.step if d.is_dir() else False
    return _stage_done(output_dir, kill.stage)


def kill_pipeline_and_resume(
    config: Path,
    output_dir: Path,
    kills: list[StageKill],
    *,
    seed: int = 0,
    overrides: list[str] = (),
    write_pause_s: float = 0.25,
    poll_s: float = 0.002,
    timeout_s: float = 300,
) -> HarnessResult:
    """Start `flowtrain train` on a pipeline config, SIGKILL it at each of `kills` in turn (every start resumes
    `latest`), then run it to completion. The caller compares each stage's losses and weights with an
    uninterrupted pipeline's."""
    rng = random.Random(seed)
    result = HarnessResult()
    log_path = output_dir.parent / f"{output_dir.name}.log"
    cmd = train_command(config, output_dir, list(overrides))
    t0 = time.monotonic()
    for i, kill in enumerate(kills):
        env = child_env({TEST_SLEEP_ENV: str(write_pause_s)} if kill.phase == "write" else None)
        with open(log_path, "ab") as log:
            log.write(f"\n=== start {result.starts}: kill {i} aimed at {kill}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            result.starts += 1
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                if _reached(output_dir, kill):
                    kill.hit = True
                    if kill.phase == "step":
                        time.sleep(rng.uniform(0.0, 0.05))  # somewhere in the next step
                    break
                time.sleep(poll_s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            kill.returncode = proc.wait()
        kill.recorded = _stage_done(output_dir, kill.stage)
        kill.log_tail = _tail(log_path, 600)
        result.kills.append(kill)
    with open(log_path, "ab") as log:
        log.write(f"\n=== start {result.starts}: run to the end\n".encode())
    result.final_returncode = run_once(cmd, child_env(), log_path, timeout=timeout_s)
    result.starts += 1
    result.wall_s = time.monotonic() - t0
    return result
