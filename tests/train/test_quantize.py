"""`model.quantize`: a quantized frozen base (QLoRA-style). On CPU: int8 (torchao weight-only) forward close to the
unquantized one, a LoRA trains on it, its file loads on the full-precision base, and what cannot run is refused."""

from __future__ import annotations

import math

import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.testing.data import TINY_SEQ, tiny_config_dict, tiny_model
from flowtrain.train.loop import train
from flowtrain.train.quantize import block_linears, check_quantize, quantize_base

# int8 weight-only rounds each weight row to 255 levels of its max |w| (relative error per weight ≤ 1/254). The
# documented tolerance (docs/training.md): ‖out_int8 - out‖ / ‖out‖ ≤ 1e-3 on the tiny transformer (measured
# 8e-5 in fp32; the residual stream and the unquantized embedders / final layer carry most of its output).
INT8_REL_TOL = 1e-3


def _predict(transformer: torch.nn.Module, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    from flowtrain.models import get_family

    g = torch.Generator().manual_seed(seed)
    x, txt = torch.randn(2, 64, 16, generator=g), torch.randn(2, TINY_SEQ, 96, generator=g)
    dtype = next(transformer.parameters()).dtype
    x, txt, sigma = (t.to(device, dtype) for t in (x, txt, torch.tensor([0.3, 0.8])))
    with torch.no_grad():
        return get_family("flux2_klein").predict(transformer, x, sigma, {"text_embeds": txt}, (8, 8))


def test_int8_forward_is_close_to_unquantized(tiny_pipeline_dir):
    from diffusers import Flux2Transformer2DModel

    def load() -> torch.nn.Module:
        return Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer").eval()

    ref, q = load(), load()
    n = quantize_base(q, "int8")
    assert n == len(block_linears(q)) > 0
    assert type(q.transformer_blocks[0].attn.to_q.weight).__name__ != "Parameter"  # really quantized
    assert type(q.x_embedder.weight).__name__ == "Parameter"  # outside the blocks: kept
    a, b = _predict(ref), _predict(q)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel <= INT8_REL_TOL, rel


def test_lora_trains_on_int8_base_and_loads_on_full_precision(tiny_pipeline_dir, tiny_cache, tmp_path):
    """Loss finite and lower after a few steps; the adapter is float32; the saved file loads on the unquantized
    base through `flowtrain sample`'s loader and changes its output (compared with the trained, quantized model
    within the int8 tolerance)."""
    from flowtrain.sample import load_sampling_pipeline

    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run")
    d["model"]["quantize"] = "int8"
    d["lora"] = {"rank": 8, "targets": "attention+ff"}
    # every step sees all 8 rows at σ ≈ 0.5 (a narrow logit-normal), so the loss falls with training, not with
    # the σ draw (measured: 1.63 → 1.19 over 8 steps)
    d["train"].update(max_steps=8, batch_size=8, learning_rate=3e-2)
    d["timesteps"] = {"logit_std": 0.05}
    d["dataset"]["shuffle"] = False
    run = train(FlowtrainConfig.model_validate(d), progress=False)
    losses = [run.losses[s] for s in sorted(run.losses)]
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.85 * losses[0], losses
    trainable = [p for p in run.transformer.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    pipe = load_sampling_pipeline(tiny_model(tiny_pipeline_dir, max_sequence_length=TINY_SEQ),
                                  lora=str(run.output_dir), device="cpu")  # fmt: skip
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight).__name__ == "Parameter"
    run.transformer.eval()
    trained, loaded = _predict(run.transformer), _predict(pipe.transformer)
    assert ((trained - loaded).norm() / trained.norm()).item() <= INT8_REL_TOL
    from diffusers import Flux2Transformer2DModel

    base = _predict(Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer"))
    assert (loaded - base).abs().max().item() > 1e-3  # the LoRA is applied


@pytest.mark.parametrize(
    ("kind", "train_mode", "lora_kind", "cuda", "match"),
    [
        ("float8", "lora", "lora", False, "float8 runs on a CUDA GPU only.*int8"),
        ("nf4", "lora", "lora", False, "nf4 runs on a CUDA GPU only.*bitsandbytes"),
        ("nf4", "lora", "loha", True, "nf4 with lora.kind=loha"),
        ("int8", "full", "lora", False, "needs train_mode: lora"),
    ],
)
def test_refusals(kind, train_mode, lora_kind, cuda, match):
    with pytest.raises(ValueError, match=match):
        check_quantize(kind, train_mode=train_mode, lora_kind=lora_kind, cuda=cuda)


def test_config_refuses_quantize_with_full_finetune(tiny_pipeline_dir, tiny_cache, tmp_path):
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "r")
    d["model"]["quantize"] = "int8"
    d["train_mode"] = "full"
    with pytest.raises(ValueError, match="model.quantize=int8 needs train_mode: lora"):
        FlowtrainConfig.model_validate(d)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="float8 / nf4 need CUDA")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["float8", "nf4"])
def test_cuda_quantized_forward_is_close(tiny_pipeline_dir, kind):
    """bf16 base on the GPU; float8 / nf4 are coarser than int8: relative error ≤ 0.1 (not yet run on a GPU)."""
    from diffusers import Flux2Transformer2DModel

    def load() -> torch.nn.Module:
        t = Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer", dtype=torch.bfloat16)
        return t.eval().cuda()

    ref, q = load(), load()
    quantize_base(q, kind)
    a, b = _predict(ref, device="cuda").float(), _predict(q, device="cuda").float()
    assert ((a - b).norm() / a.norm()).item() <= 0.1


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["float8", "nf4"])
def test_cuda_lora_trains_on_quantized_base(tiny_pipeline_dir, tiny_cache, tmp_path, kind):
    from flowtrain.testing.training import fresh_accelerator_state, train_config

    model = {"quantize": kind, "dtype": "bfloat16"}
    cfg = train_config(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", model=model,
                       train={"max_steps": 3, "mixed_precision": "bf16"})  # fmt: skip
    with fresh_accelerator_state():
        run = train(cfg, progress=False)
    assert all(math.isfinite(v) for v in run.losses.values())
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_lora_on_int8_base_resumes_exactly(tiny_pipeline_dir, tiny_cache, tmp_path):
    from flowtrain.testing.training import assert_resume_exact
    from flowtrain.testing.training import train_config as _cfg

    extra = {"model": {"quantize": "int8"}, "train": {"max_steps": 4}, "checkpoint": {"every_steps": 2}}
    a, b = (_cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / run, **extra) for run in "ab")
    assert_resume_exact(a, b, stop=2)
