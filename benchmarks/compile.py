"""train.compile: first-step (compile) time and steady step time of the bare loop's model eager, with regional
compilation (flowtrain's default: each repeated block compiled in place) and with the whole model compiled.

Each variant runs in a fresh subprocess with an empty inductor cache, so compile times are cold.

    .venv/bin/python benchmarks/compile.py                       # tiny, inductor, ~5 min on 2 cores
    .venv/bin/python benchmarks/compile.py --model bench70m --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = ["eager", "regional", "full"]


def child(model: str, variant: str, steps: int, backend: str, threads: int) -> dict:
    import bare
    import torch

    from flowtrain.train.perf import compile_transformer

    if threads:
        torch.set_num_threads(threads)
    fx = common.fixture(model)
    s = bare.setup(common.train_config(fx, common.bench_dir() / "compile", max_steps=steps))
    if variant != "eager":
        compile_transformer(s.model, backend=backend, regional=variant == "regional")
    times = bare.run(s, steps)
    import torch._dynamo.utils as du

    return {
        "first_step_s": times[0],
        "step_ms": common.median(times[2:]) * 1e3,
        "graphs": du.counters["stats"]["unique_graphs"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "bench70m"], default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--threads", type=int, help="torch threads (default: tiny 1, see overhead.py; bench70m torch's)")
    p.add_argument("--variants", nargs="*", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    threads = args.threads if args.threads is not None else (1 if args.model == "tiny" else 0)
    if args.child:
        print("RESULT " + json.dumps(child(args.model, args.child, args.steps, args.backend, threads)))
        return
    common.fixture(args.model)
    rows = []
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as cache:  # cold inductor / FX graph caches
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--steps", str(args.steps),
                   "--backend", args.backend, "--threads", str(threads)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
        rows.append({"model": args.model, "variant": variant, "backend": args.backend, **json.loads(line[0][7:])})
        print(rows[-1], flush=True)
    eager = next((r["step_ms"] for r in rows if r["variant"] == "eager"), None)
    for r in rows:
        r["speedup"] = eager / r["step_ms"] if eager else None
    common.report("compile (bare loop, eager vs torch.compile)", rows, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
