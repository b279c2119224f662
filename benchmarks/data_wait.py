"""Data wait in training: the fraction of step time the loop spends blocked on the next batch.

flowtrain logs it every logged step as `data_wait_frac` (time inside `next(batches)` / wall time since the last
log, measured on the host without device syncs; see `flowtrain.track.stats.TrainMeter`). This runs the tiny
model with the loader settings below, interleaved, and prints the median over steps after the warm-up:

  no prefetch      num_workers 0, dataset.prefetch false (what auto picks on CPU): read on the training thread
  thread prefetch  num_workers 0, dataset.prefetch true (what auto picks on a GPU): a thread reads 2 ahead
  1 / 2 workers    DataLoader worker processes, prefetch_factor 2

    .venv/bin/python benchmarks/data_wait.py            # ~2 min on 2 cores
    .venv/bin/python benchmarks/data_wait.py --model bench70m --steps 8 --warmup 2
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = {
    "no prefetch": {"num_workers": 0, "prefetch": False},
    "thread prefetch": {"num_workers": 0, "prefetch": True},
    "1 worker": {"num_workers": 1},
    "2 workers": {"num_workers": 2},
}


def run(cfg: dict, warmup: int, tag: str) -> tuple[float, float]:
    """(median data_wait_frac, median s_per_step) of one training run."""
    from flowtrain.config import FlowtrainConfig
    from flowtrain.track import read_metrics
    from flowtrain.train.loop import train

    out = Path(cfg["output_dir"] + tag)
    shutil.rmtree(out, ignore_errors=True)
    train(FlowtrainConfig.model_validate({**cfg, "output_dir": str(out)}), progress=False)
    rows = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if r["step"] > warmup]
    shutil.rmtree(out, ignore_errors=True)
    return common.median([r["data_wait_frac"] for r in rows]), common.median([r["s_per_step"] for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "bench70m"], default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see overhead.py; 0: torch's default)")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    fx = common.fixture(args.model)
    # JSONL tracking only: each variant runs in this process, and the measure is the loader's share of the step.
    base = common.train_config(fx, str(common.bench_dir() / "data-wait"), max_steps=args.steps)
    base["tracking"] = {"report_to": ["jsonl"]}
    counter = iter(range(10**6))
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants}

    def variant(name: str):
        cfg = {**base, "dataset": {**base["dataset"], **VARIANTS[name]}}
        return lambda: results[name].append(run(cfg, args.warmup, f"-{next(counter)}")) or 0.0

    common.interleave({v: variant(v) for v in args.variants}, args.reps)
    rows = [
        {
            "model": args.model,
            "loader": name,
            "data_wait_frac": common.median([w for w, _ in res]),
            "step_ms": common.median([s for _, s in res]) * 1e3,
            "runs": len(res),
            "threads": torch.get_num_threads(),
        }
        for name, res in results.items()
    ]
    common.report("data wait (fraction of step time blocked on the next batch)", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
