"""MLflow written by a child process (`tracking.mlflow_async`, the default), checked against the real store.

- the record equals what the in-process (synchronous) path writes: params, tags, every metric history, artifacts;
  and the training process never imports MLflow;
- kill -9 of the trainer leaves a readable store holding the metrics up to the kill (at most the row being sent
  is missing), the run marked FAILED, no process left behind; a resume continues the same run;
- a tracker process that dies is dropped with a warning while metrics.jsonl keeps everything;
- MLflow's telemetry is off unless the user set MLFLOW_DISABLE_TELEMETRY.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flowtrain.config import FlowtrainConfig
from flowtrain.testing import killharness as kh
from flowtrain.testing.data import tiny_config_dict
from flowtrain.track import open_tracking, read_metrics
from flowtrain.track.mlflow_process import MlflowProcessTracker
from flowtrain.track.mlflow_store import TELEMETRY_VAR, local_store_uri, telemetry_off_by_default
from flowtrain.train.loop import train

# Measured, so they differ between two runs of the same config; every other metric must be equal to the bit.
TIMED = ("s_per_step", "samples_per_s", "data_wait_frac", "elapsed_s", "mem/")
# `flowtrain train` in a fresh process that records which files import MLflow (real imports, not `find_spec`
# probes). Other libraries may import it (DeepSpeed does whenever it is installed); flowtrain must not, and no
# MLflow store may be opened in the training process.
NO_MLFLOW_IN_TRAINER = """
import os, sys, traceback
importers = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mlflow":
            stack = traceback.extract_stack(limit=40)
            if any(f.name == "_find_and_load" for f in stack):
                importers.append([f.filename for f in stack if not f.filename.startswith("<")][-1])
        return None
sys.meta_path.insert(0, Watch())
import flowtrain
from flowtrain.cli import main
rc = main(sys.argv[1:])
ours = [f for f in importers if f.startswith(os.path.dirname(flowtrain.__file__) + os.sep)]
assert not ours, f"flowtrain imported mlflow in the training process: {ours}"
assert "mlflow.store.tracking.sqlalchemy_store" not in sys.modules, "an MLflow store was opened in the trainer"
assert "matplotlib" not in sys.modules, "the end-of-run graphs were drawn in the trainer, not by the MLflow process"
sys.exit(rc)
"""


def _client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(local_store_uri(out))


def _run_id(out: Path) -> str:
    return json.loads((out / "logs" / "mlflow_run.json").read_text())["run_id"]


def _record(out: Path) -> dict:
    """Everything an MLflow run holds, as plain values: status, params, tags, metric histories, artifact paths."""
    c, rid = _client(out), _run_id(out)
    run = c.get_run(rid)

    def artifacts(path: str | None = None) -> set[str]:
        found: set[str] = set()
        for f in c.list_artifacts(rid, path):
            found |= artifacts(f.path) if f.is_dir else {f.path}
        return found

    return {
        "status": run.info.status,
        "params": dict(run.data.params),
        "tags": {k: v for k, v in run.data.tags.items() if k != "flowtrain.output_dir"},
        "metrics": {k: sorted((m.step, m.value) for m in c.get_metric_history(rid, k)) for k in run.data.metrics},
        "artifacts": artifacts(),
    }


def _config(tiny_pipeline_dir, tiny_cache, out: Path, **train) -> dict:
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], out, **train)
    d["tracking"] = {"report_to": ["mlflow", "jsonl"], "run_name": "same-name"}
    return d


def test_child_process_record_equals_in_process_record(tiny_pipeline_dir, tiny_cache, tmp_path) -> None:
    d = _config(tiny_pipeline_dir, tiny_cache, tmp_path / "sync", max_steps=4)
    d["validation"] = {"every_steps": 2, "prompts": ["a photo number 1"], "num_inference_steps": 2, "guidance_scale": 1}
    d["tracking"]["mlflow_async"] = False
    train(FlowtrainConfig.model_validate(d), progress=False)
    # The same config through the CLI in a fresh process, which must never import mlflow.
    d["tracking"]["mlflow_async"] = True
    d["output_dir"] = str(tmp_path / "async")
    (tmp_path / "async.yaml").write_text(yaml.safe_dump(d))
    cmd = [sys.executable, "-c", NO_MLFLOW_IN_TRAINER, "train", str(tmp_path / "async.yaml"), "--quiet"]
    proc = subprocess.run(cmd, env=kh.child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    old, new = _record(tmp_path / "sync"), _record(tmp_path / "async")
    assert new["status"] == old["status"] == "FINISHED"
    # the two settings that differ, by construction
    assert (new["params"].pop("tracking.mlflow_async"), old["params"].pop("tracking.mlflow_async")) == ("True", "False")
    assert new["params"].pop("output_dir").endswith("async") and old["params"].pop("output_dir").endswith("sync")
    assert new["params"] == old["params"] and len(new["params"]) > 50
    assert new["tags"] == old["tags"]
    assert new["artifacts"] == old["artifacts"]
    assert {"pytorch_lora_weights.safetensors", "samples/step000004_grid.png", "graphs/loss.png"} <= new["artifacts"]
    assert sorted(p.name for p in (tmp_path / "async" / "graphs").iterdir()) == sorted(
        p.name for p in (tmp_path / "sync" / "graphs").iterdir()
    )
    assert new["metrics"].keys() == old["metrics"].keys()
    assert [s for s, _ in new["metrics"]["loss"]] == [1, 2, 3, 4]
    for key, history in new["metrics"].items():  # a σ-bin without samples at a step is left out, in both
        assert [s for s, _ in history] == [s for s, _ in old["metrics"][key]], key
        if not key.startswith(TIMED):
            assert history == old["metrics"][key], key
    # ...and every value, timed ones included, is the one metrics.jsonl holds for that step.
    for out, rec in ((tmp_path / "async", new), (tmp_path / "sync", old)):
        rows = {r["step"]: r for r in read_metrics(out / "logs" / "metrics.jsonl")}
        for key, history in rec["metrics"].items():
            assert history == [(s, pytest.approx(rows[s][key], rel=1e-15, nan_ok=True)) for s, _ in history], key


def _tracker_child(pid: int) -> int:
    """The pid of `pid`'s MLflow child process."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"flowtrain.track.mlflow_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError(f"process {pid} has no MLflow child")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _kill_mid_run(tiny_pipeline_dir, tiny_cache, tmp_path) -> tuple[Path, Path, int]:
    """Start `flowtrain train` (MLflow on), SIGKILL it once metrics reach the store, and wait for its MLflow child
    to exit. Returns (output_dir, config path, metrics.jsonl rows written before the kill)."""
    out = tmp_path / "run"
    d = _config(tiny_pipeline_dir, tiny_cache, out, max_steps=100_000)
    d["tracking"]["graphs"] = False
    d["checkpoint"] = {"every_steps": 10, "keep_last": 1}
    d["dataset"]["num_workers"] = 1  # a forked loader worker holds the pipe open after the trainer dies
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(d))
    with open(tmp_path / "train.log", "wb") as log:
        proc = subprocess.Popen(kh.train_command(config, out, resume=False), env=kh.child_env(), stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        try:
            _wait(lambda: (out / "logs" / "mlflow_run.json").exists() or proc.poll() is not None, "the MLflow run")
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            child, client = _tracker_child(proc.pid), _client(out)
            _wait(lambda: len(client.get_metric_history(_run_id(out), "loss")) >= 3, "metrics in the store")
            sent = len(read_metrics(out / "logs" / "metrics.jsonl"))
            proc.kill()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    # The orphaned child writes what it was sent, ends the run and exits: nothing outlives the trainer for long.
    _wait(lambda: _gone(child), "the MLflow process to exit", timeout=120)
    return out, config, sent


def test_kill_9_leaves_a_readable_store_with_the_metrics_up_to_the_kill(tiny_pipeline_dir, tiny_cache, tmp_path):
    out, _, sent = _kill_mid_run(tiny_pipeline_dir, tiny_cache, tmp_path)
    rows = read_metrics(out / "logs" / "metrics.jsonl")
    rec = _record(out)
    assert rec["status"] == "FAILED"
    loss = rec["metrics"]["loss"]
    assert len(loss) >= sent - 1, (len(loss), sent)  # bounded lag: at most the row in flight at the kill
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-15)) for r in rows[: len(loss)]]
    assert rec["params"]["train.learning_rate"] == "0.001" and "config.yaml" in rec["artifacts"]


@pytest.mark.slow
def test_resume_after_kill_9_continues_the_same_run(tiny_pipeline_dir, tiny_cache, tmp_path) -> None:
    out, config, _ = _kill_mid_run(tiny_pipeline_dir, tiny_cache, tmp_path)
    run_id, last = _run_id(out), _record(out)["metrics"]["loss"][-1][0]
    # From the newest checkpoint (older than the kill) to 3 steps past the last one logged: each step once.
    cmd = kh.train_command(config, out, [f"train.max_steps={last + 3}"])
    rc = kh.run_once(cmd, kh.child_env(), tmp_path / "resume.log")
    assert rc == 0, (tmp_path / "resume.log").read_text()[-3000:]
    rec, client = _record(out), _client(out)
    assert _run_id(out) == run_id and rec["status"] == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert [s for s, _ in rec["metrics"]["loss"]] == list(range(1, last + 4))


def test_an_exception_ends_the_run_failed_with_every_logged_step(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    from flowtrain.train.faults import TEST_FAULT_ENV, InjectedFault

    monkeypatch.setenv(TEST_FAULT_ENV, "step@0:5")  # step 5 raises (a test hook of the training loop)
    d = _config(tiny_pipeline_dir, tiny_cache, tmp_path / "run", max_steps=8, log_every=1)
    with pytest.raises(InjectedFault):
        train(FlowtrainConfig.model_validate(d), progress=False)
    # train() has returned: the run is ended and complete now, not at interpreter exit
    rec, rows = _record(tmp_path / "run"), read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl")
    assert rec["status"] == "FAILED" and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rec["metrics"]["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-15)) for r in rows]


def test_tracker_process_death_is_a_warning_and_jsonl_keeps_everything(
    tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv(TELEMETRY_VAR, "false")  # the user's own setting reaches the child unchanged
    cfg = FlowtrainConfig.model_validate(_config(tiny_pipeline_dir, tiny_cache, tmp_path / "run"))
    assert open_tracking(cfg, tmp_path / "other", is_main=False).trackers == []  # only the main process tracks
    tracker = open_tracking(cfg, tmp_path / "run")
    child = tracker.get(MlflowProcessTracker)
    assert child is not None
    environ = Path(f"/proc/{child.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"{TELEMETRY_VAR}=false".encode() in environ
    tracker.log_metrics(1, {"loss": 0.5})
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait(timeout=60)
    with caplog.at_level(logging.WARNING):
        for step in (2, 3):
            tracker.log_metrics(step, {"loss": 0.5 / step})
        tracker.flush()  # rows reach the pipe at most `flush_every_s` later: here, now
        tracker.log_metrics(4, {"loss": 0.125})
        tracker.flush()
    assert tracker.get(MlflowProcessTracker) is None  # dropped, once
    assert sum("MlflowProcessTracker failed" in r.getMessage() for r in caplog.records) == 1
    tracker.close()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_telemetry_is_off_unless_the_user_set_it(tmp_path) -> None:
    env: dict[str, str] = {}
    telemetry_off_by_default(env)
    assert env == {TELEMETRY_VAR: "true"}
    for users in ("false", "true", "0"):
        env = {TELEMETRY_VAR: users}
        telemetry_off_by_default(env)
        assert env == {TELEMETRY_VAR: users}
    # MLflow itself agrees in a process that imported flowtrain first, outside pytest and CI (which MLflow already
    # treats as "no telemetry", so the variables that say so are removed here).
    code = (
        "import flowtrain, mlflow; from mlflow.telemetry import get_telemetry_client as client; "
        "from mlflow.telemetry.utils import is_telemetry_disabled as disabled; print(disabled(), client())"
    )
    ci = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "DO_NOT_TRACK", TELEMETRY_VAR)
    env = {k: v for k, v in kh.child_env().items() if k not in ci}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "None"]
