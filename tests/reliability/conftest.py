"""Shared pieces of the reliability tests: tiny run configs and one uninterrupted reference run.

The tiny pipeline and cache come from the session fixtures in tests/conftest.py (`tiny_pipeline_dir`,
`tiny_cache`). The reference run is a real `flowtrain train` subprocess, because the runs it is compared with
(killed, SIGTERMed) are subprocesses too.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flowtrain.config import FlowtrainConfig
from flowtrain.testing.data import tiny_config_dict

# Every random draw a step makes is exercised: LoRA dropout (global torch RNG), caption dropout and latent
# sampling (the per-step generator), shuffling (the sampler), so an exact resume restores all of them.
EXACT_EXTRA = {
    "lora": {"rank": 4, "targets": "attention", "dropout": 0.1},
    "train": {"caption_dropout": 0.2, "log_every": 1},
    "dataset": {"latent_sampling": "sample"},
    "checkpoint": {"every_steps": 1, "keep_last": 2},
    "tracking": {"report_to": ["jsonl"]},
}
REFERENCE_STEPS = 16


def config_dict(pipeline: Path, cache: Path, out: Path, **sections) -> dict:
    """tiny_config_dict + EXACT_EXTRA + `sections` (each merged one level deep)."""
    d = tiny_config_dict(pipeline, cache, out)
    for extra in (EXACT_EXTRA, sections):
        for key, value in extra.items():
            if isinstance(value, dict):
                d[key] = {**d.get(key, {}), **value}
            else:
                d[key] = value
    return d


def make_config(pipeline: Path, cache: Path, out: Path, **sections) -> FlowtrainConfig:
    return FlowtrainConfig.model_validate(config_dict(pipeline, cache, out, **sections))


def write_config(path: Path, pipeline: Path, cache: Path, **sections) -> Path:
    """A YAML config for subprocess runs; output_dir is given on the command line."""
    path.write_text(yaml.safe_dump(config_dict(pipeline, cache, path.parent / "unused", **sections)))
    return path


@pytest.fixture
def rel_cfg(tiny_pipeline_dir, tiny_cache):
    """`rel_cfg(out, **sections)` → a FlowtrainConfig for the tiny model and cache (see `config_dict`)."""
    return lambda out, **sections: make_config(tiny_pipeline_dir, tiny_cache[1], out, **sections)


@dataclass
class Reference:
    """An uninterrupted run that is started in the background (it overlaps with the runs it is compared with,
    which saves a process start's worth of wall time); `wait()` before reading its output."""

    config: Path
    output_dir: Path
    max_steps: int
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def wait(self) -> Path:
        if self.proc is not None:
            rc = self.proc.wait(timeout=900)
            self.proc = None
            assert rc == 0, self.log.read_text()[-3000:]
        return self.output_dir


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_pipeline_dir, tiny_cache):
    """One uninterrupted `flowtrain train` run of REFERENCE_STEPS steps, checkpointing every step."""
    from flowtrain.testing import killharness as kh

    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root / "cfg.yaml", tiny_pipeline_dir, tiny_cache[1], train={"max_steps": REFERENCE_STEPS})
    out, log = root / "run", root / "run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(kh.train_command(cfg, out, resume=False), env=kh.child_env(), stdout=fh,
                                stderr=subprocess.STDOUT)  # fmt: skip
    ref = Reference(cfg, out, REFERENCE_STEPS, proc, log)
    yield ref
    if ref.proc is not None:
        ref.proc.kill()
        ref.proc.wait()
