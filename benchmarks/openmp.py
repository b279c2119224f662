"""OpenMP wait policy: does the CLI's choice keep the quiet machine's speed and avoid the busy machine's collapse?

`flowtrain train` runs as the console script does, in its own process, with torch's default thread count, on the
tiny model (whose 25 ms step makes the wait policy matter most). Three ways to run it, each in two conditions:

- `cli`: the CLI's own choice (src/flowtrain/openmp.py), nothing set by hand;
- `default`: GNU OpenMP's default (spin ~300,000 times, then sleep): torch is imported before the CLI runs, so
  the CLI's choice comes too late to matter, as it was before the CLI chose anything;
- `passive`: `OMP_WAIT_POLICY=PASSIVE` set by hand, as the CLI did for every command before it measured.

Conditions: `idle` (nothing else on the machine), `busy` (one other process keeps a core busy). Rounds are
interleaved (every variant once per condition per round); each run's step time is the median `s_per_step` after
the warm-up, read from its own metrics. Printed: medians per cell, and the two ratios that matter:
cli/default when idle (≤ 1 means nothing got slower on a quiet machine) and cli/passive when busy.

    .venv/bin/python benchmarks/openmp.py               # ~4 min on 2 cores; run it on an otherwise idle machine
    .venv/bin/python benchmarks/openmp.py --rounds 5 --steps 80
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

OPENMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
# `default`: libgomp reads its settings when torch loads, so importing torch first makes the CLI's choice moot.
DEFAULT_CODE = "import sys, torch; from flowtrain.cli import main; sys.exit(main(sys.argv[1:]))"


def run_once(variant: str, config: Path, out: Path, warmup: int) -> tuple[float, str]:
    """One `flowtrain train` process; (median s/step after `warmup`, the policy OpenMP ran with)."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_KEYS}
    cmd = [sys.executable, "-m", "flowtrain"]
    if variant == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif variant == "default":
        cmd = [sys.executable, "-c", DEFAULT_CODE]
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(
        [*cmd, "train", str(config), f"output_dir={json.dumps(str(out))}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: flowtrain train failed:\n{proc.stderr[-3000:]}")
    from flowtrain.track import read_metrics

    times = [r["s_per_step"] for r in read_metrics(out / "logs" / "metrics.jsonl") if r["step"] > warmup]
    chose = {"passive": "PASSIVE", "default": "default"}.get(variant)
    if chose is None:  # the CLI says so in its log when it turns waiting passive
        chose = "PASSIVE" if "OpenMP wait policy PASSIVE" in proc.stderr else "default"
    return common.median(times), chose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()

    fx = common.tiny_fixture()
    work = common.bench_dir() / "openmp"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "train.json"
    cfg = common.train_config(fx, work / "run", max_steps=args.steps)
    cfg["tracking"] = {"report_to": ["jsonl"]}
    config.write_text(json.dumps(cfg))

    variants = ("cli", "default", "passive")
    ms: dict[tuple[str, str], list[float]] = {}
    chosen: dict[str, list[str]] = {"idle": [], "busy": []}
    for rnd in range(args.rounds):
        for condition in ("idle", "busy"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
            time.sleep(0.5)  # the other process is spinning before flowtrain starts (and idle means idle)
            try:
                for v in variants:
                    s, chose = run_once(v, config, work / f"run-{v}", args.warmup)
                    ms.setdefault((condition, v), []).append(1000 * s)
                    if v == "cli":
                        chosen[condition].append(chose)
                    print(f"round {rnd + 1} {condition:4s} {v:8s} {1000 * s:8.1f} ms/step  ({chose})", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()

    med = {k: common.median(v) for k, v in ms.items()}
    ratios = {
        "idle: cli / default (<= 1: nothing slower on a quiet machine)": med[("idle", "cli")]
        / med[("idle", "default")],
        "busy: cli / passive": med[("busy", "cli")] / med[("busy", "passive")],
        "busy: default / passive (the collapse avoided)": med[("busy", "default")] / med[("busy", "passive")],
    }
    rows = [
        {
            "condition": c,
            **{f"{v} ms/step": round(med[(c, v)], 1) for v in variants},
            "cli chose": ", ".join(chosen[c]),
        }
        for c in ("idle", "busy")
    ]
    common.report(
        "openmp",
        rows,
        {
            **{k: round(r, 3) for k, r in ratios.items()},
            "runs": {f"{c}/{v}": [round(x, 1) for x in ms[(c, v)]] for c, v in ms},
        },
    )
    for k, r in ratios.items():
        print(f"{k}: {r:.3f}")


if __name__ == "__main__":
    main()
