"""Framework overhead: `flowtrain.train.loop.train` vs a bare hand-written PyTorch loop (benchmarks/bare.py).

Same transformer, batch, LoRA, optimizer and precomputed data. Both run in this process, interleaved
(bare, flowtrain, flowtrain, bare, ...); each run's steady-state step time is the median over its steps after
`--warmup`. `ratio` is median(flowtrain) / median(bare) over the repetitions; `paired_ratio` is the median over
repetitions of flowtrain / bare within each (adjacent runs, so it resists drift in the machine's load); `min_ratio`
is the fastest flowtrain step over the fastest bare step (other processes on the machine only ever add time, so the
fastest step is the closest to the work itself).

flowtrain's step time is read from its own metrics (`s_per_step` in logs/metrics.jsonl, logged every step), so it
covers everything the loop does per step: data loading, σ/noise, forward/backward, clipping, the optimizer, the
non-finite check, logging and tracking.

    .venv/bin/python benchmarks/overhead.py                  # tiny + bench70m, ~4 min on 2 cores
    .venv/bin/python benchmarks/overhead.py --model tiny --reps 7 --steps 80
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bare  # noqa: E402
import common  # noqa: E402

_RUN = 0
# threads: torch intra-op threads, the same for both sides: 1 by default. On the 2-vCPU VM these numbers were
# taken on, waking OpenMP's second thread costs up to ~8 ms per parallel region (an idle vCPU sleeps in the
# hypervisor): a tiny step becomes 10-50× slower and a bench70m step varies 1.2-10 s, depending on load and on
# whatever other threads the process has (a prefetch thread changed it; it is off on CPU by default). That is
# noise, not framework overhead; one thread removes it. `--threads 0` uses torch's default.
DEFAULTS = {
    "tiny": {"steps": 60, "warmup": 10, "reps": 5, "threads": 1},
    "bench70m": {"steps": 6, "warmup": 2, "reps": 3, "threads": 1},
}


def flowtrain_run(cfg_dict: dict, warmup: int) -> tuple[float, float, float]:
    """One `train()` run; (median s/step after warm-up, fastest step, median data-wait fraction)."""
    from flowtrain.config import FlowtrainConfig
    from flowtrain.track import read_metrics
    from flowtrain.train.loop import train

    # A fresh output_dir each run: MLflow keeps its SQLite store per URI open for the whole process.
    global _RUN
    _RUN += 1
    out = Path(f"{cfg_dict['output_dir']}-{_RUN}")
    shutil.rmtree(out, ignore_errors=True)
    train(FlowtrainConfig.model_validate({**cfg_dict, "output_dir": str(out)}), progress=False)
    rows = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if r["step"] > warmup]
    times = [r["s_per_step"] for r in rows]
    return common.median(times), min(times), common.median([r.get("data_wait_frac", 0.0) for r in rows])


def bare_run(cfg_dict: dict, steps: int, warmup: int, fastest: list[float]) -> float:
    times = bare.run(bare.setup(cfg_dict), steps)[warmup:]
    fastest.append(min(times))
    return common.median(times)


def measure(name: str, steps: int, warmup: int, reps: int, threads: int, overrides: dict) -> dict:
    import torch

    fx = common.fixture(name)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    cfg = common.train_config(fx, common.bench_dir() / f"overhead-{name}", max_steps=steps)
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        cfg.setdefault(section, {})[field] = value
    waits: list[float] = []
    fastest: dict[str, list[float]] = {"bare": [], "flowtrain": []}

    def ft() -> float:
        t, t_min, w = flowtrain_run(cfg, warmup)
        fastest["flowtrain"].append(t_min)
        waits.append(w)
        return t

    res = common.interleave({"bare": lambda: bare_run(cfg, steps, warmup, fastest["bare"]), "flowtrain": ft}, reps)
    b, f = common.median(res["bare"]), common.median(res["flowtrain"])
    used = torch.get_num_threads()
    torch.set_num_threads(default_threads)
    print(f"{name}: bare {[round(x * 1e3, 2) for x in res['bare']]} ms, "
          f"flowtrain {[round(x * 1e3, 2) for x in res['flowtrain']]} ms")  # fmt: skip
    return {
        "model": name,
        "bare_ms": b * 1e3,
        "flowtrain_ms": f * 1e3,
        "ratio": f / b,
        # Adjacent runs of a repetition share the machine's load: the median of their ratios resists drift.
        "paired_ratio": common.median([x / y for x, y in zip(res["flowtrain"], res["bare"], strict=True)]),
        "min_ratio": min(fastest["flowtrain"]) / min(fastest["bare"]),
        "data_wait": common.median(waits),
        "threads": used,
        "steps×reps": f"{steps}×{reps}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "bench70m", "all"], default="all")
    p.add_argument("--steps", type=int, help="steps per run (default: tiny 60, bench70m 6)")
    p.add_argument("--warmup", type=int, help="steps left out of each run's median (default: tiny 10, bench70m 2)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default: tiny 5, bench70m 3)")
    p.add_argument("--threads", type=int, help="torch threads, both sides (default 1, see DEFAULTS; 0: torch's)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=JSON",
                   help="config overrides for the flowtrain side, e.g. tracking.report_to='[\"jsonl\"]'")  # fmt: skip
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import json

    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if overrides.get("train.log_every", 1) != 1:  # s_per_step is a window mean then, not comparable step by step
        p.error("train.log_every must stay 1: flowtrain's step times are read from its per-step metrics")
    if args.model == "all":  # one process per model: accelerate's state (e.g. mixed precision) is per process
        rest = sys.argv[1:]
        if "--model" in rest:
            i = rest.index("--model")
            rest = rest[:i] + rest[i + 2 :]
        for name in DEFAULTS:
            subprocess.run([sys.executable, __file__, "--model", name, *rest], check=True)
        return
    d = DEFAULTS[args.model]
    threads = d["threads"] if args.threads is None else args.threads
    steps, warmup, reps = args.steps or d["steps"], args.warmup or d["warmup"], args.reps or d["reps"]
    row = measure(args.model, steps, warmup, reps, threads, overrides)
    common.report("overhead (flowtrain / bare step time)", [row], {"command": " ".join(sys.argv), "set": overrides})


if __name__ == "__main__":
    main()
