"""A new local MLflow store is a copy of an empty migrated one (`seed_local_store`): it must be the store MLflow
itself would have created, and work the same."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from flowtrain.track.mlflow_store import MlflowTracker, seed_local_store


def _clauses(sql: str | None) -> list[str]:
    """A CREATE statement's clauses, sorted: MLflow's own migrations write a table's constraints in an order that
    varies from one store to the next (they come from a set), so two stores MLflow made can differ in that order."""
    return sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())


def _dump(db: Path) -> dict[str, list]:
    """Every table's rows (the Default experiment without its times), plus the schema."""
    con = sqlite3.connect(db)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    schema = con.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    out = {"schema": sorted(((kind, name, _clauses(sql)) for kind, name, sql in schema), key=str)}
    for t in tables:
        if t == "experiments":
            cols = "experiment_id, name, artifact_location, lifecycle_stage, workspace"
            rows = con.execute(f"SELECT {cols} FROM experiments")
        else:
            rows = con.execute(f"SELECT * FROM {t}")  # noqa: S608  table names from sqlite_master
        out[t] = sorted(rows.fetchall(), key=str)
    con.close()
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_seeded_store_is_what_mlflow_creates(tmp_path, cache, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's Default experiment records the working directory's mlruns/
    seeded, fresh = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    assert seed_local_store(f"sqlite:///{seeded}")
    templates = list((cache / "flowtrain" / "mlflow-store").glob("empty-*.db"))
    assert len(templates) == 1
    MlflowClient(tracking_uri=f"sqlite:///{seeded}").search_experiments()
    fresh.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments()
    a, b = _dump(seeded), _dump(fresh)
    assert a == b
    assert a["experiments"] == [(0, "Default", str(tmp_path / "mlruns" / "0"), "active", "default")]

    # the next store is copied from the same template, not rebuilt; an existing store is never touched
    stamp = templates[0].stat().st_mtime_ns
    assert seed_local_store(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}")
    assert templates[0].stat().st_mtime_ns == stamp
    assert not seed_local_store(f"sqlite:///{seeded}")
    assert not seed_local_store("http://mlflow.internal:5000")


def test_run_in_seeded_store_reads_back(tmp_path, cache):
    out = tmp_path / "run"
    tracker = MlflowTracker(out, async_metrics=False)  # seeds {out}/mlflow.db from the template
    assert list((cache / "flowtrain" / "mlflow-store").glob("empty-*.db"))
    tracker.log_params({"lr": 1e-4})
    tracker.log_metrics(1, {"loss": 0.5})
    tracker.close()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.0001"}
    assert run.data.metrics == {"loss": 0.5}
    assert run.info.status == "FINISHED"
