"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on 2 real CPU processes (gloo), LoRA and full fine-tune.

For each engine and mode, against a 2-process DDP run of the same config and global batch (2 micro-batches of 2
rows per process and step, a linearly decaying lr):
- the logged loss sequence matches (fp32: reductions differ in order, so within a tight tolerance, not bitwise);
- checkpoints are DeepSpeed's own shards inside flowtrain's atomic folder (one optimizer partition per process,
  listed in COMPLETE; no trainable.safetensors / optimizer.pt), and DeepSpeed's zero_to_fp32 merges them into
  the weights the run exported;
- the exported LoRA file / diffusers transformer folder matches DDP's;
- resuming from checkpoint-2 to step 4 gives the losses and weights of the straight run exactly (bitwise).
ZeRO-3 also keeps an EMA (gathered across processes) and samples validation images.

Every launch costs ~30-60 s on a 2-core machine (DeepSpeed's start-up), so these tests are slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from flowtrain.testing.data import tiny_config_dict

ROOT = Path(__file__).parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
STEPS = 4
PORTS = iter(range(29760, 29800))  # this test file's own range: one port per launch, never reused in a session
TOL = {"rtol": 1e-4, "atol": 1e-6}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("ACCELERATE_USE_CPU", None)  # accelerate turns DeepSpeed off when told to use the CPU
    return {**env, **(extra or {})}


def _launch_args(engine: str) -> tuple[list[str], dict[str, str]]:
    if engine == "ddp":  # `--multi_gpu` + ACCELERATE_USE_CPU: 2 processes over gloo (see test_ddp_cpu.py)
        return ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"], {"ACCELERATE_USE_CPU": "true"}
    return ["--config_file", str(ROOT / "configs" / "accelerate" / f"{engine}.yaml")], {}


def _command(engine: str, config: Path, resume: bool) -> tuple[list[str], dict[str, str]]:
    args, extra = _launch_args(engine)
    cmd = [str(ACCELERATE), "launch", *args, "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(next(PORTS)), "-m", "flowtrain", "train", str(config), "--quiet"]  # fmt: skip
    return cmd + (["--resume_from_checkpoint", "latest"] if resume else []), extra


def _train(engine: str, config: Path, *, resume: bool = False, timeout: float = 900) -> None:
    cmd, extra = _command(engine, config, resume)
    proc = subprocess.run(cmd, env=_env(extra), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _config(tmp: Path, name: str, pipeline: Path, cache: Path, mode: str, **extra) -> Path:
    # 2 micro-batches a step and a decaying lr: the engine must step once per optimizer step, with flowtrain's lr.
    cfg = tiny_config_dict(pipeline, cache, tmp / name, max_steps=STEPS, batch_size=2, gradient_accumulation_steps=2)
    cfg["lr_scheduler"] = {"name": "linear"}
    cfg["train_mode"] = mode
    cfg["checkpoint"] = {"every_steps": 2, "keep_last": None}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _exported(out: Path, mode: str) -> dict[str, torch.Tensor]:
    if mode == "lora":
        return load_file(str(out / "pytorch_lora_weights.safetensors"))
    return {k: v for f in sorted((out / "transformer").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), **TOL, msg=k)


@pytest.fixture(scope="module")
def ddp_runs(tiny_pipeline_dir, tiny_cache, tmp_path_factory) -> dict[str, Path]:
    """The reference: the same configs under 2-process DDP (one run per mode, shared by all engines)."""
    tmp = tmp_path_factory.mktemp("ddp")
    runs = {}
    for mode in ("lora", "full"):
        _train("ddp", _config(tmp, f"ddp-{mode}", tiny_pipeline_dir, tiny_cache[1], mode))
        runs[mode] = tmp / f"ddp-{mode}"
    return runs


SLOW = pytest.mark.slow


@pytest.mark.dist
@pytest.mark.parametrize(
    ("engine", "mode"),
    # ZeRO-3 LoRA (parameters sharded too) runs in `make test`; the other three are slow (`make test-all`).
    [
        ("zero3", "lora"),
        pytest.param("zero3", "full", marks=SLOW),
        pytest.param("zero2", "lora", marks=SLOW),
        pytest.param("zero2", "full", marks=SLOW),
    ],
    ids=["zero3-lora", "zero3-full", "zero2-lora", "zero2-full"],
)
def test_deepspeed_matches_ddp_shards_checkpoints_and_resumes_exactly(
    engine, mode, ddp_runs, tiny_pipeline_dir, tiny_cache, tmp_path
):
    from flowtrain.train.engines.deepspeed import consolidated_state_dict

    config = _config(tmp_path, "run", tiny_pipeline_dir, tiny_cache[1], mode)
    out = tmp_path / "run"
    _train(engine, config)
    ddp = ddp_runs[mode]

    # Same losses as DDP, step by step.
    losses, ddp_losses = _losses(out), _losses(ddp)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in ddp_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), (step, losses, ddp_losses)

    # Sharded: DeepSpeed's files, one optimizer partition per process, all listed in COMPLETE.
    last = out / f"checkpoint-{STEPS}"
    shards = sorted(p.name for p in (last / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert not (last / "trainable.safetensors").exists() and not (last / "optimizer.pt").exists()
    listed = json.loads((last / "COMPLETE").read_text())["files"]
    assert {f"deepspeed/state/{s}" for s in shards} <= listed.keys()

    # Consolidated: the final export equals DDP's, and zero_to_fp32 of the last checkpoint equals what DDP's last
    # checkpoint holds (the trainable tensors by parameter name).
    _close(_exported(out, mode), _exported(ddp, mode))
    merged = consolidated_state_dict(last, lora=mode == "lora")
    ddp_trainable = load_file(str(ddp / f"checkpoint-{STEPS}" / "trainable.safetensors"))
    _close({k: merged[k] for k in ddp_trainable}, ddp_trainable)

    # Resume: from checkpoint-2 in a fresh launch, to the same end as the straight run, bitwise.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns(f"checkpoint-{STEPS}", "transformer", "*.safetensors"))
    for f in out.glob("checkpoint-2/*.safetensors"):
        shutil.copy(f, resumed / "checkpoint-2" / f.name)
    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"] = str(resumed)
    (tmp_path / "resumed.yaml").write_text(yaml.safe_dump(cfg))
    _train(engine, tmp_path / "resumed.yaml", resume=True)
    assert _losses(resumed) == losses
    straight, again = _exported(out, mode), _exported(resumed, mode)
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_ema_and_validation_match_ddp(engine, tiny_pipeline_dir, tiny_cache, tmp_path):
    """Under ZeRO-3 no process holds a whole parameter: the EMA and the validation sampler gather them (under ZeRO-2
    the parameters are whole, the optimizer state is not). The EMA, the exported (EMA) LoRA and the validation
    images equal those of the same run under DDP."""
    extra = {
        "ema": {"enabled": True, "decay": 0.5},
        "validation": {"every_steps": 2, "prompts": ["a photo number 1"], "num_inference_steps": 2},
    }
    for name in ("ddp", engine):
        _train(name, _config(tmp_path, name, tiny_pipeline_dir, tiny_cache[1], "lora", **extra))
    ddp, z3 = tmp_path / "ddp", tmp_path / engine
    _close(
        load_file(str(z3 / "checkpoint-4" / "ema.safetensors")),
        load_file(str(ddp / "checkpoint-4" / "ema.safetensors")),
    )
    _close(_exported(z3, "lora"), _exported(ddp, "lora"))
    images = sorted(p.name for p in (ddp / "samples").glob("step*.png"))
    assert images and images == sorted(p.name for p in (z3 / "samples").glob("step*.png"))
    for name in images:
        a = torch.from_numpy(np.asarray(Image.open(ddp / "samples" / name), dtype=np.int16))
        b = torch.from_numpy(np.asarray(Image.open(z3 / "samples" / name), dtype=np.int16))
        assert (a - b).abs().max() <= 2, name


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_resume_after_kill_9_mid_checkpoint_is_exact(engine, tiny_pipeline_dir, tiny_cache, tmp_path):
    """kill -9 of every process while checkpoint-4 is being written (DeepSpeed shards on disk, not sealed): the
    half-written folder is never used, resume from checkpoint-2 reaches the straight run's weights bitwise."""
    straight_cfg = _config(tmp_path, "straight", tiny_pipeline_dir, tiny_cache[1], "lora")
    _train(engine, straight_cfg)
    killed_cfg = _config(tmp_path, "killed", tiny_pipeline_dir, tiny_cache[1], "lora")
    out = tmp_path / "killed"
    cmd, extra = _command(engine, killed_cfg, resume=False)
    log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115  closed below
    # The test hook pauses each write after the shards are saved and before the folder is sealed.
    proc = subprocess.Popen(cmd, env=_env({**extra, "FLOWTRAIN_TEST_CHECKPOINT_SLEEP": "10"}), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        tmp4 = out / ".checkpoint-4.tmp"
        while not (tmp4 / "deepspeed" / "latest").exists() or not (out / "checkpoint-2" / "COMPLETE").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached checkpoint-4's write"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert not (out / "checkpoint-4").exists()
    _train(engine, killed_cfg, resume=True)
    assert _losses(out) == _losses(tmp_path / "straight")
    a, b = _exported(out, "lora"), _exported(tmp_path / "straight", "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
