"""Quantized frozen base (`model.quantize`): weight memory of the bench70m transformer's frozen base, the forward's
relative error against the unquantized base, and the LoRA step time (forward + backward + AdamW), per setting, as
ratios to `none` measured in one run (interleaved repetitions, medians).

The base is loaded in bf16 (the LoRA recipe's `model.dtype`) and the step runs under bf16 autocast, at bench70m's
256 image + 64 text tokens, batch 2, LoRA rank 16 on the attention preset, through the same `build_transformer` as
training. float8 / nf4 need CUDA and are measured only where it is available (`--device cuda`).

    .venv/bin/python benchmarks/quantize.py                  # none vs int8 on CPU, ~2 min on 2 cores
    .venv/bin/python benchmarks/quantize.py --device cuda --kinds none int8 float8 nf4 --reps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def base_bytes(model) -> int:
    """Bytes the frozen (non-trainable) weights occupy: a quantized tensor subclass counts its inner tensors (int8
    data + scales), not its logical shape."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        t = p.data
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


def build(fx: common.Fixture, kind: str, device: str):
    """The LoRA transformer of the bench70m config with `model.quantize: kind`, on `device`, and its AdamW."""
    import torch

    from flowtrain.config import FlowtrainConfig
    from flowtrain.models import get_family
    from flowtrain.train.trainable import build_transformer

    cfg_dict = common.train_config(fx, common.bench_dir() / "quantize")
    cfg_dict["model"]["quantize"] = kind
    cfg = FlowtrainConfig.model_validate(cfg_dict)
    transformer, _ = build_transformer(cfg, get_family("flux2_klein"))
    transformer.to(device)
    params = [p for p in transformer.parameters() if p.requires_grad]
    return transformer, torch.optim.AdamW(params, lr=1e-4)


def inputs(device: str, seed: int = 0):
    import torch

    s = common.BENCH70M
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 256, 4 * s["latent_channels"], generator=g)
    txt = torch.randn(2, s["seq"], 3 * s["te_hidden"], generator=g)
    return x.to(device), txt.to(device), torch.tensor([0.3, 0.7], device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["none", "int8"], choices=["none", "int8", "float8", "nf4"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per setting (after one warm-up step)")
    args = ap.parse_args()
    import torch

    from flowtrain.models import get_family

    family = get_family("flux2_klein")
    fx = common.fixture("bench70m")
    x, txt, sigma = inputs(args.device)
    models = {}
    for k in args.kinds:
        print(f"building the LoRA transformer with model.quantize={k}", flush=True)
        models[k] = build(fx, k, args.device)

    def forward(model):
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            return family.predict(model, x, sigma, {"text_embeds": txt}, (16, 16)).float()

    with torch.no_grad():
        ref = forward(models["none"][0]) if "none" in models else None
        errors = {k: (((forward(m) - ref).norm() / ref.norm()).item() if ref is not None else None)
                  for k, (m, _) in models.items()}  # fmt: skip

    def step(kind: str) -> float:
        model, opt = models[kind]
        t0 = time.perf_counter()
        loss = forward(model).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for k in args.kinds:
        print(f"warm-up step, model.quantize={k}: {step(k):.2f} s", flush=True)
    times = common.interleave({k: (lambda k=k: step(k)) for k in args.kinds}, args.reps)
    base_ms = common.median(times[args.kinds[0]]) * 1e3
    base_mb = base_bytes(models[args.kinds[0]][0]) / 2**20
    rows = []
    for k in args.kinds:
        mb, ms = base_bytes(models[k][0]) / 2**20, common.median(times[k]) * 1e3
        rows.append({"quantize": k, "frozen_base_MiB": round(mb, 1), "vs_first": round(mb / base_mb, 3),
                     "rel_err_vs_none": None if errors[k] is None else f"{errors[k]:.2e}",
                     "step_ms": round(ms, 1), "step_vs_first": round(ms / base_ms, 2)})  # fmt: skip
    common.report("quantize", rows, {"device": args.device, "reps": args.reps})


if __name__ == "__main__":
    main()
