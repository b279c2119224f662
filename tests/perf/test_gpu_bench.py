"""benchmarks/gpu.py, the GPU readiness check: its `--quick` CPU run produces a complete JSON report, its FLOPs formula
equals what torch counts for a Klein-shaped step (LoRA and full), and MFU is never computed against a guessed peak."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "FLOWTRAIN_BENCH_DIR": str(tmp_path / "bench"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["quick"] and r["model"]["shape"] == "tiny-shape" and "6·N·tokens" in r["flops_formula"]
    cells = r["cells"]
    assert {(c["kind"], c["mode"]) for c in cells} == {("flowtrain", "lora"), ("bare", "lora"), ("flowtrain", "full"),
                                                       ("bare", "full")}  # fmt: skip
    assert any(c["compile"] for c in cells) and any(not c["grad_ckpt"] for c in cells)
    for c in cells:
        assert c["status"] == "ok", c
        for key in ("ms_per_step", "tokens_per_s", "model_tflop_per_step", "achieved_tflops", "peak_rss_gib"):
            assert math.isfinite(c[key]) and c[key] > 0, (c["id"], key, c[key])
        assert c["steps_timed"] == 3 and c["mfu"] is None and "no CUDA device" in c["mfu_note"]
        assert c["flops"]["linear_weight_grad"] < c["flops"]["linear_forward"] or c["mode"] == "full"
        if c["kind"] == "flowtrain":  # the loop really trained: finite losses, no skipped step
            assert c["losses_finite"] and c["nonfinite_skipped"] == 0
    lora = [c for c in cells if c["mode"] == "lora"]
    assert all(0 < c["n_trainable"] < c["n_params"] / 2 for c in lora)
    ratios = {x["ratio"]: x["value"] for x in r["ratios"]}
    assert {"overhead lora 128px", "overhead full 128px", "compile lora 128px", "ckpt off speed lora 128px"} <= set(
        ratios
    )
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert [t["met"] for t in r["targets"]][0] is None and len(r["targets"]) == 4  # MFU: no peak on a CPU
    assert isinstance(r["targets"][1]["met"], bool) and isinstance(r["targets"][2]["met"], bool)
    tests = r["tests"]  # the CUDA-only tests ran through pytest and skipped here
    assert tests["status"] == "ran" and tests["failed"] == 0 and tests["errors"] == 0 and tests["skipped"] >= 2
    assert "gpu readiness" in proc.stdout and "targets" in proc.stdout


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_flops_formula_matches_torchs_count(mode):
    """One training step of a small Klein-shaped transformer under FlopCounterMode (math attention, so Q·Kᵀ and P·V
    are counted matmuls; no checkpointing, so nothing is recomputed): the formula's total within 0.5%."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from flowtrain.models.flux2_klein.family import LORA_PRESETS
    from flowtrain.models.flux2_klein.latents import latent_ids, text_ids
    from flowtrain.train.trainable import lora_target_regex

    flops = _load("flops")
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                    timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                    guidance_embeds=False)  # fmt: skip
    if mode == "lora":
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=lora_target_regex("all", LORA_PRESETS)))
        cast_training_params(model, dtype=torch.float32)
    b, h, w, t_txt = 2, 6, 8, 20
    x, txt = torch.randn(b, h * w, 16), torch.randn(b, t_txt, 48)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(
            hidden_states=x,
            encoder_hidden_states=txt,
            timestep=torch.tensor([0.3, 0.6]),
            img_ids=latent_ids(b, h, w),
            txt_ids=text_ids(b, t_txt),
            guidance=None,
            return_dict=False,
        )[0]
        out.pow(2).mean().backward()  # fmt: skip
    counted = counter.get_total_flops()
    expected = flops.step_flops(model, b, h * w, t_txt)
    assert expected.linear_weight_grad < expected.linear_forward if mode == "lora" else True
    assert abs(expected.total - counted) / counted < 0.005, (expected.as_dict(), counted)


def test_peak_lookup_names_its_source_and_never_guesses():
    flops = _load("flops")
    assert flops.peak_bf16_flops("NVIDIA H200")[0] == 989e12
    assert flops.peak_bf16_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert flops.peak_bf16_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert flops.peak_bf16_flops("NVIDIA GH200 480GB")[0] == 989e12
    assert flops.peak_bf16_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert flops.peak_bf16_flops("NVIDIA L40S")[0] == pytest.approx(362.05e12)
    assert flops.peak_bf16_flops("NVIDIA L40")[0] is None  # not the L4, not the L40S
    assert flops.peak_bf16_flops("NVIDIA GeForce RTX 4090")[0] == pytest.approx(165.2e12)
    assert flops.peak_bf16_flops("NVIDIA GeForce RTX 4090 D")[0] is None
    peak, why = flops.peak_bf16_flops("NVIDIA H100")  # which variant? not assumed
    assert peak is None and "PEAK_BF16_TFLOPS" in why
    assert flops.peak_bf16_flops(None)[0] is None
    assert all("datasheet" in src or "whitepaper" in src for _, _, src in flops.PEAK_BF16_TFLOPS)


def test_budget_skips_what_would_not_fit_and_keeps_going():
    """The GPU run's scheduler: an item runs only when its kind's estimate fits the time left; the estimate becomes
    what the kind took; a skipped item is recorded and a cheaper one after it still runs."""
    gpu = _load("gpu")
    now = [0.0]
    took = {"eager": 40.0, "compile": 100.0}

    def run_cell(c, left):
        assert left > 0
        now[0] += took["compile" if c["compile"] else "eager"]
        return {**c, "status": "ok", "ms_per_step": 1.0}

    def run_tests(left):
        now[0] += 20.0
        return {"status": "ran", "passed": 2}

    todo = [gpu.cell("flowtrain", "lora", 1024), gpu.cell("bare", "lora", 1024), "tests",
            gpu.cell("flowtrain", "lora", 1024, compiled=True), gpu.cell("flowtrain", "lora", 512)]  # fmt: skip
    rows, tests = gpu.run_plan(todo, 130.0, {"eager": 30.0, "compile": 120.0, "tests": 15.0}, run_cell, run_tests,
                               clock=lambda: now[0])  # fmt: skip
    # 0 → 40 → 80 (eager now estimated 40 s) → tests 100 → compile needs 120, 30 left: skipped → eager 40 > 30: skipped
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped: time budget", "skipped: time budget"]
    assert tests == {"status": "ran", "passed": 2} and now[0] == 100.0


def test_ratios_and_targets_from_gpu_rows():
    gpu = _load("gpu")
    common = sys.modules["common"]  # imported by gpu.py from benchmarks/

    def row(kind, mode, res, ms, gc=True, compiled=False, swap=0, **kw):
        return {**gpu.cell(kind, mode, res, gc=gc, compiled=compiled, swap=swap), "status": "ok", "ms_per_step": ms,
                **kw}  # fmt: skip

    rows = [
        row("flowtrain", "lora", 1024, 300.0, swap=10, peak_mem_gib=15.0),  # first: find() must tell it apart
        row("flowtrain", "lora", 1024, 250.0, mfu=0.31, peak_mem_gib=20.0),
        row("bare", "lora", 1024, 240.0, mfu=0.325),
        row("flowtrain", "lora", 1024, 180.0, compiled=True, mfu=0.43),
        row("flowtrain", "lora", 1024, 200.0, gc=False, mfu=0.39, peak_mem_gib=50.0),
        row("flowtrain", "lora", 1024, 225.0, gc="single", peak_mem_gib=30.0),
        row("flowtrain", "full", 1024, 400.0, peak_mem_gib=61.5),
        {**gpu.cell("bare", "full", 1024), "status": "failed: OutOfMemoryError"},
    ]
    ratios = {r["ratio"]: r["value"] for r in gpu.ratios(rows, common.KLEIN4B)}
    assert ratios["overhead lora 1024px"] == pytest.approx(250 / 240)
    assert ratios["compile lora 1024px"] == pytest.approx(250 / 180)
    assert ratios["ckpt off speed lora 1024px"] == pytest.approx(250 / 200)
    assert ratios["ckpt off memory lora 1024px"] == pytest.approx(2.5)
    assert "overhead full 1024px" not in ratios  # its bare cell failed
    assert ratios["swap 10 memory lora 1024px"] == pytest.approx(15 / 20)
    assert ratios["swap 10 speed lora 1024px"] == pytest.approx(300 / 250)
    assert ratios["ckpt single memory lora 1024px"] == pytest.approx(30 / 20)
    assert "ckpt every:2 speed lora 1024px" not in ratios  # not measured
    mfu, overhead, comp, fits = gpu.targets(rows, common.KLEIN4B, device_mem_gib=139.8)
    assert mfu["met"] is True and mfu["value"] == 0.43 and "lora-1024-compile-gc-flowtrain" in mfu["note"]
    assert overhead["met"] is False and comp["met"] is True
    assert fits["met"] is True and fits["value"] == 61.5 and "61.5 GiB of 139.8 GiB" in fits["note"]
    none = gpu.targets([], common.KLEIN4B, device_mem_gib=139.8)
    assert [t["met"] for t in none] == [None] * 4


def test_cuda_only_tests_carry_the_cuda_marker():
    """gpu.py runs `pytest -m cuda` over the files that hold the marker: a test that skips without CUDA but is not
    marked would never run on the GPU either."""
    import re

    gpu = _load("gpu")
    tests = Path(__file__).resolve().parents[1]
    skipping = [
        p for p in tests.rglob("test_*.py") if re.search(r"skipif\(\s*not torch\.cuda\.is_available\(\)", p.read_text())
    ]
    assert skipping, "no CUDA-only test found (the fp16 GradScaler tests skip without CUDA)"
    for p in skipping:  # each skip decorator (direct, or through a name like `needs_cuda`) has a marker beside it
        text = p.read_text()
        names = re.findall(r"^(\w+) = pytest\.mark\.skipif\(\s*not torch\.cuda", text, flags=re.M)
        skips = len(re.findall(r"@pytest\.mark\.skipif\(\s*not torch\.cuda", text))
        skips += sum(text.count(f"@{n}\n") for n in names)
        assert text.count("@pytest.mark.cuda\n") >= skips >= 1, p
    assert {str(p) for p in skipping} <= set(gpu.cuda_test_files())
