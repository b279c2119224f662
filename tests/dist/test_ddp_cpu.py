"""Two real processes through `accelerate launch --multi_gpu` on CPU (gloo): training runs and ranks agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowtrain.testing.data import tiny_config_dict


@pytest.mark.dist
def test_two_process_ddp_ranks_hold_identical_weights(tiny_pipeline_dir, tiny_cache, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], out, max_steps=4, batch_size=2)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    accelerate = Path(sys.executable).parent / "accelerate"
    # `--cpu --num_processes 2` silently runs ONE process; `--multi_gpu` + ACCELERATE_USE_CPU gives 2 on gloo.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "flowtrain.testing.ddp_probe",
        str(tmp_path / "cfg.yaml"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    w0, w1 = load_file(str(out / "rank0-weights.safetensors")), load_file(str(out / "rank1-weights.safetensors"))
    assert w0.keys() == w1.keys() and len(w0) > 0
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # Both ranks took part: the checkpoint saved one RNG state per rank, and 2 × batch 2 samples per step.
    ckpt = out / "checkpoint-4"
    assert (ckpt / "rng-rank0.json").exists() and (ckpt / "rng-rank1.json").exists()
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    # LoRA B starts at zero: identical non-zero weights mean gradients were all-reduced, not just initialised.
    assert any(k.endswith("lora_B.default.weight") and w0[k].abs().sum() > 0 for k in w0)
