"""The kill -9 harness at length: many SIGKILLs (inside steps and inside checkpoint writes), resume from `latest`
after each, then compare with an uninterrupted run bitwise. Prints what it did and PASS / FAIL.

The test suite runs the same harness with 5 kills (tests/reliability/test_kill_resume.py; FLOWTRAIN_KILL_POINTS
changes that count there too). Each kill costs one process start (~5-8 s of imports on 2 cores).

    .venv/bin/python benchmarks/kill_resume.py                 # 25 kills, ~4 min on 2 cores
    .venv/bin/python benchmarks/kill_resume.py --kills 100 --steps 240 --seed 7
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=25)
    p.add_argument("--steps", type=int, default=None, help="max_steps (default: 3 per kill + 6)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    import yaml

    from flowtrain.testing import killharness as kh

    steps = args.steps or 3 * args.kills + 6
    fx = common.tiny_fixture()
    root = common.bench_dir() / "kill-resume"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = common.train_config(fx, root / "unused", max_steps=steps, caption_dropout=0.2)
    cfg["lora"] = {**cfg.get("lora", {}), "dropout": 0.1}
    cfg["dataset"] = {**cfg["dataset"], "latent_sampling": "sample"}
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    cfg["tracking"] = {"report_to": ["jsonl"]}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))

    rc = kh.run_once(kh.train_command(root / "cfg.yaml", root / "ref", resume=False), kh.child_env(), root / "ref.log")
    if rc != 0:
        print(f"reference run failed ({rc}); see {root / 'ref.log'}")
        return 1
    res = kh.kill_and_resume(root / "cfg.yaml", root / "killed", steps, kills=args.kills, seed=args.seed)
    landed = Counter(("write" if k.in_write else "step") for k in res.kills)
    ok_losses = kh.loss_sequence(root / "killed") == kh.loss_sequence(root / "ref")
    a, b = kh.final_weights(root / "killed"), kh.final_weights(root / "ref")
    ok_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{args.kills} SIGKILLs over {steps} steps: {landed['write']} inside a checkpoint write, {landed['step']} "
          f"elsewhere; {res.starts} process starts in {res.wall_s:.0f} s")  # fmt: skip
    print(f"final exit code {res.final_returncode}; loss sequence equal: {ok_losses}; weights equal: {ok_weights}")
    ok = res.final_returncode == 0 and ok_losses and ok_weights
    print("PASS" if ok else f"FAIL (logs: {root})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
