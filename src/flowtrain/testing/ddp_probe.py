"""Run under `accelerate launch` (or in-process, one process): train from a config, then each rank writes

- `{output_dir}/rank{r}-weights.safetensors`: its trainable weights (every rank must hold the same);
- `{output_dir}/rank{r}-rows.json`: `{"rows": [[row, ...] per optimizer step], "losses": {step: loss}}`, the cache
  rows this rank's loop consumed at each step, as the loop received them, and the logged (process-averaged) loss.

    accelerate launch --multi_gpu --num_processes 2 -m flowtrain.testing.ddp_probe CONFIG [--resume latest] [k=v ...]
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import save_file


class RecordingBatches:
    """Passes batches through unchanged and notes each one's cache rows (`batch["index"]`) as the loop takes it."""

    def __init__(self, batches: Iterator[Any]):
        self.batches, self.rows = batches, []

    def __iter__(self) -> RecordingBatches:
        return self

    def __next__(self) -> Any:
        batch = next(self.batches)
        self.rows.append(batch["index"].tolist())
        return batch


def train_recording(cfg: Any, resume: str | None = None) -> tuple[Any, list[list[int]]]:
    """`flowtrain.train.loop.train`, with the rows each micro-batch read recorded: (TrainResult, rows per
    micro-batch). Nothing else differs: the recorder only looks at the batches the loop takes."""
    from flowtrain.train.control import StopSignals, determinism
    from flowtrain.train.loop import run_loop
    from flowtrain.train.run import build_run

    with StopSignals() as stop, determinism(cfg.train.deterministic), contextlib.ExitStack() as cleanup:
        run = build_run(cfg, resume, cleanup)
        recorder = RecordingBatches(run.batches)
        run.batches = recorder
        return run_loop(run, stop, progress=False), recorder.rows


def write_probe(cfg: Any, result: Any, rows: list[list[int]], rank: int) -> None:
    """The two per-rank files of the module docstring (rows grouped by optimizer step)."""
    from flowtrain.train.trainable import trainable_state

    out = Path(cfg.output_dir)
    ga = cfg.train.gradient_accumulation_steps
    steps = [sum(rows[i : i + ga], []) for i in range(0, len(rows), ga)]
    weights = {k: v.contiguous() for k, v in trainable_state(result.transformer).items()}
    save_file(weights, str(out / f"rank{rank}-weights.safetensors"))
    doc = {"rows": steps, "losses": {str(k): v for k, v in result.losses.items()}, "step": result.step}
    (out / f"rank{rank}-rows.json").write_text(json.dumps(doc))


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    from flowtrain.config import load_config

    resume = None
    if len(argv) > 2 and argv[1] == "--resume":
        resume, argv = argv[2], [argv[0], *argv[3:]]
    cfg = load_config(argv[0], argv[1:])
    result, rows = train_recording(cfg, resume)
    write_probe(cfg, result, rows, PartialState().process_index)


if __name__ == "__main__":
    main(sys.argv[1:])
