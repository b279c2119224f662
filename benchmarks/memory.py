"""Memory: peak RSS of training the bench70m transformer (72.5M parameters, bf16 autocast) with flowtrain vs the
bare loop (benchmarks/bare.py), for LoRA and full fine-tune, with and without gradient checkpointing.

Each configuration runs in a fresh subprocess (`ru_maxrss` is a per-process high-water mark) for a few steps.
Two flowtrain numbers: `train_peak` is the peak when the last training step was logged (what the steps need),
`process_peak` also covers the final checkpoint and export that a bare loop does not do.

    .venv/bin/python benchmarks/memory.py               # 8 subprocesses, ~5 min on 2 cores
    .venv/bin/python benchmarks/memory.py --modes lora --gc 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(kind: str, mode: str, gc: bool, steps: int, tracking: list[str] | None) -> dict:
    fx = common.fixture("bench70m")
    cfg = common.train_config(fx, common.bench_dir() / f"memory-{kind}-{mode}-{int(gc)}", max_steps=steps)
    if tracking is not None:
        cfg["tracking"] = {"report_to": tracking}
    cfg["train_mode"] = mode
    cfg["train"]["gradient_checkpointing"] = gc
    if kind == "bare":
        import bare

        s = bare.setup(cfg, mode=mode, gradient_checkpointing=gc)
        bare.run(s, steps)
        return {"train_peak": _rss_mb(), "process_peak": _rss_mb()}
    import shutil

    from flowtrain.config import FlowtrainConfig
    from flowtrain.track import read_metrics
    from flowtrain.train.loop import train

    out = Path(cfg["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    train(FlowtrainConfig.model_validate(cfg), progress=False)
    rows = read_metrics(out / "logs" / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    return {"train_peak": rows[-1]["mem/peak_rss_gb"] * 1024, "process_peak": _rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="*", choices=["lora", "full"], default=["lora", "full"])
    p.add_argument("--gc", nargs="*", type=int, choices=[0, 1], default=[0, 1])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tracking", nargs="*", help="flowtrain's tracking.report_to (default: the config default)")
    p.add_argument("--child", nargs=3, metavar=("KIND", "MODE", "GC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        kind, mode, gc = args.child
        print("RESULT " + json.dumps(child(kind, mode, gc == "1", args.steps, args.tracking)))
        return
    common.fixture("bench70m")  # built once here, not in every child
    rows = []
    for mode in args.modes:
        for gc in args.gc:
            res = {}
            for kind in ("bare", "flowtrain"):
                cmd = [sys.executable, __file__, "--child", kind, mode, str(gc), "--steps", str(args.steps)]
                if args.tracking is not None:
                    cmd += ["--tracking", *args.tracking]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=False)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                res[kind] = json.loads(line[0][7:])
            rows.append({
                "mode": mode, "grad_ckpt": bool(gc), "bare_MB": res["bare"]["train_peak"],
                "flowtrain_train_MB": res["flowtrain"]["train_peak"],
                "ratio": res["flowtrain"]["train_peak"] / res["bare"]["train_peak"],
                "flowtrain_process_MB": res["flowtrain"]["process_peak"],
                "process_ratio": res["flowtrain"]["process_peak"] / res["bare"]["train_peak"],
            })  # fmt: skip
            print(rows[-1], flush=True)
    common.report("memory (peak RSS, bench70m, flowtrain / bare)", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
