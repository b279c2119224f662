"""Tracking cost: `flowtrain train` with MLflow in its child process (the default) vs JSONL only vs MLflow in the
training process (`tracking.mlflow_async: false`, how flowtrain tracked before).

Each run is the real CLI in a fresh process (`python -m flowtrain train CONFIG`), on the tiny fixture, with the
variants interleaved (A B C, C B A, ...). Per run:
  first_step_s  launch → the first optimizer step's metrics row (its `time` in logs/metrics.jsonl; log_every 1)
  wall_s        launch → the process has exited (the MLflow run closed, the store complete)
  end_s         the last step's metrics row → exit: export, graphs and closing the trackers (waiting for MLflow)
  peak_rss_mib  the training process's peak RSS (`wait4`; the MLflow child is smaller, so this is the trainer's)
  s_per_step    median step time after the first 5 steps (does the child steal CPU from the steps?)

    .venv/bin/python benchmarks/tracking.py                 # 3 reps × 3 variants × 50 steps, ~3 min on 2 cores
    .venv/bin/python benchmarks/tracking.py --reps 5 --steps 200
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = {  # name → the tracking section
    "mlflow": {"report_to": ["mlflow", "jsonl"]},
    "jsonl": {"report_to": ["jsonl"]},
    "mlflow_sync": {"report_to": ["mlflow", "jsonl"], "mlflow_async": False},
}


def run_once(config: Path, out: Path) -> dict[str, float]:
    """One `flowtrain train` process; its timings and peak RSS."""
    from flowtrain.track import read_metrics

    shutil.rmtree(out, ignore_errors=True)
    # This checkout's flowtrain, whatever is installed.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "flowtrain", "train", str(config), "--quiet"]
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    rows = read_metrics(out / "logs" / "metrics.jsonl")
    steps = sorted(r["s_per_step"] for r in rows[5:]) or [float("nan")]
    return {
        "first_step_s": rows[0]["time"] - start,
        "wall_s": wall,
        "end_s": start + wall - rows[-1]["time"],  # last step → exit: export, graphs, closing the trackers
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "s_per_step": steps[len(steps) // 2],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="runs of each variant (interleaved)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()

    import yaml

    fx = common.fixture("tiny")
    configs = {}
    for name in args.variants:
        out = common.bench_dir() / f"tracking-{name}"
        cfg = common.train_config(fx, out, max_steps=args.steps)
        cfg["tracking"] = {**VARIANTS[name], "graphs": True}
        configs[name] = common.bench_dir() / f"tracking-{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    results: dict[str, list[dict[str, float]]] = {n: [] for n in args.variants}

    def variant(name: str):
        def go() -> float:
            r = run_once(configs[name], common.bench_dir() / f"tracking-{name}")
            results[name].append(r)
            print(f"  {name:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
            return r["wall_s"]

        return go

    common.interleave({n: variant(n) for n in args.variants}, args.reps)
    keys = ("first_step_s", "wall_s", "end_s", "peak_rss_mib", "s_per_step")
    med = {n: {k: common.median([r[k] for r in rs]) for k in keys} for n, rs in results.items()}
    rows = [{"variant": n, **med[n]} for n in args.variants]
    for base in ("jsonl", "mlflow_sync"):
        if "mlflow" in med and base in med and base != "mlflow":
            rows.append({"variant": f"mlflow / {base}", **{k: med["mlflow"][k] / med[base][k] for k in keys}})
    common.report("tracking", rows, {"steps": args.steps, "reps": args.reps})


if __name__ == "__main__":
    main()
