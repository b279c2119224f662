"""Memory: peak RSS of training the bench70m transformer (72.5M parameters, bf16 autocast) with flowtrain vs the
bare loop (benchmarks/bare.py), for LoRA and full fine-tune, with and without gradient checkpointing.

Each configuration runs in a fresh subprocess (`ru_maxrss` is a per-process high-water mark) for a few steps.
Two flowtrain numbers: `train_peak` is the peak when the last training step was logged (what the steps need),
`process_peak` also covers the final checkpoint and export that a bare loop does not do.

    .venv/bin/python benchmarks/memory.py               # 8 subprocesses, ~5 min on 2 cores
    .venv/bin/python benchmarks/memory.py --modes lora --gc 0

`--savers`: the memory savers instead (docs/training.md#memory-savers), flowtrain LoRA only, one subprocess per
setting: peak memory against `train.blocks_to_swap` N (checkpointing off), then per `train.gradient_checkpointing`
level (no swap). Columns: `device_weights_MB`, the most weight bytes on the device at once as block swap accounts
them (every parameter and buffer when N = 0); `cuda_peak_MB`, torch.cuda.max_memory_allocated (CUDA only; on CPU the
moves are no-ops, so there the weight column is the measure of block swap and RSS the one of checkpointing);
`train_rss_MB`, the peak RSS when the last step was logged; `s_per_step`, the median step time.

    .venv/bin/python benchmarks/memory.py --savers      # 6 subprocesses (bf16: slow on CPUs without bf16 matmul)
    .venv/bin/python benchmarks/memory.py --savers --dtype float32 --steps 2   # ~8 min on 2 shared cores
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


def saver_child(swap: int, level: str, steps: int, dtype: str) -> dict:
    """One flowtrain LoRA run on bench70m with train.blocks_to_swap = `swap`, gradient_checkpointing = `level`, the
    frozen base in `dtype` (bfloat16: the fixture's, with bf16 autocast; float32: no autocast)."""
    import shutil
    import statistics

    import torch
    import yaml

    from flowtrain.config import FlowtrainConfig
    from flowtrain.track import read_metrics
    from flowtrain.train import run as run_module
    from flowtrain.train.loop import train

    fx = common.fixture("bench70m")
    out = common.bench_dir() / f"memory-savers-{swap}-{level.replace(':', '')}"
    cfg = common.train_config(fx, out, max_steps=steps)
    cfg["tracking"] = {"report_to": ["jsonl"], "graphs": False}
    cfg["train"]["blocks_to_swap"] = swap
    if dtype == "float32":
        cfg["model"]["dtype"], cfg["train"]["mixed_precision"] = "float32", "no"
    cfg["train"]["gradient_checkpointing"] = yaml.safe_load(level)  # false / true as booleans, levels as strings
    swaps = []  # the run's BlockSwap, for its byte accounting (the real one, built by the run)
    install = run_module.install_block_swap

    def keep(model, n, accelerator):
        swaps.append(install(model, n, accelerator))
        return swaps[-1]

    run_module.install_block_swap = keep
    shutil.rmtree(out, ignore_errors=True)
    result = train(FlowtrainConfig.model_validate(cfg), progress=False)
    rows = read_metrics(out / "logs" / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    m = result.transformer
    weights = (
        swaps[0].peak_bytes if swaps else sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    )
    cuda = rows[-1].get("mem/cuda_max_alloc_gb")
    return {
        "device_weights_MB": weights / 2**20,
        "cuda_peak_MB": cuda * 1024 if cuda is not None else None,
        "train_rss_MB": rows[-1]["mem/peak_rss_gb"] * 1024,
        "s_per_step": statistics.median(r["s_per_step"] for r in rows[1:] or rows),  # the first step warms up
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def savers(args: argparse.Namespace) -> None:
    """Peak memory vs train.blocks_to_swap, then per checkpointing level (each setting in its own subprocess)."""
    common.fixture("bench70m")
    settings = [(n, "false") for n in args.swap]  # block swap alone
    settings += [(0, lv) for lv in args.levels if (0, lv) not in settings]  # each checkpointing level alone
    rows = []
    for swap, level in settings:
        cmd = [sys.executable, __file__, "--saver-child", str(swap), level, "--steps", str(args.steps),
               "--dtype", args.dtype]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        rows.append({"blocks_to_swap": swap, "gradient_checkpointing": level, **json.loads(line[0][7:])})
        print(rows[-1], flush=True)
    for key in ("device_weights_MB", "cuda_peak_MB", "train_rss_MB", "s_per_step"):  # ratios to the first row
        if rows and rows[0][key]:
            for r in rows:
                r[f"{key}_ratio"] = r[key] / rows[0][key] if r[key] is not None else None
    common.report(f"memory savers (bench70m LoRA, {args.dtype})", rows, {"command": " ".join(sys.argv)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="*", choices=["lora", "full"], default=["lora", "full"])
    p.add_argument("--gc", nargs="*", type=int, choices=[0, 1], default=[0, 1])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tracking", nargs="*", help="flowtrain's tracking.report_to (default: the config default)")
    p.add_argument("--child", nargs=3, metavar=("KIND", "MODE", "GC"), help=argparse.SUPPRESS)
    p.add_argument("--savers", action="store_true", help="measure block swap and the checkpointing levels instead")
    p.add_argument("--swap", nargs="*", type=int, default=[0, 3, 6], help="--savers: train.blocks_to_swap values")
    p.add_argument("--levels", nargs="*", default=["false", "true", "every:2", "single"],
                   help="--savers: train.gradient_checkpointing values")  # fmt: skip
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="--savers: the frozen base's dtype (float32 is far faster on a CPU without bf16 matmul units)",
    )
    p.add_argument("--saver-child", nargs=2, metavar=("SWAP", "LEVEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.saver_child:
        swap, level = args.saver_child
        print("RESULT " + json.dumps(saver_child(int(swap), level, args.steps, args.dtype)))
        return
    if args.savers:
        savers(args)
        return
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
