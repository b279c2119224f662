"""A real training run tracked in MLflow (the default), checked through `MlflowClient`; then a resume.

One run is shared by every test here (module fixture): 6 steps with validation every 3, then a resume from
checkpoint-3 to step 9. Resuming from an older checkpoint re-runs steps 4..6, which the first attempt already
logged: the run must still hold each step once.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from flowtrain.config import FlowtrainConfig, config_to_flat_dict
from flowtrain.testing.data import tiny_config_dict
from flowtrain.track import read_metrics
from flowtrain.track.mlflow_store import local_store_uri, param_value
from flowtrain.train.loop import train


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked(tiny_pipeline_dir, tiny_cache, tmp_path_factory) -> SimpleNamespace:
    from mlflow.tracking import MlflowClient

    out = tmp_path_factory.mktemp("mlflow") / "tiny-run"
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], out, max_steps=6)
    d["tracking"] = {"experiment_name": "flowtrain-tests"}
    d["validation"] = {"every_steps": 3, "prompts": ["a photo number 1"], "num_inference_steps": 2, "guidance_scale": 1}
    cfg = FlowtrainConfig.model_validate(d)
    first = train(cfg, progress=False)

    client = MlflowClient(local_store_uri(out))
    run_id = json.loads((out / "logs" / "mlflow_run.json").read_text())["run_id"]
    snap = SimpleNamespace(
        cfg=cfg,
        out=out,
        client=client,
        run_id=run_id,
        first=first,
        first_run=client.get_run(run_id),
        first_loss=_history(client, run_id, "loss"),
        first_artifacts=_artifacts(client, run_id),
        first_rows=read_metrics(out / "logs" / "metrics.jsonl"),
    )
    cfg.train.max_steps = 9
    snap.second = train(cfg, resume=str(out / "checkpoint-3"), progress=False)
    snap.second_run_id = json.loads((out / "logs" / "mlflow_run.json").read_text())["run_id"]
    return snap


def test_store_is_in_the_run_dir(tracked) -> None:
    assert (tracked.out / "mlflow.db").is_file()
    exp = tracked.client.get_experiment_by_name("flowtrain-tests")
    assert exp is not None and exp.artifact_location == (tracked.out.resolve() / "mlartifacts").as_uri()
    assert tracked.first_run.info.experiment_id == exp.experiment_id
    assert tracked.first_run.info.run_name == "tiny-run"  # run_name defaults to the output_dir's name
    assert tracked.first_run.info.status == "FINISHED"


def test_params_are_the_flattened_config(tracked) -> None:
    params = tracked.first_run.data.params
    flat = config_to_flat_dict(tracked.cfg)
    assert params["train.learning_rate"] == "0.001" and params["lora.rank"] == "4"
    assert params["validation.every_steps"] == "3" and params["tracking.uri"] == "null"
    assert params["tracking.report_to"] == '["mlflow", "jsonl"]'
    assert set(flat) - {"train.max_steps"} <= set(params)
    assert all(params[k] == param_value(v) for k, v in flat.items() if k != "train.max_steps")


def test_metric_history_has_every_logged_step(tracked) -> None:
    c, rid = tracked.client, tracked.run_id
    assert tracked.first_loss == sorted(tracked.first.losses.items())  # steps 1..6, the values train() returned
    assert [s for s, _ in tracked.first_loss] == [1, 2, 3, 4, 5, 6]
    for key in ("lr", "grad_norm", "s_per_step", "samples_per_s", "data_wait_frac", "mem/peak_rss_gb", "epoch"):
        assert [s for s, _ in _history(c, rid, key)] == list(range(1, 10)), key
    bins = [k for k in tracked.first_run.data.metrics if k.startswith("loss_by_sigma/")]
    assert bins, "loss by σ-bin is logged"


def test_artifacts_weights_config_samples_graphs(tracked) -> None:
    arts = tracked.first_artifacts
    assert {"pytorch_lora_weights.safetensors", "config.yaml"} <= arts
    assert {"samples/step000003_00_0.png", "samples/step000006_00_0.png", "samples/step000003_grid.png"} <= arts
    assert {"graphs/loss.png", "graphs/summary.txt"} <= arts
    # the artifacts are real files under the run dir
    root = tracked.out / "mlartifacts"
    assert (root / tracked.run_id / "artifacts" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_metrics_jsonl_and_graphs_on_disk(tracked) -> None:
    rows = tracked.first_rows
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "s_per_step", "samples_per_s", "data_wait_frac", "elapsed_s"} <= set(rows[0])
    graphs = tracked.out / "graphs"
    assert {"loss.png", "loss_by_sigma.png", "lr.png", "throughput.png", "summary.txt"} <= {
        p.name for p in graphs.iterdir()
    }


def test_resume_continues_the_same_run_without_duplicate_steps(tracked) -> None:
    c = tracked.client
    assert tracked.second_run_id == tracked.run_id
    run = c.get_run(tracked.run_id)
    assert run.info.status == "FINISHED"
    assert len(c.search_runs([run.info.experiment_id])) == 1
    loss = _history(c, tracked.run_id, "loss")
    assert [s for s, _ in loss] == list(range(1, 10))  # 4..6 ran twice but are in the history once
    # resume is exact, so the first attempt's values for 4..6 are what the resumed run computed as well
    rows = read_metrics(tracked.out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert run.data.params["train.max_steps"] == "6"  # params are immutable in MLflow ...
    assert run.data.tags["param_changed.train.max_steps"] == "9"  # ... a changed value is kept as a tag
    assert "samples/step000009_00_0.png" in _artifacts(c, tracked.run_id)
