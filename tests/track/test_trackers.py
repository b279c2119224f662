"""Tracker backends, the metrics row pieces, config checks and plots, without training (fast)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from flowtrain.config import ConfigError, FlowtrainConfig, load_config
from flowtrain.track import MultiTracker, check_backends, read_metrics
from flowtrain.track.jsonl import JsonlTracker
from flowtrain.track.optional import wandb_mode
from flowtrain.track.plots import plot_run, summarize
from flowtrain.track.stats import SigmaBinLoss, Smoother, TrainMeter, sigma_bin_names


# --- JSONL ---------------------------------------------------------------------------------------------------
def test_jsonl_rows_and_resume_truncation(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "metrics.jsonl"
    t = JsonlTracker(path)
    for step in range(1, 6):
        t.log_metrics(step, {"loss": 1.0 / step, "grad_norm": None})
    t.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["grad_norm"] is None and rows[1]["loss"] == 0.5 and "time" in rows[0]

    t = JsonlTracker(path, resume_step=3)  # steps 4, 5 will run again: their rows go
    t.log_metrics(4, {"loss": 9.0})
    t.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 9.0)]

    JsonlTracker(path).close()  # a fresh (not resumed) run starts the file over
    assert read_metrics(path) == []


def test_jsonl_keeps_nan_readable(tmp_path: Path) -> None:
    t = JsonlTracker(tmp_path / "m.jsonl")
    t.log_metrics(1, {"loss": float("nan")})
    t.close()
    assert math.isnan(read_metrics(tmp_path / "m.jsonl")[0]["loss"])


def test_old_import_path_still_works() -> None:
    from flowtrain.track.jsonl import JsonlMetrics

    assert JsonlMetrics is JsonlTracker


# --- MultiTracker ----------------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple] = []
        self.fail = fail

    def __getattr__(self, name):
        def call(*args):
            if self.fail:
                raise RuntimeError("server went away")
            self.calls.append((name, *args))

        return call


def test_multitracker_fans_out_and_drops_a_failing_backend(caplog) -> None:
    good, bad = _Recorder(), _Recorder(fail=True)
    multi = MultiTracker([bad, good])
    multi.log_metrics(1, {"loss": 1.0})
    multi.log_metrics(2, {"loss": 0.5})
    multi.log_images(2, {})  # nothing to log: no call
    multi.close()
    logged = [("log_metrics", 1, {"loss": 1.0}), ("flush",), ("log_metrics", 2, {"loss": 0.5}), ("flush",)]
    assert good.calls == [*logged, ("close", "FINISHED")]  # flush_every_s=0: each row handed on at once
    assert "disabled for the rest of the run" in caplog.text
    MultiTracker().log_metrics(1, {"loss": 1.0})  # the no-op tracker of non-main processes


def test_multitracker_flushes_buffered_rows_at_most_every_interval_jsonl_last(tmp_path: Path) -> None:
    order: list[str] = []

    class Buffering(_Recorder):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def flush(self) -> None:
            order.append(self.name)

    jsonl, other = JsonlTracker(tmp_path / "m.jsonl"), Buffering("mlflow")
    jsonl_flush = jsonl.flush
    jsonl.flush = lambda: (order.append("jsonl"), jsonl_flush())  # type: ignore[method-assign]
    multi = MultiTracker([jsonl, other], flush_every_s=3600)
    for step in (1, 2, 3):
        multi.log_metrics(step, {"loss": 1.0 / step})
    assert order == [] and read_metrics(tmp_path / "m.jsonl") == []  # held: no system call per row
    multi.flush()  # what the loop does at a checkpoint
    assert order == ["mlflow", "jsonl"]  # metrics.jsonl last: it never holds a row the others lack
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]
    multi.flush_every_s = 0.0
    multi.log_metrics(4, {"loss": 0.25})  # the interval has passed: handed on with this row
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3, 4]
    multi.close()


# --- σ-bins, meter, smoothing ----------------------------------------------------------------------------------
def test_sigma_bins_mean_per_bin_and_skipped_steps() -> None:
    bins = SigmaBinLoss()
    bins.add(torch.tensor([0.05, 0.07, 0.55]), torch.tensor([1.0, 3.0, 5.0]))
    bins.add(torch.tensor([1.0]), torch.tensor([7.0]))  # a second micro-batch of the same step
    bins.end_step(ok=True)
    bins.add(torch.tensor([0.05]), torch.tensor([float("nan")]))
    bins.end_step(ok=False)  # a skipped non-finite step leaves no trace
    sigmas, losses = bins.pending()
    sums = bins.sums(sigmas.tolist(), losses.tolist())
    assert sums[10:] == [2.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]  # counts: σ = 1.0 lands in the last bin
    values = bins.values(sums)
    names = sigma_bin_names()
    assert values == {names[0]: 2.0, names[5]: 5.0, names[9]: 7.0}
    assert names[0] == "loss_by_sigma/0.0-0.1" and names[9] == "loss_by_sigma/0.9-1.0"
    bins.reset()
    assert bins.pending() is None
    for i in range(SigmaBinLoss._FOLD_AT + 3):  # a long log interval is folded into one tensor, nothing lost
        bins.add(torch.tensor([0.35]), torch.tensor([float(i)]))
        bins.end_step()
    sigmas, losses = bins.pending()
    assert len(bins._window) == 4 and losses.tolist() == [float(i) for i in range(SigmaBinLoss._FOLD_AT + 3)]


def test_train_meter_row() -> None:
    meter = TrainMeter(torch.device("cpu"), samples_per_step=4)
    batches = iter([0, 1])
    for _ in range(2):
        meter.next_batch(batches)
        meter.add(torch.tensor([0.25, 0.75]), {"loss/per_sample": torch.tensor([1.0, 2.0])})
        meter.end_step()
    row = meter.row(torch.tensor(1.5), torch.tensor(0.5), reduce=lambda t: t, lr=1e-3, epoch=0)
    assert row["loss"] == 1.5 and row["grad_norm"] == 0.5 and row["lr"] == 1e-3
    assert row["loss_by_sigma/0.2-0.3"] == 1.0 and row["loss_by_sigma/0.7-0.8"] == 2.0
    assert row["samples_per_s"] == pytest.approx(4 / row["s_per_step"])
    assert 0 <= row["data_wait_frac"] <= 1 and row["mem/peak_rss_gb"] > 0
    assert "loss=1.5000" in meter.postfix(row) and "samples/s" in meter.postfix(row)
    # the next row starts empty: no σ-bins without samples
    meter.end_step()
    assert not any(
        k.startswith("loss_by_sigma") for k in meter.row(torch.tensor(1.0), None, reduce=lambda t: t, lr=0, epoch=0)
    )


def test_train_meter_row_reduces_loss_bins_and_parts_together() -> None:
    """With several processes `reduce` gets [loss ‖ σ-bin sums ‖ counts ‖ loss parts] (the grad norm is global
    already); with one there is no reduce, and the same metrics."""
    rows, seen = [], []
    for reduce in (None, lambda t: seen.append(t.tolist()) or t / 2):
        meter = TrainMeter(torch.device("cpu"), samples_per_step=2)
        meter.add(
            torch.tensor([0.15, 0.95]), {"loss/per_sample": torch.tensor([1.0, 3.0]), "loss/prior": torch.tensor(4.0)}
        )
        meter.end_step()
        rows.append(meter.row(torch.tensor(2.0), torch.tensor(0.5), reduce=reduce, lr=1e-3, epoch=0))
    assert seen == [[2.0, 0, 1.0, 0, 0, 0, 0, 0, 0, 0, 3.0, 0, 1.0, 0, 0, 0, 0, 0, 0, 0, 1.0, 4.0]]
    one, halved = rows
    assert (one["loss"], one["loss/prior"], one["loss_by_sigma/0.1-0.2"], one["grad_norm"]) == (2.0, 4.0, 1.0, 0.5)
    assert (halved["loss"], halved["loss/prior"], halved["loss_by_sigma/0.9-1.0"], halved["grad_norm"]) == (
        1.0,
        2.0,
        3.0,
        0.5,
    )


def test_smoother_is_bias_corrected() -> None:
    s = Smoother(0.9)
    assert s.update(2.0) == pytest.approx(2.0)  # no pull towards 0 at the start
    assert s.update(float("nan")) == pytest.approx(2.0)


# --- config ----------------------------------------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text("model: {family: flux2_klein, pretrained: x}\n" + text)
    return p


def test_config_defaults_and_checks(tmp_path: Path) -> None:
    cfg = FlowtrainConfig.model_validate({"model": {"family": "flux2_klein", "pretrained": "x"}})
    assert cfg.tracking.report_to == ["mlflow", "jsonl"] and cfg.tracking.uri is None
    assert cfg.validation.every_steps is None and not cfg.validation.enabled
    assert load_config(_write(tmp_path, "tracking: {report_to: tensorboard}\n")).tracking.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="not both"):
        load_config(_write(tmp_path, "validation: {every_steps: 5, prompts: [a], prompts_file: p.txt}\n"))
    with pytest.raises(ConfigError, match="no prompts"):
        load_config(_write(tmp_path, "validation: {every_steps: 5}\n"))
    with pytest.raises(ConfigError, match="report_to"):
        load_config(_write(tmp_path, "tracking: {report_to: [mlfow]}\n"))
    with pytest.raises(ConfigError, match="positive"):
        load_config(_write(tmp_path, "validation: {every_steps: 5, prompts: [a], sizes: [[0, 32]]}\n"))


# --- optional backends -----------------------------------------------------------------------------------------
def test_missing_optional_backend_names_the_package(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install wandb"):
        check_backends(["mlflow", "wandb"])
    check_backends(["mlflow", "jsonl"])


def test_wandb_is_offline_without_credentials(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_tensorboard_tracker(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowtrain.track.optional import TensorBoardTracker

    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(png)
    t = TensorBoardTracker(tmp_path)
    t.log_params({"train.learning_rate": 1e-3})
    t.log_metrics(1, {"loss": 1.0, "grad_norm": None})
    t.log_metrics(2, {"loss": 0.5})
    t.log_images(1, {"samples/a.png": png})
    t.close()
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5)]
    assert "grad_norm" not in events.Tags()["scalars"]  # None (not measured this step) is not logged as a value
    (image,) = [events.Images(tag)[0] for tag in events.Tags()["images"]]
    assert image.step == 1 and (image.width, image.height) == (8, 8)


def test_wandb_tracker_offline(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from flowtrain.track.optional import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    t = WandbTracker(tmp_path, experiment_name="flowtrain-test")
    t.log_params({"lora.rank": 4})
    t.log_metrics(1, {"loss": 1.0, "grad_norm": None})
    t.close()
    run_id = json.loads((tmp_path / "logs" / "wandb_run.json").read_text())["run_id"]
    (record,) = (tmp_path / "logs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    # The offline record is wandb-core's binary log (no public reader): the keys must be in it, None left out.
    data = record.read_bytes()
    assert b"lora.rank" in data and b"loss" in data and b"grad_norm" not in data


# --- plots -----------------------------------------------------------------------------------------------------
def _fake_run(run: Path) -> Path:
    """A metrics.jsonl of 2 training sessions (resumed at step 20) with every kind of metric."""
    t = JsonlTracker(run / "logs" / "metrics.jsonl")
    for step in range(1, 31):
        elapsed = step * 0.5 if step <= 20 else (step - 20) * 0.5
        row = {
            "loss": 1.0 / step,
            "lr": 1e-4 * min(1.0, step / 10),
            "grad_norm": 0.1,
            "s_per_step": 0.5,
            "samples_per_s": 8.0,
            "data_wait_frac": 0.1,
            "elapsed_s": elapsed,
            "mem/peak_rss_gb": 1.5,
            sigma_bin_names()[step % 10]: 2.0 / step,
        }
        t.log_metrics(step, row)
    t.close()
    return run


def test_plot_writes_graphs_and_summary(tmp_path: Path) -> None:
    from flowtrain.cli import main

    run = _fake_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    names = {p.name for p in (run / "graphs").iterdir()}
    assert {"loss.png", "loss_by_sigma.png", "lr.png", "throughput.png", "memory.png", "summary.txt"} <= names
    with Image.open(run / "graphs" / "loss.png") as im:
        assert im.width > 100 and im.height > 100
    summary = (run / "graphs" / "summary.txt").read_text()
    assert "final loss: 0.0333333" in summary and "min loss: 0.0333333 at step 30" in summary
    assert "wall time: 15.0 s (2 training sessions)" in summary  # 10 s + 5 s, not the gap between them
    assert "throughput: 8 samples/s" in summary and "steps: 30" in summary


def test_plot_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)
    assert "steps: 3" in summarize([{"step": 3, "loss": 1.0}])
