"""MLflow tracking, the default backend.

Without `tracking.uri`, the store is a SQLite file inside the run dir (`{output_dir}/mlflow.db`) and artifacts go
to `{output_dir}/mlartifacts/`: no server, and the run dir stays self-contained (open it with the `mlflow ui`
command printed at the start of training). With `tracking.uri` (e.g. `http://mlflow.internal:5000`), the run goes
to that server and the server decides where artifacts live.

The run id is kept in `{output_dir}/logs/mlflow_run.json`, so a resumed training continues the same MLflow run.
MLflow cannot delete metric points, so steps that were logged by an interrupted attempt after the checkpoint being
resumed are not logged again (resume is exact, so they would repeat the same values) and the metric history holds
each step once. Params are immutable in MLflow too: on resume, new keys are added and changed values are recorded
as `param_changed.<key>` tags.

`MlflowTracker` is the store logic. By default it runs in a child process (`track/mlflow_process.py`), so neither
importing MLflow nor opening the store delays training; `tracking.mlflow_async: false` runs it in the training
process, as flowtrain did before.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_FILE = "logs/mlflow_run.json"
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length
_BATCH = 100  # MLflow's limit on params per log_batch call
_MAX_METRICS = 1000  # MLflow's limit on metrics per log_batch call
_FLUSH_METRICS = 900  # send buffered metrics once this many are waiting ...
_FLUSH_SECONDS = 2.0  # ... or this long after the last send (the MLflow UI lags by at most this)


TELEMETRY_VAR = "MLFLOW_DISABLE_TELEMETRY"


def telemetry_off_by_default(env: MutableMapping[str, str]) -> None:
    """Turn off MLflow's usage telemetry in `env` (os.environ, or a child's environment) unless the user set
    `MLFLOW_DISABLE_TELEMETRY` themselves, to any value: their choice wins.

    Why: MLflow 3 sends anonymous usage events to its maintainers' servers from a thread it starts when `mlflow`
    is imported (`mlflow.telemetry`; off only under `MLFLOW_DISABLE_TELEMETRY=true`, `DO_NOT_TRACK=true` or CI).
    flowtrain's default tracking is a file in the run dir and must send nothing anywhere. It has to be set before
    the first `import mlflow`, which is why every MLflow import in flowtrain is preceded by this call.
    """
    env.setdefault(TELEMETRY_VAR, "true")


def local_store_uri(output_dir: str | Path) -> str:
    """The default tracking URI: a SQLite store inside the run dir."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def param_value(v: Any) -> str:
    """How a config value is shown as an MLflow param: None as YAML's `null`, everything else as str()."""
    text = "null" if v is None else str(v)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def _template_path() -> Path:
    """Where the empty store for the installed MLflow is kept: one file per MLflow version (its schema)."""
    import mlflow.version

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowtrain" / "mlflow-store"
    return root / f"empty-{mlflow.version.VERSION}.db"


def seed_local_store(uri: str) -> bool:
    """Create a new SQLite store as a copy of an empty, fully migrated one; True if it did.

    Why: MLflow creates a SQLite store by running its whole chain of schema migrations (~60 of them): 2-4 s of CPU
    at every new run dir, i.e. at the end of a short run that waits for its MLflow process. The migrated schema is
    the same for every store of one MLflow version, so it is built once per version (by MLflow itself) and copied.
    The template holds no experiment: MLflow, opening the copy, creates its Default experiment as it would in a
    new store (with the artifact root it would use), so the copy is what MLflow would have made. Only a missing
    file is seeded; any failure leaves MLflow to create the store the usual way.
    """
    if not uri.startswith("sqlite:///"):
        return False
    db = Path(uri[len("sqlite:///") :])
    if db.exists():
        return False
    import shutil
    import sqlite3
    import tempfile

    try:
        template = _template_path()
        if not template.exists():
            from mlflow.tracking import MlflowClient

            template.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
                fresh = Path(tmp) / "mlflow.db"
                MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments(max_results=1)
                con = sqlite3.connect(fresh)
                with con:  # the Default experiment names the directory it was made in: MLflow remakes it per copy
                    con.execute("DELETE FROM experiment_tags")
                    con.execute("DELETE FROM experiments")
                con.execute("VACUUM")
                con.close()
                os.replace(fresh, template)  # atomic: a concurrent run copies a complete template or none
        db.parent.mkdir(parents=True, exist_ok=True)
        part = db.with_name(db.name + ".part")
        shutil.copyfile(template, part)
        os.replace(part, db)
        return True
    except Exception as e:  # an unwritable cache or a template MLflow refuses: the usual (slower) way
        log.debug("mlflow: not seeding %s from a template (%s)", db, e)
        return False


class MlflowTracker:
    """Logs to one MLflow run; see the module docstring for where things go."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        uri: str | None = None,
        experiment_name: str = "flowtrain",
        run_name: str | None = None,
        resume_step: int | None = None,
        async_metrics: bool = True,
    ):
        telemetry_off_by_default(os.environ)
        from mlflow.tracking import MlflowClient

        # MLflow re-configures its loggers on import; its schema-migration messages on a new store are noise here.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        out = Path(output_dir).resolve()
        self.uri = uri or local_store_uri(out)
        seed_local_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment_name, None if uri else (out / "mlartifacts").as_uri())
        self._run_file = out / RUN_FILE
        self._skip_until = 0  # metric steps <= this are already in the run (from an interrupted attempt)
        self._existing_params: dict[str, str] = {}
        self.resumed = False
        run = self._reopen(resume_step) if resume_step is not None else None
        if run is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name or out.name,
                tags={"flowtrain.output_dir": str(out), "mlflow.source.name": "flowtrain train"},
            )
            self._run_file.parent.mkdir(parents=True, exist_ok=True)
            self._run_file.write_text(
                json.dumps(
                    {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": run.info.run_id}, indent=2
                )
            )
        self.run_id: str = run.info.run_id
        self._async_metrics = async_metrics
        self._closed = False
        self._pending: Any = None  # the last asynchronous log_batch (an mlflow RunOperations)
        self._buffer: list[Any] = []  # metrics not sent yet (see flush)
        self._flushed = time.monotonic()
        atexit.register(self._abandon)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _reopen(self, resume_step: int) -> Any | None:
        """The run recorded in the run file, marked running again; None when there is none to continue."""
        if not self._run_file.exists():
            log.info("mlflow: no %s to continue; starting a new MLflow run", self._run_file)
            return None
        saved = json.loads(self._run_file.read_text())
        if saved.get("tracking_uri") != self.uri:
            log.warning(
                "mlflow: the previous run was tracked at %s, this one at %s; starting a new MLflow run",
                saved.get("tracking_uri"),
                self.uri,
            )
            return None
        try:
            run = self.client.get_run(saved["run_id"])
        except Exception as e:  # the run (or the whole store) was deleted
            log.warning("mlflow: cannot reopen run %s (%s); starting a new MLflow run", saved.get("run_id"), e)
            return None
        if run.info.lifecycle_stage == "deleted":
            self.client.restore_run(run.info.run_id)
        self.client.update_run(run.info.run_id, status="RUNNING")
        history = self.client.get_metric_history(run.info.run_id, "loss")
        self._skip_until = max((m.step for m in history), default=0)
        if self._skip_until > resume_step:
            log.info(
                "mlflow: steps %d..%d are already in run %s from the interrupted attempt; they are not logged again",
                resume_step + 1,
                self._skip_until,
                run.info.run_id,
            )
        self._existing_params = dict(run.data.params)
        self.resumed = True
        return run

    # ---- Tracker ---------------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        values = {k: param_value(v) for k, v in params.items()}
        new = [Param(k, v) for k, v in values.items() if k not in self._existing_params]
        changed = {k: v for k, v in values.items() if k in self._existing_params and self._existing_params[k] != v}
        if changed:
            log.info("mlflow: params changed on resume (kept as param_changed.* tags): %s", sorted(changed))
        tags = [RunTag(f"param_changed.{k}", v) for k, v in changed.items()]
        for i in range(0, max(len(new), len(tags)), _BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH], tags=tags[i : i + _BATCH])
        self._existing_params.update({p.key: p.value for p in new})

    def log_metrics(self, step: int, metrics: Mapping[str, float | None], timestamp_ms: int | None = None) -> None:
        """`timestamp_ms`: when the metrics were measured (default: now), for a caller that forwards them later."""
        from mlflow.entities import Metric

        if step <= self._skip_until:
            return
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self._buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        if len(self._buffer) >= _FLUSH_METRICS or self.flush_due_in() <= 0:
            self.flush()

    def flush_due_in(self) -> float:
        """Seconds until buffered metrics are due to be sent (<= 0: now)."""
        return self._flushed + _FLUSH_SECONDS - time.monotonic()

    def flush(self) -> None:
        """Send the buffered metrics: MLflow's SQLAlchemy store spends ~0.15 ms of CPU per metric plus ~5 ms per
        call, so one call per row of ~30 metrics at every step costs a small model's step time on a few cores.
        Batching rows cuts that ~3×. With `async_metrics` the calls go through MLflow's own queue thread (in
        order), off the calling thread, and close() waits for the queue; in the child process, where nothing else
        waits, they are synchronous, so what a flush returned from is in the store. metrics.jsonl is written at
        once regardless."""
        batch, self._buffer = self._buffer, []
        for i in range(0, len(batch), _MAX_METRICS):
            chunk = batch[i : i + _MAX_METRICS]
            if self._async_metrics:
                self._pending = self.client.log_batch(self.run_id, metrics=chunk, synchronous=False)
            else:
                self.client.log_batch(self.run_id, metrics=chunk)
        self._flushed = time.monotonic()

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        for name, path in images.items():
            parent = str(Path(name).parent)
            self.client.log_artifact(self.run_id, str(path), artifact_path=None if parent == "." else parent)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            atexit.unregister(self._abandon)
            self.flush()
            if self._pending is not None:
                self._pending.wait()  # every queued metric is in the store before the run ends
            self.client.set_terminated(self.run_id, status=status)

    def _abandon(self) -> None:
        """At interpreter exit, a run that was never closed (training raised) is marked FAILED, not left RUNNING."""
        with contextlib.suppress(Exception):  # the store may be gone at exit; nothing useful to do then
            self.close("FAILED")

    def ui_hint(self) -> str:
        """What to run / open to see this run."""
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri}"
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"tracking URI {self.uri}, run {self.run_id}"
