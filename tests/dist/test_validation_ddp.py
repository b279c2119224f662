"""Two DDP processes on CPU with tracking and validation on: only the main process tracks and samples, and the
other rank waits for it instead of hanging or racing it (slow: run with -m slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowtrain.testing.data import tiny_config_dict


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_track_and_sample_once(tiny_pipeline_dir, tiny_cache, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], out, max_steps=4, batch_size=2)
    cfg["validation"] = {"every_steps": 2, "prompts": ["a photo number 1"], "num_inference_steps": 2}
    cfg["tracking"] = {"report_to": ["jsonl", "mlflow"], "graphs": False}  # the tiny default tracks JSONL only
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    cmd += ["-m", "flowtrain.testing.ddp_probe", str(tmp_path / "cfg.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    samples = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert samples == ["step000002_00_0.png", "step000002_grid.png", "step000004_00_0.png", "step000004_grid.png"]
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer
    assert proc.stdout.count("validation:") + proc.stderr.count("validation:") <= 2  # main process only

    from mlflow.tracking import MlflowClient

    from flowtrain.track.mlflow_store import local_store_uri

    client = MlflowClient(local_store_uri(out))
    exp = client.get_experiment_by_name("flowtrain")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3, 4]
