"""The shipped launch recipes run as written: examples/slurm/train.sbatch (with SLURM's variables set by hand, one
node) and examples/torchrun.sh, each training with 2 CPU processes through the real `flowtrain train` CLI, and
matching one process with the same global batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from flowtrain.testing.data import tiny_config_dict
from flowtrain.testing.launch import cpu_env, run

ROOT = Path(__file__).parents[2]
PORTS = {"slurm": 29603, "torchrun": 29604}
TIMEOUT = 900
STEPS = 4


def config(tmp: Path, pipeline: Path, cache: Path, name: str, batch_size: int) -> Path:
    cfg = tiny_config_dict(
        pipeline,
        cache,
        tmp / name,
        max_steps=STEPS,
        batch_size=batch_size,
        caption_dropout=0.3,
        random_draws="global",  # so 2 × 2 can equal the one-process batch of 4
    )
    cfg["checkpoint"] = {"every_steps": STEPS, "keep_last": None}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(out: Path) -> dict[int, float]:
    from flowtrain.track import read_metrics

    return {row["step"]: row["loss"] for row in read_metrics(out / "logs" / "metrics.jsonl")}


@pytest.fixture(scope="module")
def one_process(tiny_pipeline_dir, tiny_cache, tmp_path_factory) -> dict[int, float]:
    """The logged losses of one process with batch 4 (trained here)."""
    from flowtrain.config import load_config
    from flowtrain.train.loop import train

    tmp = tmp_path_factory.mktemp("recipes")
    train(load_config(config(tmp, tiny_pipeline_dir, tiny_cache[1], "one", batch_size=4)), progress=False)
    return losses(tmp / "one")


def check_two_process_run(out: Path, want: dict[int, float]) -> None:
    state = json.loads((out / f"checkpoint-{STEPS}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == STEPS
    got = losses(out)
    assert got.keys() == want.keys()
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def path_with(*dirs: Path) -> str:
    import os

    return os.pathsep.join([*(str(d) for d in dirs), os.environ.get("PATH", "")])


@pytest.mark.slow
@pytest.mark.dist
def test_slurm_recipe_trains_on_two_processes(one_process, tiny_pipeline_dir, tiny_cache, tmp_path):
    # SLURM is not installed here: its variables are set by hand, as srun sets them for a 1-node job, and `srun`
    # is a stand-in that runs the step's one task (drops srun's options, runs the command) as srun does there.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done\nexec "$@"\n')
    srun.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(PORTS["slurm"]), "PATH": path_with(bin_dir, Path(sys.executable).parent),
    }  # fmt: skip
    cfg = config(tmp_path, tiny_pipeline_dir, tiny_cache[1], "slurm", batch_size=2)
    run(["bash", "examples/slurm/train.sbatch", str(cfg)], cpu_env(slurm), TIMEOUT, cwd=ROOT)
    check_two_process_run(tmp_path / "slurm", one_process)


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_recipe_trains_on_two_processes(one_process, tiny_pipeline_dir, tiny_cache, tmp_path):
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(PORTS["torchrun"]), "PATH": path_with(Path(sys.executable).parent)}
    cfg = config(tmp_path, tiny_pipeline_dir, tiny_cache[1], "torchrun", batch_size=2)
    run(["bash", "examples/torchrun.sh", str(cfg)], cpu_env(env), TIMEOUT, cwd=ROOT)
    check_two_process_run(tmp_path / "torchrun", one_process)
