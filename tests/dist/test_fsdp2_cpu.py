"""FSDP2 through accelerate (`configs/accelerate/fsdp2.yaml`, `fsdp_version: 2`) on 2 CPU processes over gloo,
for a LoRA and for a full fine-tune, compared with the same run under DDP (same config, same global batch).

Each test launches real `accelerate launch ... -m flowtrain train` processes; what they prove:
- the logged loss sequence equals DDP's within fp32 tolerance;
- checkpoints are sharded: every rank wrote its own rows of each trainable tensor (torch.distributed.checkpoint),
  inside the atomic checkpoint folder (COMPLETE lists the shard files); no trainable.safetensors / optimizer.pt;
- the exported LoRA file / diffusers transformer folder, the EMA and the validation images equal DDP's;
- resume is exact: from a copied mid-run checkpoint, and after kill -9 of the whole launch mid-checkpoint-write;
- a LoRA whose trainable rows sit on one rank only (rank 1 holds only frozen values in most FSDP units) trains
  without hanging.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowtrain.testing import killharness as kh
from flowtrain.testing.data import tiny_config_dict
from flowtrain.train.checkpoint import COMPLETE, TEST_SLEEP_ENV, list_checkpoints, verify_checkpoint
from flowtrain.train.engines.fsdp import read_shards

# The LoRA comparison runs in `make test` (one FSDP2 and one DDP launch); the others are slow (`make test-all`).
pytestmark = [pytest.mark.dist]

REPO = Path(__file__).resolve().parents[2]
FSDP2_CONFIG = REPO / "configs" / "accelerate" / "fsdp2.yaml"
_PORTS = itertools.count(29700)  # this file's ports: 29700-29749
TIMEOUT = 900  # a launch takes 30-90 s on a loaded 2-core machine

# Every random draw of a step is exercised (LoRA dropout, caption dropout, latent sampling), EMA and validation
# are on, and a checkpoint is written every step.
LORA = {
    "train": {"max_steps": 4, "batch_size": 2, "caption_dropout": 0.2, "log_every": 1},
    "lora": {"rank": 4, "targets": "attention", "dropout": 0.1},
    "dataset": {"latent_sampling": "sample"},
    "checkpoint": {"every_steps": 1, "keep_last": None},
    "ema": {"enabled": True, "decay": 0.5, "start_step": 1},
    "validation": {"every_steps": 2, "prompts": ["a photo number 1"], "num_inference_steps": 2},
}


def _config(tmp: Path, name: str, pipeline: Path, cache: Path, **sections) -> Path:
    cfg = tiny_config_dict(pipeline, cache, tmp / name)
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(config: Path, engine: str, resume: str | None = None) -> list[str]:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    if engine == "fsdp2":  # the shipped file, with the machine-specific values overridden for 2 CPU processes
        how = ["--config_file", str(FSDP2_CONFIG)]
    else:  # `--cpu --num_processes 2` silently runs ONE process; `--multi_gpu` + ACCELERATE_USE_CPU gives 2 on gloo
        how = ["--multi_gpu", "--dynamo_backend", "no"]
    cmd = [accelerate, "launch", *how, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--main_process_port", str(next(_PORTS)), "-m", "flowtrain", "train", str(config), "--quiet"]  # fmt: skip
    return cmd + (["--resume_from_checkpoint", resume] if resume else [])


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(TEST_SLEEP_ENV, None)
    return {**env, **extra}


def _launch(config: Path, engine: str, resume: str | None = None) -> Path:
    """Run to the end; returns the output folder."""
    proc = subprocess.run(_command(config, engine, resume), env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return Path(yaml.safe_load(config.read_text())["output_dir"])


def _losses(out: Path) -> dict[int, float]:
    return {step: loss for step, loss, *_ in kh.loss_sequence(out)}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def _assert_sharded(folder: Path) -> None:
    """Every rank wrote its own part of every trainable tensor, into the sealed checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    names = {p.name for p in folder.iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= names, names
    assert not names & {"trainable.safetensors", "optimizer.pt", "ema.safetensors"}, names
    assert verify_checkpoint(folder) is None
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= json.loads((folder / COMPLETE).read_text())["files"].keys()
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    weights = {k: m for k, m in meta.items() if k.startswith("model.")}
    assert weights
    for key, m in weights.items():  # dim-0 rows split between the two ranks: no rank saved the whole tensor
        if m.size[0] >= 2:
            assert len(m.chunks) == 2 and all(c.sizes[0] < m.size[0] for c in m.chunks), (key, m.chunks)


def _pixels(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.int32)


@pytest.fixture(scope="module")
def lora_runs(tiny_pipeline_dir, tiny_cache, tmp_path_factory) -> dict[str, Path]:
    """The LoRA run (EMA, validation, every random draw) under FSDP2 and under DDP."""
    tmp = tmp_path_factory.mktemp("fsdp2_lora")
    return {
        engine: _launch(_config(tmp, engine, tiny_pipeline_dir, tiny_cache[1], **LORA), engine)
        for engine in ("fsdp2", "ddp")
    }


def test_fsdp2_lora_equals_ddp_with_sharded_checkpoints_ema_and_validation(lora_runs):
    fsdp, ddp = lora_runs["fsdp2"], lora_runs["ddp"]
    got, want = _losses(fsdp), _losses(ddp)
    assert sorted(got) == [1, 2, 3, 4] and got == pytest.approx(want, rel=1e-5, abs=1e-6)

    for step in (1, 4):
        _assert_sharded(fsdp / f"checkpoint-{step}")
    # The shards, consolidated, hold what DDP's whole-tensor checkpoint holds: the weights and the EMA.
    shards = read_shards(fsdp / "checkpoint-4")
    whole = ddp / "checkpoint-4"
    _assert_close(shards["model"], load_file(str(whole / "trainable.safetensors")))
    _assert_close(shards["ema"], load_file(str(whole / "ema.safetensors")))
    # Exports gather the shards: the final LoRA file and the checkpoint's LoRA file (both EMA weights) equal DDP's.
    for rel in ("pytorch_lora_weights.safetensors", "checkpoint-4/pytorch_lora_weights.safetensors"):
        _assert_close(load_file(str(fsdp / rel)), load_file(str(ddp / rel)))
    # ...and they are the EMA, not the trained weights (decay 0.5 keeps them apart).
    trained = shards["model"]
    ema = shards["ema"]
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)

    # Validation sampled on the sharded model (every rank takes part; the main one writes): DDP's images.
    for name in ("step000002_00_0.png", "step000004_00_0.png", "step000004_grid.png"):
        a, b = _pixels(fsdp / "samples" / name), _pixels(ddp / "samples" / name)
        assert (a - b).abs().max().item() <= 1, name


@pytest.mark.slow
def test_fsdp2_lora_resume_after_kill_9_mid_write_is_exact(lora_runs, tiny_pipeline_dir, tiny_cache, tmp_path):
    """SIGKILL to the launcher's whole process group while checkpoint-3 is being written (the shards are on disk,
    the folder is not sealed); the resumed run ends exactly where the uninterrupted one did. The test hook holds
    every checkpoint write open for 5 s after the shards are written, so the kill lands inside one."""
    config = _config(tmp_path, "killed", tiny_pipeline_dir, tiny_cache[1], **LORA)
    out = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("wb")
    proc = subprocess.Popen(_command(config, "fsdp2"), env=_env(**{TEST_SLEEP_ENV: "5"}), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    tmp_ckpt = out / ".checkpoint-3.tmp"
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline and not (tmp_ckpt / ".metadata").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
    # The kill hit the write: its shards were there, it was never sealed, and checkpoint-2 is the latest.
    assert tmp_ckpt.is_dir() and [s for s, _ in list_checkpoints(out)] == [1, 2]

    _launch(config, "fsdp2", resume="latest")
    ref = lora_runs["fsdp2"]
    assert kh.loss_sequence(out) == kh.loss_sequence(ref)  # every step once, bitwise
    _assert_equal(load_file(str(out / "pytorch_lora_weights.safetensors")),
                  load_file(str(ref / "pytorch_lora_weights.safetensors")))  # fmt: skip
    a, b = read_shards(out / "checkpoint-4"), read_shards(ref / "checkpoint-4")
    _assert_equal(a["model"], b["model"])
    _assert_equal(a["ema"], b["ema"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]  # the stale write is gone


@pytest.mark.slow
def test_fsdp2_full_finetune_equals_ddp_and_resumes_exactly(tiny_pipeline_dir, tiny_cache, tmp_path):
    full = {"train_mode": "full", "train": {"max_steps": 4, "learning_rate": 1e-4},
            "checkpoint": {"every_steps": 2, "keep_last": None}}  # fmt: skip
    fsdp = _launch(_config(tmp_path, "fsdp2", tiny_pipeline_dir, tiny_cache[1], **full), "fsdp2")
    ddp = _launch(_config(tmp_path, "ddp", tiny_pipeline_dir, tiny_cache[1], **full), "ddp")
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-5, abs=1e-6)
    _assert_sharded(fsdp / "checkpoint-4")
    # The exported diffusers folder (gathered from the shards) equals DDP's: same config, same tensors.
    a, b = fsdp / "transformer", ddp / "transformer"
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    wa = load_file(str(a / "diffusion_pytorch_model.safetensors"))
    _assert_close(wa, load_file(str(b / "diffusion_pytorch_model.safetensors")), atol=1e-5)
    _assert_close(read_shards(fsdp / "checkpoint-4")["model"], wa, atol=0)  # the export is the checkpoint, whole

    # Resume from the copied checkpoint-2 and train to 4: the same steps 3-4 and the same weights, bitwise.
    resumed = tmp_path / "fsdp2_resumed"
    resumed.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    config = _config(tmp_path, "fsdp2_resumed", tiny_pipeline_dir, tiny_cache[1], **full)
    _launch(config, "fsdp2", resume="latest")
    assert _losses(resumed) == {s: v for s, v in _losses(fsdp).items() if s > 2}
    _assert_equal(load_file(str(resumed / "transformer" / "diffusion_pytorch_model.safetensors")), wa)


@pytest.mark.slow
def test_fsdp2_lora_with_rank_holding_only_frozen_values_does_not_hang(tiny_pipeline_dir, tiny_cache, tmp_path):
    """Why this could hang: under FSDP every collective (all-gather, reduce-scatter, the grad-norm all-reduce, the
    checkpoint's shard write, the export's gather) must be entered by every rank. Code that decides per rank
    "nothing trainable here, skip it" (no gradients to clip, no optimizer state, nothing to save) leaves the other
    ranks waiting forever. Here LoRA rank 1 sits on one projection of the first block: rank 1's rows of its
    lora_A are empty (a 1-row tensor split over 2 ranks), and every other FSDP unit holds frozen weights only."""
    lora = {"train": {"max_steps": 2}, "lora": {"rank": 1, "targets": ["transformer_blocks.0.attn.to_q"]},
            "checkpoint": {"every_steps": 2, "keep_last": None}}  # fmt: skip
    fsdp = _launch(_config(tmp_path, "fsdp2", tiny_pipeline_dir, tiny_cache[1], **lora), "fsdp2")
    ddp = _launch(_config(tmp_path, "ddp", tiny_pipeline_dir, tiny_cache[1], **lora), "ddp")
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-5, abs=1e-6)
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(fsdp / "checkpoint-2")).read_metadata().state_dict_metadata
    lora_a = meta["model.transformer_blocks.0.attn.to_q.lora_A.default.weight"]
    assert lora_a.size[0] == 1 and [c.sizes[0] for c in lora_a.chunks] == [1, 0]  # rank 1 held no row of it
    weights = load_file(str(fsdp / "pytorch_lora_weights.safetensors"))
    _assert_close(weights, load_file(str(ddp / "pytorch_lora_weights.safetensors")))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # it trained
