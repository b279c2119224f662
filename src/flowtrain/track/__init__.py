"""Seeing a run: trackers (MLflow by default, W&B / TensorBoard on request, metrics.jsonl always), training
statistics, and graphs. See docs/tracking.md.

`open_tracking` is what the training loop calls; only the main process gets real backends.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from flowtrain.track.base import MultiTracker, Tracker
from flowtrain.track.jsonl import JsonlTracker, read_metrics

log = logging.getLogger(__name__)

__all__ = [
    "JsonlTracker", "MultiTracker", "Tracker", "check_backends", "open_tracking", "read_metrics", "start_tracking",
]  # fmt: skip

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_backends(report_to: list[str]) -> None:
    """Fail before any work is done when an optional backend's package is missing."""
    from flowtrain.track.optional import missing_backend

    for name in report_to:
        pkg = _PACKAGES.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise missing_backend(name, pkg)


# The MLflow child started for an output_dir and not yet given its run: so the CLI can start it before importing
# torch, and build_run's own call (the one library users get) finds it instead of starting a second one.
_STARTED: dict[str, Any] = {}


def start_tracking(cfg: Any, *, is_main: bool = True) -> Any | None:
    """What can start before the model loads: MLflow's child process (`track/mlflow_process.py`), which imports
    MLflow and creates the store meanwhile. Pass the result to `open_tracking(started=...)`; None when there is
    nothing to start. Called again for the same output_dir before that, it returns the same child."""
    t = cfg.tracking
    if not (is_main and "mlflow" in t.report_to and t.mlflow_async):
        return None
    from flowtrain.track.mlflow_process import MlflowProcessTracker
    from flowtrain.track.mlflow_store import local_store_uri

    key = str(Path(cfg.output_dir).resolve())
    started = _STARTED.get(key)
    if started is None or not started.waiting:
        started = _STARTED[key] = MlflowProcessTracker(t.uri or local_store_uri(cfg.output_dir))
    return started


def open_tracking(
    cfg: Any, output_dir: str | Path, *, resume_step: int | None = None, is_main: bool = True, started: Any = None
) -> MultiTracker:
    """The run's trackers, with the flattened config logged as params and `config.yaml` as an artifact.

    `resume_step`: the step of the checkpoint being resumed (None for a fresh run); JSONL rows and TensorBoard
    events after it are dropped and MLflow / W&B continue their recorded run. Non-main processes get a no-op.
    `started`: what `start_tracking` returned, if it was called.
    """
    if not is_main:
        return MultiTracker()
    from flowtrain.config import config_to_flat_dict

    t, out = cfg.tracking, Path(output_dir)
    check_backends(t.report_to)
    trackers: list[Tracker] = [JsonlTracker(out / "logs" / "metrics.jsonl", resume_step=resume_step)]
    for name in t.report_to:
        if name == "mlflow":
            trackers.append(_open_mlflow(t, out, resume_step, started))
        elif name == "tensorboard":
            from flowtrain.track.optional import TensorBoardTracker

            tb = TensorBoardTracker(out, resume_step=resume_step)
            log.info("TensorBoard: tensorboard --logdir %s", tb.log_dir)
            trackers.append(tb)
        elif name == "wandb":
            from flowtrain.track.optional import WandbTracker

            trackers.append(
                WandbTracker(out, experiment_name=t.experiment_name, run_name=t.run_name, resume_step=resume_step)
            )
    tracker = MultiTracker(trackers, flush_every_s=t.flush_every_s)
    tracker.log_params(config_to_flat_dict(cfg))
    if (out / "config.yaml").exists():
        tracker.log_artifact(out / "config.yaml")
    return tracker


def _plot_here(out: Path) -> None:
    from flowtrain.track.plots import plot_run

    try:
        plot_run(out)
    except Exception as e:  # graphs are a convenience; never fail a finished training over them
        log.warning("could not write graphs: %s (run `flowtrain plot %s` to retry)", e, out)


def _graph_drawer(tracker: MultiTracker) -> Any | None:
    """The MLflow child, when it is the only backend that stores artifacts (JSONL stores none); else None."""
    from flowtrain.track.mlflow_process import MlflowProcessTracker

    child = tracker.get(MlflowProcessTracker)
    others = [t for t in tracker.trackers if not isinstance(t, (JsonlTracker, MlflowProcessTracker))]
    return child if child is not None and not others else None


def _open_mlflow(t: Any, out: Path, resume_step: int | None, started: Any) -> Tracker:
    """MLflow in a child process (default; see `track/mlflow_process.py` for why), or in this one."""
    args = {"uri": t.uri, "experiment_name": t.experiment_name, "run_name": t.run_name, "resume_step": resume_step}
    if t.mlflow_async:
        from flowtrain.track.mlflow_process import MlflowProcessTracker

        p = (started or MlflowProcessTracker()).open(out, **args)
        log.info("MLflow: the run is written by a background process (id in %s); to see it: %s",
                 out / "logs" / "mlflow_run.json", p.ui_hint())  # fmt: skip
        return p
    from flowtrain.track.mlflow_store import MlflowTracker

    m = MlflowTracker(out, **args)
    log.info("MLflow run %s%s; to see it: %s", m.run_id, " (resumed)" if m.resumed else "", m.ui_hint())
    return m


def finish_tracking(
    tracker: MultiTracker,
    output_dir: str | Path,
    weights: Path | None,
    *,
    log_weights: bool = True,
    graphs: bool = True,
    status: str = "FINISHED",
) -> None:
    """End of training (main process; a no-op elsewhere): graphs into `{output_dir}/graphs/`, then the weights
    (`weights`: the LoRA file or transformer folder, if exported), config and graphs as artifacts; closes the run.

    With MLflow in its child process and no other artifact store, the child draws the graphs (and logs them): it
    imported matplotlib while training left it idle, and the training process never holds matplotlib's ~40 MiB.
    `close` waits for it, so `graphs/` is complete when this returns, as with the in-process path."""
    out = Path(output_dir)
    if not tracker.trackers:
        return
    drawer = _graph_drawer(tracker) if graphs else None
    if graphs and drawer is None:
        _plot_here(out)
    if log_weights and weights is not None and weights.exists():
        tracker.log_artifact(weights)
    tracker.log_artifact(out / "config.yaml")
    if drawer is not None:
        try:
            drawer.draw_graphs(out)
        except Exception as e:  # the child is gone: draw here instead (MLflow gets no graphs then; JSONL is complete)
            log.warning("the MLflow process could not draw the graphs (%s); drawing them here", e)
            _plot_here(out)
    elif (out / "graphs").is_dir():
        tracker.log_artifact(out / "graphs", "graphs")
    tracker.close(status)
