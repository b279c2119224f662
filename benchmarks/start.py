"""Start-up and the whole job: images → LoRA with `flowtrain train CONFIG --from IMAGES` (one process: prepare →
precompute → train) vs a baseline doing the same work in one process, each run as a fresh process, interleaved.

Baseline: diffusers' `examples/dreambooth/train_dreambooth_lora_flux2_klein.py`, unmodified, where it can run
(`--script PATH`): it imports torchvision, which flowtrain's environment must not get, so run this benchmark with the
interpreter `benchmarks/script_env.sh` makes (torch + torchvision + flowtrain): every side then runs on that one
torch build (`--script-python` picks another interpreter for the script alone). Otherwise — and by default —
`benchmarks/start_bare.py`: decode, encode with the pipeline's own VAE and `encode_prompt`, free the encoders, train
with the hand-written loop of `bare.py`, save the LoRA. The output names the baseline used.

Both sides: the tiny Klein pipeline (`common.tiny_fixture`), the same `--images` PNGs with captions, LoRA rank 16 on
the attention preset, batch 2, AdamW lr 1e-4, fp32, 32 px, `--steps` optimizer steps, `--threads` torch threads.
flowtrain starts from the images every time (fresh raw, cache and run folders: nothing reused) and writes what its
verbs write (shards, reports, cache, metrics, MLflow store); `checkpoint.final: false`, because neither baseline
writes a resumable checkpoint at the end (its LoRA file is all it leaves).

Measured per run, from outside the process:
  wall       process start → exit (images → LoRA file)
  first      process start → the first optimizer step done (flowtrain: `time` of step 1 in logs/metrics.jsonl;
             the bare baseline prints it; the script: its progress bar's first step on stderr)
  peak RSS   the process's maximum resident set (wait4's ru_maxrss)
  s/step     median step time after `--warmup` steps (flowtrain: its per-step `s_per_step`); the ratio to the bare
             loop is shown two ways: of the medians over repetitions, and paired (the median over repetitions of
             flowtrain / bare within each, adjacent runs that share the machine's load)

Ratios: flowtrain (MLflow on: the default tracking) / baseline for wall, first and peak RSS (target ≤ 1.0), and
flowtrain / the bare loop for s/step (target ≤ 1.02); the same with `tracking.report_to: [jsonl]` as a second row,
and with JSONL and `tracking.graphs: false` (no end-of-run PNGs) as a third, to show what each costs.

    .venv/bin/python benchmarks/start.py                      # 3 interleaved reps, 200 steps, ~3 min on 2 cores
    .venv/bin/python benchmarks/start.py --reps 5 --threads 0
    bash benchmarks/script_env.sh && runs/bench/script-venv/bin/python benchmarks/start.py --reps 5 \
        --script DIFFUSERS/examples/dreambooth/train_dreambooth_lora_flux2_klein.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
RESOLUTION, N_IMAGES = 32, 32
SCRIPT_IN_DIFFUSERS = "examples/dreambooth/train_dreambooth_lora_flux2_klein.py"


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _launch(cmd: list[str], env: dict[str, str], cwd: Path, on_line=None) -> tuple[float, float, float, str]:
    """Run `cmd`; (start, end as time.time(), peak RSS in MiB, stdout). `on_line(time, line)` sees each stderr line
    as it arrives (tqdm's carriage returns split lines too)."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[str] = []

    def pump() -> None:
        buf = b""
        while chunk := proc.stderr.read1(4096):
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for line in lines:
                text = line.decode(errors="replace")
                err.append(text)
                if on_line is not None:
                    on_line(time.time(), text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}\n" + "\n".join(err[-40:]))
    return start, end, usage.ru_maxrss / 1024, out


def flowtrain_run(fx: common.Fixture, images: Path, work: Path, steps: int, warmup: int, threads: int,
                  report_to: list[str] | None, graphs: bool = True) -> dict:  # fmt: skip
    """`flowtrain train cfg.yaml --from images` in a fresh process and fresh folders."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = common.train_config(fx, work / "run", max_steps=steps)
    cfg["dataset"]["cache_dir"] = str(work / "cache")
    cfg["checkpoint"]["final"] = False
    if report_to is not None:
        cfg["tracking"] = {"report_to": report_to}
    if not graphs:
        cfg.setdefault("tracking", {})["graphs"] = False
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "flowtrain", "train", "cfg.yaml", "--from", str(images), "--resolution",
           str(RESOLUTION), "--quiet"]  # fmt: skip
    start, end, rss, _ = _launch(cmd, _env(threads), work)
    rows = [json.loads(line) for line in (work / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert (work / "run" / "pytorch_lora_weights.safetensors").exists()
    steady = [r["s_per_step"] for r in rows if r["step"] > warmup]
    return {"wall": end - start, "first": rows[0]["time"] - start, "rss": rss, "step": common.median(steady)}


def bare_job(fx: common.Fixture, images: Path, work: Path, steps: int, warmup: int, threads: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [sys.executable, str(HERE / "start_bare.py"), "--pipeline", str(fx.pipeline), "--images", str(images),
           "--out", str(work / "lora"), "--steps", str(steps), "--resolution", str(RESOLUTION),
           "--seq", str(fx.max_sequence_length)]  # fmt: skip
    start, end, rss, out = _launch(cmd, _env(threads), work)
    res = json.loads(out.strip().splitlines()[-1])
    return {"wall": end - start, "first": res["first_step"] - start, "rss": rss,
            "step": common.median(res["step_s"][warmup:])}  # fmt: skip


def script_job(python: str, script: Path, fx: common.Fixture, images: Path, work: Path, steps: int, threads: int,
               prompt: str) -> dict:  # fmt: skip
    """diffusers' DreamBooth LoRA script, unmodified, on the same pipeline, images, LoRA and steps. Its first
    optimizer step is the moment its progress bar first shows `1/steps`."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # the script opens every file of --instance_data_dir as an image and gives all the one --instance_prompt
    only = work / "images"
    only.mkdir()
    for png in sorted(images.glob("*.png")):
        (only / png.name).symlink_to(png)
    cmd = [python, str(script), "--pretrained_model_name_or_path", str(fx.pipeline), "--instance_data_dir",
           str(only), "--instance_prompt", prompt, "--output_dir", str(work / "out"), "--resolution",
           str(RESOLUTION), "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
           "--rank", "16", "--lora_alpha", "16", "--max_sequence_length", str(fx.max_sequence_length),
           "--mixed_precision", "no", "--checkpointing_steps", str(steps + 1), "--seed", "0",
           "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--dataloader_num_workers", "0",
           # Klein's hidden-state layers; the script's default (10, 20, 30) is FLUX.2 [dev]'s
           "--text_encoder_out_layers", "9", "18", "27"]  # fmt: skip
    # flowtrain's `attention` preset by module name: double blocks' attention (both streams), single blocks' fused
    # projection and their output Linear (`to_out` alone would also match the double blocks' ModuleList)
    singles = json.loads((fx.pipeline / "transformer" / "config.json").read_text())["num_single_layers"]
    layers = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "to_qkv_mlp_proj", *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)]]  # fmt: skip
    cmd += ["--lora_layers", ",".join(layers)]
    first: list[float] = []
    done = re.compile(rf"\b1/{steps}\b")

    def on_line(t: float, line: str) -> None:
        if not first and done.search(line):
            first.append(t)

    start, end, rss, _ = _launch(cmd, _env(threads), work, on_line)
    return {"wall": end - start, "first": (first[0] if first else float("nan")) - start, "rss": rss,
            "step": float("nan")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the s/step medians (default 20)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--untimed", type=int, default=1,
                   help="rounds of every side run first and not counted, so every side starts with the same files "
                        "(libraries, models, images) in the page cache (default 1)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads, every side (default 1; 0: torch's)")
    p.add_argument("--script", type=Path, help=f"diffusers' {SCRIPT_IN_DIFFUSERS}, unmodified (baseline if given)")
    p.add_argument("--script-python", default=sys.executable,
                   help="the interpreter for --script (needs torchvision; default: this one, so every side runs on "
                        "the same torch build)")  # fmt: skip
    args = p.parse_args()

    fx = common.tiny_fixture()
    images = common.bench_dir() / "start" / "images"
    if not images.exists():
        from flowtrain.testing.data import make_image_folder

        make_image_folder(images, n=N_IMAGES)
    work = common.bench_dir() / "start"
    runs = {
        "mlflow": lambda: flowtrain_run(fx, images, work / "ft-mlflow", args.steps, args.warmup, args.threads, None),
        "jsonl": lambda: flowtrain_run(
            fx, images, work / "ft-jsonl", args.steps, args.warmup, args.threads, ["jsonl"]
        ),  # fmt: skip
        "jsonl-nographs": lambda: flowtrain_run(
            fx, images, work / "ft-nographs", args.steps, args.warmup, args.threads, ["jsonl"], graphs=False
        ),  # fmt: skip
        "bare": lambda: bare_job(fx, images, work / "bare", args.steps, args.warmup, args.threads),
    }
    baseline = "bare"
    if args.script is not None:
        baseline = "script"
        runs["script"] = lambda: script_job(args.script_python, args.script, fx, images, work / "script",
                                            args.steps, args.threads, "a photo")  # fmt: skip
    for _ in range(args.untimed):
        for run in runs.values():
            run()
    res = common.interleave(runs, args.reps)
    med = {name: {k: common.median([r[k] for r in rs]) for k in ("wall", "first", "rss", "step")}
           for name, rs in res.items()}  # fmt: skip
    for name, m in med.items():
        print(f"{name:>7}: " + ", ".join(f"{k} {[round(r[k], 3) for r in res[name]]}" for k in m))
    base = med[baseline]
    rows = []
    tracking = {"mlflow": "MLflow + JSONL (default)", "jsonl": "JSONL", "jsonl-nographs": "JSONL, graphs off"}
    for side, label in tracking.items():
        m = med[side]
        rows.append({
            "flowtrain tracking": label,
            "baseline": "diffusers script" if baseline == "script" else "bare one-process job (start_bare.py)",
            "wall s": f"{m['wall']:.2f} / {base['wall']:.2f}",
            "wall ratio": m["wall"] / base["wall"],
            "first step s": f"{m['first']:.2f} / {base['first']:.2f}",
            "first ratio": m["first"] / base["first"],
            "peak RSS MiB": f"{m['rss']:.0f} / {base['rss']:.0f}",
            "RSS ratio": m["rss"] / base["rss"],
            "s/step vs bare": m["step"] / med["bare"]["step"],
            "s/step paired": common.median([f["step"] / b["step"]
                                            for f, b in zip(res[side], res["bare"], strict=True)]),
        })  # fmt: skip
    common.report(f"start-up, images → LoRA ({args.steps} steps, tiny)", rows,
                  {"command": " ".join(sys.argv), "runs": res})  # fmt: skip
    ok = all(r["wall ratio"] <= 1 and r["first ratio"] <= 1 and r["RSS ratio"] <= 1 and r["s/step vs bare"] <= 1.02
             for r in rows[:1])  # fmt: skip
    print(f"\nall four targets (MLflow on): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
