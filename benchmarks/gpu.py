"""GPU readiness: step time, tokens/s, MFU and peak memory of Klein-4B-shaped training, flowtrain vs a bare PyTorch
loop, the speed/memory variants, and the CUDA-only tests, in one script sized to finish in ≤ 8 minutes on one H200.

Model: FLUX.2 Klein 4B's transformer shape (5 double + 20 single blocks, 24 heads × 128, text 512 × 7680;
`common.KLEIN4B`), randomly initialised on the GPU and saved once in bf16 (no download), trained from a synthetic
latent cache at 512 px (1024 image tokens) and 1024 px (4096), batch 1, bf16 autocast:
  - LoRA rank 16 on the `all` preset, AdamW (the frozen base in bf16, adapters in fp32);
  - full fine-tune with bitsandbytes' 8-bit AdamW (fp32 master weights).
flowtrain's side is its real loop: `train.run.build_run` + `train.loop.run_loop`, the same calls `flowtrain train`
makes, with the batch iterator wrapped by a step timer (CUDA events at every batch fetch). After the measured steps the
timer ends the run before the loop's end-of-run checkpoint: a 4B full fine-tune's would write ~40 GB, which is not
step time. The bare side is benchmarks/bare.py on the same weights, cache, optimizer and shapes.

Every measurement runs in its own subprocess (clean peak-memory counters; an out-of-memory stays in its cell), in
priority order: the headline numbers first (LoRA 1024 px eager: flowtrain and bare; full fine-tune 1024 px: memory),
then the CUDA-only tests (pytest, tests marked `cuda`), LoRA `train.compile` (regional) and gradient checkpointing
off, then 512 px and the full fine-tune's variants (`plan`). A time budget (`--budget-s`) is tracked throughout: a
measurement that would not fit is recorded as "skipped: time budget" instead of run (`run_plan`).

MFU = model FLOPs per step (benchmarks/flops.py states the formula; recomputation by gradient checkpointing is not
model FLOPs) / (step time × the GPU's dense bf16 peak, looked up from `torch.cuda.get_device_name()`; an unknown GPU
gets MFU null with the reason).

    .venv/bin/python benchmarks/gpu.py --out runs/bench/gpu.json          # on a GPU machine; `make gpu-bench`
    .venv/bin/python benchmarks/gpu.py --quick                            # the plumbing on CPU, tiny shape, < 1 min

`--quick` runs the plan's first cells (each kind once) on the CPU with a Klein-shaped model at test-suite size
(`common.TINY_SHAPE`), all in one subprocess, with perf_counter timing, `train.compile` on the `eager` backend
(traced, not code-generated: the plumbing, in seconds) and MFU null; tests/perf/test_gpu_bench.py runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import flops  # noqa: E402

GIB = 2**30
TARGETS = {"lora_mfu": 0.40, "overhead": 1.02, "compile_speedup": 1.2}
MEMORY_SAVERS = (
    "flowtrain's memory savers today: gradient checkpointing (train.gradient_checkpointing: measured on, off, and at "
    "the levels 'single' and 'every:2'), block swap (train.blocks_to_swap: 10 blocks measured, LoRA), low-bit "
    "optimizer states (optimizer.name adamw8bit, measured as the full fine-tune's optimizer; also ao_adamw8bit / "
    "ao_adamw4bit / ao_adamw_fp8, adafactor), plus EMA weights kept on the CPU (ema.device)."
)
# Rough wall seconds of a cell on an H200 (start, imports, loading 7.7 GB of weights, steps); replaced by what cells
# of the same kind took once one has run. Only used to decide whether a cell still fits the budget.
GPU_ESTIMATE_S = {"eager": 30.0, "compile": 120.0, "tests": 60.0}
QUICK_ESTIMATE_S = {"eager": 3.0, "compile": 10.0, "tests": 60.0}


# ---- the cells -------------------------------------------------------------------------------------------------------
def cell(kind: str, mode: str, res: int, *, gc: bool | str = True, compiled: bool = False, swap: int = 0) -> dict:
    """One measurement: `kind` flowtrain | bare, `mode` lora | full, `res` px, gradient checkpointing (true / false
    or a level such as "every:2"; flowtrain only), compile, train.blocks_to_swap (flowtrain LoRA only)."""
    ckpt = {True: "gc", False: "nogc"}.get(gc) if isinstance(gc, bool) else f"gc{gc.replace(':', '')}"
    name = f"{mode}-{res}-{'compile' if compiled else 'eager'}-{ckpt}{f'-swap{swap}' if swap else ''}-{kind}"
    return {"id": name, "kind": kind, "mode": mode, "resolution": res, "grad_ckpt": gc, "compile": compiled,
            "swap": swap}  # fmt: skip


def saver_cells(shape: common.Shape) -> list[dict]:
    """The memory savers at the high resolution, LoRA (docs/training.md#memory-savers): checkpointing of the single
    blocks only and of every 2nd block (against the baseline's every block and the no-checkpointing cell), and 10 of
    the 25 blocks swapped to the CPU with checkpointing on (against the baseline)."""
    hi, blocks = shape.resolutions[1], shape.transformer["num_layers"] + shape.transformer["num_single_layers"]
    return [cell("flowtrain", "lora", hi, gc="single"), cell("flowtrain", "lora", hi, gc="every:2"),
            cell("flowtrain", "lora", hi, swap=min(10, blocks))]  # fmt: skip


def plan(shape: common.Shape) -> list[dict | str]:
    """The cells in priority order; "tests" marks where the CUDA-only tests run. Checkpointing is on in the baseline,
    as in the shipped configs (configs/klein4b/base.yaml)."""
    lo, hi = shape.resolutions
    return [
        cell("flowtrain", "lora", hi), cell("bare", "lora", hi),  # headline: MFU, framework overhead
        cell("flowtrain", "full", hi), cell("bare", "full", hi),  # headline: full fine-tune memory
        "tests",
        cell("flowtrain", "lora", hi, compiled=True),
        cell("flowtrain", "lora", hi, gc=False),
        *saver_cells(shape),
        cell("flowtrain", "lora", lo), cell("bare", "lora", lo),
        cell("flowtrain", "full", lo), cell("bare", "full", lo),
        cell("flowtrain", "full", hi, gc=False),
        cell("flowtrain", "full", hi, compiled=True),
        cell("flowtrain", "lora", lo, compiled=True),
    ]  # fmt: skip


def config_dict(shape: common.Shape, c: dict, pipeline: Path, cache: Path, out: Path, steps: int, backend: str) -> dict:
    """The flowtrain config of a cell: batch 1, bf16, LoRA rank 16 `all` + AdamW or full + adamw8bit, no saves."""
    lora = c["mode"] == "lora"
    return {
        "model": {"family": "flux2_klein", "pretrained": str(pipeline), "max_sequence_length": shape.text_len,
                  "dtype": "bfloat16"},
        # A synthetic cache: no encoder wrote it, so its encoder identity cannot match the pipeline's. The prefetch
        # thread is what `auto` picks on a GPU; set here so a --quick run on the CPU goes through it too.
        "dataset": {"cache_dir": str(cache), "allow_other_weights": True, "prefetch": True},
        "train": {"max_steps": steps + 1, "batch_size": 1, "learning_rate": 1e-4 if lora else 1e-5,
                  "mixed_precision": "bf16", "max_grad_norm": 1.0, "gradient_checkpointing": c["grad_ckpt"],
                  "compile": c["compile"], "compile_backend": backend, "log_every": 1, "seed": 0,
                  "blocks_to_swap": c.get("swap", 0)},
        "train_mode": c["mode"],
        "lora": {"rank": 16, "targets": "all"},
        "optimizer": {"name": "adamw" if lora else "adamw8bit", "weight_decay": 1e-4 if lora else 1e-2},
        "checkpoint": {"every_steps": None, "keep_last": 1},
        "tracking": {"report_to": ["jsonl"], "graphs": False, "log_weights": False},
        "output_dir": str(out),
    }  # fmt: skip


# ---- the child: one or more cells in this process --------------------------------------------------------------------
class Enough(Exception):
    """Raised by `StepTimer` at the batch fetch after the last measured step: ends the run there."""


class StepTimer:
    """`run.batches` wrapped: a mark (a CUDA event on a GPU, else perf_counter) each time the loop fetches a step's
    batch. With gradient_accumulation_steps 1 that is once per step, so mark i → i+1 is all of step i+1: data wait,
    forward, backward, clipping, the optimizer, the loop's host sync and its metrics row. After `total` steps, or
    once `max_s` seconds of steps past the warm-up have gone by, the next fetch raises `Enough`."""

    def __init__(self, batches, cuda: bool, total: int, warmup: int, max_s: float):
        self.batches, self.cuda, self.total, self.warmup, self.max_s = batches, cuda, total, warmup, max_s
        self.marks: list = []
        self.walls: list[float] = []

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        self.walls.append(time.perf_counter())
        done = len(self.walls) - 1
        if done >= self.total or (done > self.warmup and self.walls[-1] - self.walls[self.warmup] > self.max_s):
            raise Enough
        return next(self.batches)

    def step_s(self) -> list[float]:
        """Seconds of each completed step."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.walls, self.walls[1:], strict=False)]


def run_flowtrain(cfg_dict: dict, cuda: bool, total: int, warmup: int, max_s: float) -> tuple[dict, list[float]]:
    """Train with flowtrain's own run builder and loop until the timer has its steps; (facts, step seconds)."""
    import contextlib

    from flowtrain.config import FlowtrainConfig
    from flowtrain.track import read_metrics
    from flowtrain.train.control import StopSignals
    from flowtrain.train.loop import run_loop
    from flowtrain.train.run import build_run

    cfg = FlowtrainConfig.model_validate(cfg_dict)
    with StopSignals() as stop, contextlib.ExitStack() as cleanup:
        t0 = time.perf_counter()
        run = build_run(cfg, None, cleanup)
        setup_s = time.perf_counter() - t0
        model = run.accelerator.unwrap_model(run.model)
        timer = StepTimer(run.batches, cuda, total, warmup, max_s)
        run.batches = timer
        with contextlib.suppress(Enough):  # the timer's end of the run, after the measured steps
            run_loop(run, stop, progress=False)
        run.tracker.close("FINISHED")
        facts = {**_model_facts(model), "setup_s": setup_s}
        del run, model
    rows = read_metrics(Path(cfg.output_dir) / "logs" / "metrics.jsonl")
    facts["losses_finite"] = all(math.isfinite(r["loss"]) for r in rows) and bool(rows)
    facts["nonfinite_skipped"] = rows[-1].get("nonfinite_skipped", 0) if rows else None
    facts["metrics_cuda_max_alloc_gib"] = rows[-1].get("mem/cuda_max_alloc_gb") if rows else None
    return facts, timer.step_s()


def run_bare(cfg_dict: dict, c: dict, device: str, total: int) -> tuple[dict, list[float]]:
    import bare

    t0 = time.perf_counter()
    s = bare.setup(cfg_dict, mode=c["mode"], gradient_checkpointing=c["grad_ckpt"], device=device)
    setup_s = time.perf_counter() - t0
    if c["compile"]:
        from flowtrain.train.perf import compile_transformer

        compile_transformer(s.model, backend=cfg_dict["train"]["compile_backend"], regional=True)
    times = bare.run(s, total)
    facts = {**_model_facts(s.model), "setup_s": setup_s}
    del s
    return facts, times


def _model_facts(model) -> dict:
    flat = {"n_params": 0, "n_trainable": 0}
    for p in model.parameters():
        flat["n_params"] += p.numel()
        flat["n_trainable"] += p.numel() if p.requires_grad else 0
    flat["_flops_model"] = model  # read by the caller, never serialised
    return flat


def measure(c: dict, shape: common.Shape, args: argparse.Namespace, device: str) -> dict:
    """Run one cell in this process and return its row."""
    import gc

    import torch

    cuda = device == "cuda"
    res = c["resolution"]
    pipeline, cache = common.shaped_pipeline(shape, device), common.shaped_cache(shape, res)
    total = args.warmup + args.steps + (1 if c["compile"] else 0)  # compile: one more step left out
    warmup = args.warmup + (1 if c["compile"] else 0)
    out = Path(tempfile.mkdtemp(prefix=f"gpu-{c['id']}-", dir=common.bench_dir()))
    cfg = config_dict(shape, c, pipeline, cache, out, total, args.compile_backend)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if c["kind"] == "flowtrain":
        facts, times = run_flowtrain(cfg, cuda, total, warmup, args.cell_max_s)
    else:
        facts, times = run_bare(cfg, c, device, total)
    model = facts.pop("_flops_model")
    t_img, t_txt = (res // 16) ** 2, shape.text_len
    step_flops = flops.step_flops(model, 1, t_img, t_txt)
    del model
    timed = times[warmup:]
    if not timed:
        raise RuntimeError(f"no step was measured (cell_max_s={args.cell_max_s} too small?)")
    ms = common.median(timed) * 1e3
    peak, source = flops.peak_bf16_flops(torch.cuda.get_device_name() if cuda else None)
    row = {
        **c,
        "status": "ok",
        "steps_timed": len(timed),
        "warmup_steps": warmup,
        "ms_per_step": ms,
        "ms_min": min(timed) * 1e3,
        "ms_max": max(timed) * 1e3,
        "first_step_s": times[0],
        "tokens_per_step": t_img + t_txt,
        "tokens_per_s": (t_img + t_txt) / (ms / 1e3),
        "image_tokens_per_s": t_img / (ms / 1e3),
        "model_tflop_per_step": step_flops.total / 1e12,
        "achieved_tflops": step_flops.total / (ms / 1e3) / 1e12,
        "mfu": step_flops.total / (ms / 1e3) / peak if peak else None,
        "mfu_note": None if peak else source,
        "flops": step_flops.as_dict(),
        "rule_of_thumb_flops": flops.simple_flops(facts["n_params"], facts["n_trainable"], t_img + t_txt),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "wall_s": time.perf_counter() - t0,
        **facts,
    }
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    return row


def child(args: argparse.Namespace) -> None:
    """Run the cells given as JSON, printing one `RESULT {...}` line per cell; stop starting cells past deadline."""
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        torch.set_num_threads(1)  # see overhead.py: a second OpenMP thread is noise on a shared 2-core VM
    shape = common.TINY_SHAPE if args.quick else common.KLEIN4B
    for c in json.loads(args.child):
        if time.time() > args.deadline:
            row = {**c, "status": "skipped: time budget"}
        else:
            try:
                row = measure(c, shape, args, device)
            except Exception as e:  # noqa: BLE001  one failed cell (e.g. out of memory) is a result, not the end
                row = {**c, "status": f"failed: {type(e).__name__}: {str(e)[:400]}"}
                if device == "cuda":
                    torch.cuda.empty_cache()
        print("RESULT " + json.dumps(row), flush=True)


# ---- the parent: budget, subprocesses, tests, report -----------------------------------------------------------------
def run_cells(cells: list[dict], args: argparse.Namespace, deadline: float, timeout: float) -> list[dict]:
    """Run `cells` in one child process; rows for all of them (a crashed or killed child fails the rest)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(cells), "--deadline", str(deadline), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--cell-max-s", str(args.cell_max_s), "--compile-backend",
           args.compile_backend] + (["--quick"] if args.quick else [])  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1.0), check=False)
        stdout, err, why = proc.stdout, proc.stderr, f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, why = "", f"killed after {timeout:.0f} s: time budget"
    rows = {r["id"]: r for r in (json.loads(x[7:]) for x in stdout.splitlines() if x.startswith("RESULT "))}
    out = []
    for c in cells:
        if c["id"] in rows:
            out.append(rows[c["id"]])
        else:
            tail = " | ".join(err.strip().splitlines()[-3:])
            status = "skipped: time budget" if "time budget" in why else f"failed: {why}: {tail[-500:]}"
            out.append({**c, "status": status})
    return out


def cuda_test_files() -> list[str]:
    """Test files holding tests marked `cuda` (those that skip without a GPU)."""
    root = common.ROOT / "tests"
    marked = re.compile(r"^\s*@pytest\.mark\.cuda\s*$", re.M)
    return sorted(str(p) for p in root.rglob("test_*.py") if marked.search(p.read_text()))


def start_tests(tmp: Path) -> tuple[subprocess.Popen, list[str], Path, float]:
    """Start `pytest -m cuda` over the files holding `cuda`-marked tests, in a subprocess writing JUnit XML."""
    files, xml = cuda_test_files(), tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", f"--junitxml={xml}", *files]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.ROOT)
    return proc, files, xml, time.perf_counter()


def finish_tests(started: tuple[subprocess.Popen, list[str], Path, float], timeout: float) -> dict:
    """Wait for the tests (killed after `timeout` s); pass / fail / error / skip counts from the JUnit XML."""
    proc, files, xml, t0 = started
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"status": "skipped: time budget (killed)", "files": files}
    res = {"status": "ran", "files": files, "exit_code": proc.returncode, "duration_s": time.perf_counter() - t0,
           "summary": (stdout.strip().splitlines() or [""])[-1]}  # fmt: skip
    if not xml.exists():
        return {**res, "status": f"failed: no JUnit report: {stderr[-500:]}"}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**res, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"]}  # fmt: skip


def run_plan(
    todo: list, budget_s: float, estimate: dict, run_cell, run_tests, clock=time.monotonic
) -> tuple[list, dict]:
    """Run `todo` (cells, and "tests") in order within `budget_s` seconds. Before each item the time left is compared
    with `estimate` for its kind (eager / compile / tests), which becomes what that kind took here once one has run:
    what would not fit is recorded as "skipped: time budget", and the next, maybe cheaper, item is tried. `run_cell(c,
    left)` / `run_tests(left)` must stop by `left` seconds. Returns (rows, tests)."""
    start, estimate = clock(), dict(estimate)
    rows: list[dict] = []
    tests: dict = {"status": "not run"}
    for c in todo:
        left = budget_s - (clock() - start)
        key = "tests" if c == "tests" else ("compile" if c["compile"] else "eager")
        name = "tests" if c == "tests" else c["id"]
        if left < estimate[key]:
            if c == "tests":
                tests = {"status": "skipped: time budget"}
            else:
                rows.append({**c, "status": "skipped: time budget"})
            print(f"{name}: skipped (time budget: {left:.0f} s left, ~{estimate[key]:.0f} s needed)", flush=True)
            continue
        t0 = clock()
        if c == "tests":
            tests = run_tests(left)
            print(f"tests: {tests}", flush=True)
        else:
            rows.append(run_cell(c, left))
            r = rows[-1]
            print(f"{name}: {r['status']} {r.get('ms_per_step', float('nan')):.1f} ms/step, peak "
                  f"{r.get('peak_mem_gib') or 0:.1f} GiB ({clock() - t0:.0f} s)", flush=True)  # fmt: skip
        estimate[key] = max(estimate[key] * 0.5, clock() - t0)
    return rows, tests


def find(
    rows: list[dict], kind: str, mode: str, res: int, gc: bool | str = True, compiled: bool = False, swap: int = 0
) -> dict | None:
    for r in rows:
        if (r.get("status") == "ok" and r["kind"] == kind and r["mode"] == mode and r["resolution"] == res
                and r["grad_ckpt"] == gc and r["compile"] == compiled and r.get("swap", 0) == swap):  # fmt: skip
            return r
    return None


def ratios(rows: list[dict], shape: common.Shape) -> list[dict]:
    """Every ratio the cells allow: flowtrain / bare step time (framework overhead), eager / compiled and
    checkpointing on / off step time (speed-ups), checkpointing off / on peak memory."""
    out = []
    for mode in ("lora", "full"):
        for res in shape.resolutions:
            ft = find(rows, "flowtrain", mode, res)
            if ft is None:
                continue
            bare = find(rows, "bare", mode, res)
            if bare:
                out.append({"ratio": f"overhead {mode} {res}px", "what": "flowtrain ms / bare ms (eager, ckpt on)",
                            "value": ft["ms_per_step"] / bare["ms_per_step"]})  # fmt: skip
            comp = find(rows, "flowtrain", mode, res, compiled=True)
            if comp:
                out.append({"ratio": f"compile {mode} {res}px", "what": "eager ms / regional-compile ms (flowtrain)",
                            "value": ft["ms_per_step"] / comp["ms_per_step"]})  # fmt: skip
            nogc = find(rows, "flowtrain", mode, res, gc=False)
            if nogc:
                out.append({"ratio": f"ckpt off speed {mode} {res}px", "what": "ckpt-on ms / ckpt-off ms (flowtrain)",
                            "value": ft["ms_per_step"] / nogc["ms_per_step"]})  # fmt: skip
                if ft.get("peak_mem_gib") and nogc.get("peak_mem_gib"):
                    out.append({"ratio": f"ckpt off memory {mode} {res}px", "what": "ckpt-off / ckpt-on peak memory",
                                "value": nogc["peak_mem_gib"] / ft["peak_mem_gib"]})  # fmt: skip
            for c in saver_cells(shape) if mode == "lora" and res == shape.resolutions[1] else []:
                saver = find(rows, "flowtrain", mode, res, gc=c["grad_ckpt"], swap=c["swap"])
                if saver is None:
                    continue
                what = f"swap {c['swap']}" if c["swap"] else f"ckpt {c['grad_ckpt']}"
                out.append({"ratio": f"{what} speed {mode} {res}px", "what": f"{what} ms / ckpt-on ms (flowtrain)",
                            "value": saver["ms_per_step"] / ft["ms_per_step"]})  # fmt: skip
                if ft.get("peak_mem_gib") and saver.get("peak_mem_gib"):
                    out.append({"ratio": f"{what} memory {mode} {res}px", "what": f"{what} / ckpt-on peak memory",
                                "value": saver["peak_mem_gib"] / ft["peak_mem_gib"]})  # fmt: skip
    return out


def targets(rows: list[dict], shape: common.Shape, device_mem_gib: float | None, quick: bool = False) -> list[dict]:
    """The issue's targets, each met / not met / null (not measured, with why). A quick run's verdicts are about a
    tiny model on a CPU: they check the plumbing and say nothing about the targets."""
    hi = shape.resolutions[1]
    lora, bare = find(rows, "flowtrain", "lora", hi), find(rows, "bare", "lora", hi)
    comp, full = find(rows, "flowtrain", "lora", hi, compiled=True), find(rows, "flowtrain", "full", hi)

    def verdict(name: str, goal: str, value, met, note: str | None = None) -> dict:
        if quick:
            note = "; ".join(filter(None, ["quick: tiny model on a CPU, plumbing only, not the target", note]))
        return {"target": name, "goal": goal, "value": value, "met": met, "note": note}

    out = []
    # The best flowtrain LoRA cell at this resolution (eager / compiled, checkpointing on / off) is what a user can get.
    tried = [r for r in rows if r.get("status") == "ok" and r["kind"] == "flowtrain" and r["mode"] == "lora"
             and r["resolution"] == hi and r.get("mfu") is not None]  # fmt: skip
    best = max(tried, key=lambda r: r["mfu"], default=None)
    mfu = best["mfu"] if best else None
    if best:
        note = f"best: {best['id']}; baseline (eager, ckpt on): {lora['mfu']:.1%}" if lora else f"best: {best['id']}"
    else:
        note = (lora or {}).get("mfu_note", "the LoRA cell did not run")
    out.append(verdict(f"LoRA {hi}px MFU", f">= {TARGETS['lora_mfu']:.0%}", mfu,
                       None if mfu is None else mfu >= TARGETS["lora_mfu"], note))  # fmt: skip
    ov = lora["ms_per_step"] / bare["ms_per_step"] if lora and bare else None
    out.append(verdict("framework overhead (LoRA, flowtrain / bare)", f"<= {TARGETS['overhead']}", ov,
                       None if ov is None else ov <= TARGETS["overhead"]))  # fmt: skip
    sp = lora["ms_per_step"] / comp["ms_per_step"] if lora and comp else None
    out.append(verdict("train.compile speed-up (LoRA, eager / compiled)", f">= {TARGETS['compile_speedup']}", sp,
                       None if sp is None else sp >= TARGETS["compile_speedup"]))  # fmt: skip
    peak = full.get("peak_mem_gib") if full else None
    fits = None if peak is None or device_mem_gib is None else peak < device_mem_gib
    note = (f"peak {peak:.1f} GiB of {device_mem_gib:.1f} GiB" if fits is not None
            else "no CUDA memory figure (CPU run)" if full else "full fine-tune cell did not run")  # fmt: skip
    out.append(verdict(f"full fine-tune {hi}px, adamw8bit, fits the GPU", "peak < device memory", peak, fits, note))
    return out


def machine() -> dict:
    import torch

    info = {"host": common.machine(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_mem_gib=props.total_memory / GIB,
                    sm_count=props.multi_processor_count)  # fmt: skip
    return info


def print_table(result: dict) -> None:
    cols = ["id", "status", "ms_per_step", "tokens_per_s", "achieved_tflops", "mfu", "peak_mem_gib", "first_step_s"]
    rows = [{k: r.get(k) for k in cols} for r in result["cells"]]
    for r in rows:
        if r["status"] != "ok":
            r["status"] = r["status"][:60]
    common.print_rows(f"gpu readiness ({'quick, CPU' if result['quick'] else result['machine'].get('device')})", rows)
    common.print_rows("ratios (same run)", result["ratios"])
    common.print_rows("targets", [{**t, "met": {True: "met", False: "NOT met", None: "not measured"}[t["met"]]}
                                  for t in result["targets"]])  # fmt: skip
    t = result["tests"]
    print(f"\nCUDA-only tests: {t.get('passed')} passed, {t.get('failed')} failed, {t.get('errors')} errors, "
          f"{t.get('skipped')} skipped ({t.get('status')})")  # fmt: skip
    print(f"\nFLOPs: {result['flops_formula']}\npeak: {result['peak']}\n{MEMORY_SAVERS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default runs/bench/gpu[-quick].json)")
    p.add_argument("--quick", action="store_true", help="CPU plumbing check with a tiny Klein-shaped model")
    p.add_argument(
        "--budget-s", type=float, help="wall-clock budget for everything, weights included (default 400; quick 240)"
    )
    p.add_argument("--steps", type=int, help="measured steps per cell after warm-up (default 8; quick 3)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out first (compile: one more)")
    p.add_argument("--cell-max-s", type=float, default=25.0, help="stop a flowtrain cell's timed steps after this")
    p.add_argument("--compile-backend", help="train.compile backend (default inductor; quick: eager)")
    p.add_argument("--only", nargs="*", help="run only cells whose id contains one of these (and 'tests')")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or (3 if args.quick else 8)
    args.compile_backend = args.compile_backend or ("eager" if args.quick else "inductor")
    if args.child:
        child(args)
        return
    t_start = time.time()
    budget = args.budget_s or (240.0 if args.quick else 400.0)
    import torch

    if not args.quick and not torch.cuda.is_available():
        p.error("no CUDA device here: this benchmark needs a GPU (use --quick for the CPU plumbing check)")
    shape = common.TINY_SHAPE if args.quick else common.KLEIN4B
    out_path = args.out or common.bench_dir() / ("gpu-quick.json" if args.quick else "gpu.json")
    todo, build_error = plan(shape), None
    if not args.quick:  # built once, on the GPU (seconds; minutes on a CPU); the time counts against the budget
        print(f"building {shape.name} weights and caches under {common.bench_dir()} ...", flush=True)
        try:
            common.shaped_pipeline(shape, "cuda")
            for res in shape.resolutions:
                common.shaped_cache(shape, res)
        except Exception as e:  # noqa: BLE001  no cell can run; the CUDA-only tests still can
            build_error = f"{type(e).__name__}: {e}"
            print(f"building the model failed ({build_error}): only the CUDA-only tests run", flush=True)
            todo = ["tests"]
        torch.cuda.empty_cache()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    if args.quick:  # the plumbing: every kind of cell once (both sides, both modes, compile, checkpointing off,
        todo = todo[:7] + saver_cells(shape)[1:]  # a checkpointing level, block swap)
    if args.only:
        todo = [c for c in todo if c == "tests" or any(o in c["id"] for o in args.only)]
    estimate = dict(QUICK_ESTIMATE_S if args.quick else GPU_ESTIMATE_S)
    if args.quick:  # one process for every cell (imports once; tiny cells take a second each), tests alongside
        started = start_tests(tmp)
        cells = [c for c in todo if c != "tests"]
        left = budget - (time.time() - t_start)
        rows = run_cells(cells, args, deadline=time.time() + left - 30, timeout=left)
        tests = finish_tests(started, timeout=budget - (time.time() - t_start))
    else:
        rows, tests = run_plan(
            todo,
            budget - (time.time() - t_start),
            estimate,
            run_cell=lambda c, left: run_cells([c], args, deadline=math.inf, timeout=left)[0],
            run_tests=lambda left: finish_tests(start_tests(tmp), timeout=left),
        )
    info = machine()
    peak, source = flops.peak_bf16_flops(info.get("device"))
    result = {
        "benchmark": "gpu readiness",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "machine": info,
        "model": {
            "shape": shape.name,
            "transformer": shape.transformer,
            "text_len": shape.text_len,
            "resolutions": list(shape.resolutions),
            "batch_size": 1,
            "lora": "rank 16, preset all, AdamW",
            "full": "fp32 master weights, adamw8bit",
            "precision": "bf16 autocast",
        },  # fmt: skip
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "budget_s": budget,
            "cell_max_s": args.cell_max_s,
            "compile_backend": args.compile_backend,
        },  # fmt: skip
        "flops_formula": FLOPS_FORMULA,
        "peak": {"bf16_flops": peak, "source" if peak else "reason": source},
        "memory_savers": MEMORY_SAVERS,
        "cells": rows,
        "ratios": ratios(rows, shape),
        "tests": tests,
        "targets": targets(rows, shape, info.get("device_mem_gib"), args.quick),
        "elapsed_s": time.time() - t_start,
        "build_error": build_error,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\n{len([r for r in rows if r['status'] == 'ok'])}/{len(rows)} cells ok in {result['elapsed_s']:.0f} s; "
          f"JSON: {out_path}")  # fmt: skip
    # Exit 1 when something broke (a skipped cell is not broken: the budget is doing its job).
    broken = build_error or any(r["status"].startswith("failed") for r in rows)
    sys.exit(1 if broken or tests.get("failed") or tests.get("errors") else 0)


FLOPS_FORMULA = re.sub(
    r"\s+",
    " ",
    """model FLOPs per step (benchmarks/flops.py): per nn.Linear (LoRA A/B included) 2·rows·in·out forward, the same
    again for the input gradient (all but the entry layers) and for the weight gradient (trainable weights only), so
    full ≈ 6·N·tokens and LoRA ≈ 4·N·tokens + 6·N_lora·tokens; attention 4·S²·D forward + 8·S²·D backward per block
    (S tokens, D = heads × head_dim); recomputation by gradient checkpointing not counted""",
).strip()


if __name__ == "__main__":
    main()
