"""`{output_dir}/logs/metrics.jsonl`: one JSON object per logged step, always written by the main process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlMetrics:
    """Append-only metrics file. On resume, rows after the resumed step are dropped first: they belong to steps
    that will run again, and keeping them would log those steps twice."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._fh = open(self.path, "a")  # noqa: SIM115  closed in close()

    def log(self, step: int, values: dict[str, Any]) -> None:
        self._fh.write(json.dumps({"step": step, **values}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
