"""Launching real multi-process runs on CPU for the tests and benchmarks: `accelerate launch` over gloo.

`accelerate launch --cpu --num_processes 2` silently runs ONE process; `--multi_gpu` (or a MULTI_GPU config file)
with `ACCELERATE_USE_CPU=true` in the environment runs the processes asked for, on CPU, over gloo.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).parents[3]  # the repository (configs/, examples/), for an editable install


def cpu_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for CPU children: gloo via accelerate, no downloads, and one intra-op thread per
    process (two processes on two cores would otherwise fight over them)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return {**env, **(extra or {})}


def accelerate_launch(args: Sequence[str]) -> list[str]:
    """`accelerate launch ARGS` with the accelerate of this interpreter's environment."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", *args]


def ddp_args(processes: int, port: int, machines: int = 1, machine_rank: int = 0) -> list[str]:
    """Launch flags for `processes` CPU processes in all over `machines` "machines" (all on 127.0.0.1)."""
    args = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", str(machines)]
    args += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    if machines > 1:
        args += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return args


def run_together(
    cmds: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], timeout: float = 600, cwd: Path | None = None
) -> list[str]:
    """Start every command at once (e.g. one launcher per "machine"), wait for all; each one's stdout + stderr.
    Raises AssertionError with the output tails when any failed; on timeout the ones still running are killed."""
    with contextlib.ExitStack() as stack:
        # Output goes to files, not pipes: a launcher blocked on a full pipe while another one is being read would
        # stall the collective they share.
        logs = [stack.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in cmds]
        procs = [
            subprocess.Popen(list(c), env=dict(e), stdout=f, stderr=subprocess.STDOUT, text=True, cwd=cwd)
            for c, e, f in zip(cmds, envs, logs, strict=True)
        ]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outs = []
        for f in logs:
            f.seek(0)
            outs.append(f.read())
    failed = [(i, p.returncode, o) for i, (p, o) in enumerate(zip(procs, outs, strict=True)) if p.returncode != 0]
    if failed:
        raise AssertionError("\n".join(f"--- command {i}: exit {rc}\n{o[-4000:]}" for i, rc, o in failed))
    return outs


def run(cmd: Sequence[str], env: Mapping[str, str], timeout: float = 600, cwd: Path | None = None) -> str:
    """Run `cmd` to the end; its stdout + stderr, or an AssertionError with their tail if it failed."""
    return run_together([cmd], [env], timeout, cwd)[0]
