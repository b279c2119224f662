"""`{output_dir}/logs/metrics.jsonl`: one JSON object per logged step, always written by the main process.

Each row is `{"step": N, "time": unix_seconds, **metrics}`; a metric that was not measured is `null`. This file
is the source of `flowtrain plot` and the one record of a run that needs no tracking backend to read.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class JsonlTracker:
    """Append-only metrics file. On resume, rows after the resumed step are dropped first: they belong to steps
    that will run again, and keeping them would log those steps twice. Images and artifacts are not recorded here
    (they are files in the run dir already)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            # Replaced atomically: a kill during this rewrite must not lose the history of the run.
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a")  # noqa: SIM115  closed in close()
        self._rows: list[dict[str, Any]] = []  # logged, not yet written (see `flush`)

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass  # the resolved config is `{output_dir}/config.yaml`

    def log_metrics(self, step: int, metrics: Mapping[str, float | None]) -> None:
        # NaN / inf are written as JSON's common extension (NaN, Infinity), which Python's json reads back.
        self._rows.append({"step": step, "time": round(time.time(), 3), **metrics})

    def flush(self) -> None:
        """Write the logged rows (MultiTracker calls this at most ~1 s after a row, and at checkpoints). Encoded
        here, all at once, rather than one `json.dumps` inside every training step."""
        rows, self._rows = self._rows, []
        if rows:
            self._fh.write("".join(json.dumps(r) + "\n" for r in rows))
        self._fh.flush()

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()


def _step_of(line: str) -> float:
    """The step of a row; a blank or torn line (the process was killed mid-write) sorts after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


# The old name, from when this lived in `flowtrain.train.metrics`.
JsonlMetrics = JsonlTracker


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file, in file order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
