"""DDP throughput on this CPU: samples/s of 1 process vs 2 processes (`accelerate launch`, gloo), same batch per
process, one torch thread each; prints the ratio (2.0 would be perfect scaling on two free cores). Also prints what
`train.random_draws: global` costs: the CPU time of one micro-step's σ + noise draw for a global batch of 1024²
FLUX.2 Klein latents, against the per-process share.

samples/s is the run's own `samples_per_s` metric (global samples / step time), median over the steps after the
first `--warmup`, so process start-up and the first step's allocations are not counted. Runs are interleaved
(1, 2, 2, 1, ...) so load from other users of the machine hits both alike; `uptime`'s load is printed with them.

    .venv/bin/python benchmarks/distributed.py                      # bench70m, 10 steps, 2 repetitions
    .venv/bin/python benchmarks/distributed.py --model tiny --steps 60 --reps 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PORT = 29610


def load_average() -> float:
    return os.getloadavg()[0]


def samples_per_s(out: Path, warmup: int) -> float:
    from flowtrain.track import read_metrics

    rows = read_metrics(out / "logs" / "metrics.jsonl")
    return common.median([r["samples_per_s"] for r in rows if r["step"] > warmup and r.get("samples_per_s")])


def train_once(cfg_path: Path, out: Path, processes: int, port: int) -> None:
    from flowtrain.testing.launch import accelerate_launch, cpu_env, ddp_args, run

    shutil.rmtree(out, ignore_errors=True)
    cmd = ["-m", "flowtrain", "train", str(cfg_path), f"output_dir={out}", "--quiet"]
    if processes == 1:
        cmd = [sys.executable, *cmd]
    else:
        cmd = accelerate_launch([*ddp_args(processes, port), *cmd])
    run(cmd, cpu_env(), timeout=3600)


def draw_ms(global_batch: int, reps: int = 3) -> float:
    """ms of one micro-step's σ + noise draw for `global_batch` 1024² Klein latents (64·64 tokens × 128 channels),
    as `make_inputs` makes it on the CPU."""
    import torch

    from flowtrain.flow import sample_sigmas

    times = []
    for r in range(reps):
        gen = torch.Generator().manual_seed(r)
        t = time.perf_counter()
        sample_sigmas(global_batch, gen, "logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, shift=3.0)
        torch.randn((global_batch, 64 * 64, 128), generator=gen)
        times.append(time.perf_counter() - t)
    return 1000 * common.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "bench70m"], default="bench70m")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=2, help="per process")
    args = p.parse_args()

    import torch
    import yaml

    torch.set_num_threads(1)  # the draw timing below: one core, like each training process
    fx = common.fixture(args.model)
    root = common.bench_dir() / "distributed"
    root.mkdir(parents=True, exist_ok=True)
    cfg = common.train_config(fx, root / "unused", max_steps=args.steps, batch_size=args.batch_size)
    cfg["tracking"] = {"report_to": ["jsonl"], "graphs": False}
    cfg_path = root / f"{args.model}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    loads = [load_average()]

    def measure(n: int) -> float:
        train_once(cfg_path, root / f"run{n}", n, PORT)
        return samples_per_s(root / f"run{n}", args.warmup)

    runs = {n: (lambda n=n: measure(n)) for n in (1, 2)}
    results = common.interleave(runs, args.reps)
    loads.append(load_average())
    one, two = common.median(results[1]), common.median(results[2])
    rows = [
        {"processes": n, "batch/process": args.batch_size, "samples/s": common.median(v), "runs": len(v),
         "each": " ".join(f"{x:.3g}" for x in v)}
        for n, v in results.items()
    ]  # fmt: skip
    common.report(f"distributed ({args.model}, {args.steps} steps)", rows, {"ratio_2_over_1": two / one})
    print(f"samples/s ratio 2 processes / 1 process: {two / one:.3f} (2.0 = perfect scaling); load average "
          f"{loads[0]:.2f} before, {loads[1]:.2f} after")  # fmt: skip

    # 8 processes: with `global` each draws the whole global batch, with `per_process` its own eighth
    draws = [
        {"global batch": g, "processes": 8, "global ms/process": draw_ms(g), "per_process ms/process": draw_ms(g // 8)}
        for g in (8, 32)
    ]
    common.report("random_draws: σ + noise of one micro-step, 1024² Klein latents, 1 thread", draws)
    return 0


if __name__ == "__main__":
    sys.exit(main())
