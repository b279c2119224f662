"""Model FLOPs of one FLUX.2 (Klein) training step, and the bf16 peak of the GPU it runs on: the two halves of MFU.

MFU = model FLOPs of a step / (step time × the device's dense bf16 peak). *Model* FLOPs count the matrix products the
step needs, once: gradient checkpointing's recomputed forward is not counted (it is hardware work, not model work), so
checkpointing lowers MFU by the time it costs. Elementwise work (norms, RoPE, activations, softmax) is not counted,
as usual for MFU.

The formula, per step of batch B, T_img image tokens, T_txt text tokens, S = T_img + T_txt, D = heads × head_dim:

    linear (every nn.Linear l, LoRA's A and B included; rows_l = the tokens it sees, see `rows_per_sample`):
        forward      2 · rows_l · in_l · out_l                         every l
        input grad   2 · rows_l · in_l · out_l                         every l but the entry ones (their input is data)
        weight grad  2 · rows_l · in_l · out_l                         only l whose weight is trainable
    attention (every block, joint over S tokens, no mask):
        forward      4 · B · S² · D       (Q·Kᵀ and P·V)
        backward     8 · B · S² · D       (dQ, dK, dV, dP: twice the forward)

So a full fine-tune is the familiar 6 · N · tokens (+ attention), while a LoRA step is ≈ 4 · N · tokens: the frozen
base needs its input gradients (to reach the adapters of the layers below) but no weight gradients; only the adapters
pay all three products. The input-grad rule is exact for a full fine-tune and for LoRA presets that adapt the entry
layers (the `all` preset: every block's input then depends on a trainable weight); with adapters in the blocks only, the
first block's frozen input products are over-counted (autograd skips them). tests/perf/test_gpu_bench.py checks this
formula against torch's FlopCounterMode on a small Klein-shaped model, LoRA and full.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Linear layers whose input is data (the packed latents, the text embeddings, the sinusoidal timestep embedding):
# autograd computes no gradient for their input.
ENTRY = ("x_embedder", "context_embedder", "time_guidance_embed.timestep_embedder.linear_1",
         "time_guidance_embed.guidance_embedder.linear_1")  # fmt: skip


def rows_per_sample(name: str, t_img: int, t_txt: int) -> int:
    """Tokens one sample sends through the Linear `name` of a `Flux2Transformer2DModel` (LoRA's `lora_A` / `lora_B`
    of a layer see that layer's tokens). Double blocks keep an image stream and a text stream; single blocks and the
    attention see the joint sequence; modulation and timestep layers see one vector per sample."""
    if name.startswith("single_transformer_blocks."):
        return t_img + t_txt
    if name.startswith("transformer_blocks."):
        txt = any(k in name for k in (".add_q_proj", ".add_k_proj", ".add_v_proj", ".to_add_out", ".ff_context."))
        return t_txt if txt else t_img
    if name.startswith(("x_embedder", "proj_out")):
        return t_img
    if name.startswith("context_embedder"):
        return t_txt
    return 1  # time_guidance_embed.*, *_modulation.linear, norm_out.linear


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step (model FLOPs, see the module docstring), split the way the formula is."""

    linear_forward: float
    linear_input_grad: float
    linear_weight_grad: float
    attention_forward: float
    attention_backward: float

    @property
    def total(self) -> float:
        return (self.linear_forward + self.linear_input_grad + self.linear_weight_grad + self.attention_forward
                + self.attention_backward)  # fmt: skip

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__, "total": self.total}


def step_flops(transformer: torch.nn.Module, batch: int, t_img: int, t_txt: int) -> StepFlops:
    """Model FLOPs of one training step of `transformer` (peft-wrapped for LoRA: trainable = `requires_grad`) on
    `batch` samples of `t_img` image and `t_txt` text tokens. Reads shapes only; runs nothing."""
    fwd = inp = wgt = 0.0
    for name, m in transformer.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        f = 2.0 * batch * rows_per_sample(name, t_img, t_txt) * m.in_features * m.out_features
        fwd += f
        if not name.startswith(ENTRY):
            inp += f
        if m.weight.requires_grad:
            wgt += f
    cfg = transformer.config
    blocks = cfg.num_layers + cfg.num_single_layers
    d, s = cfg.num_attention_heads * cfg.attention_head_dim, t_img + t_txt
    attn = 4.0 * batch * s * s * d * blocks
    return StepFlops(fwd, inp, wgt, attn, 2.0 * attn)


def simple_flops(n_params: int, n_trainable: int, tokens: int) -> float:
    """The rule of thumb the exact count refines: 6·N·tokens for a full fine-tune, 4·N·tokens + 2·N_trainable·tokens
    for LoRA (no attention term, every parameter seeing every token). For the printed comparison only."""
    return 4.0 * n_params * tokens + 2.0 * n_trainable * tokens


# ---- peak dense bf16 tensor-core FLOP/s ------------------------------------------------------------------------------
# (regex searched in torch.cuda.get_device_name(), TFLOP/s dense, source). Dense = without 2:4 sparsity: the datasheets
# quote sparse numbers ("with sparsity") at twice these. The first match wins, so variants come before their family.
_DC = "https://www.nvidia.com/en-us/data-center/"  # NVIDIA's product pages, each linking its datasheet
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    (r"\bGH200\b", 989.0, f"{_DC}grace-hopper-superchip/ datasheet: its H100/H200 GPU, BF16 1,979 TFLOPS sparse"),
    (r"\bH200 NVL\b", 835.0, f"{_DC}h200/ datasheet: H200 NVL, BF16 1,671 TFLOPS sparse"),
    (r"\bH200\b", 989.0, f"{_DC}h200/ datasheet: H200 SXM, BF16 1,979 TFLOPS sparse"),
    (r"\bH100 NVL\b", 835.0, f"{_DC}h100/ datasheet: H100 NVL, BF16 1,671 TFLOPS sparse"),
    (r"\bH100 PCIe\b", 756.0, f"{_DC}h100/ datasheet: H100 PCIe, BF16 1,513 TFLOPS sparse"),
    (r"\bH100 (SXM|80GB HBM3)", 989.0, f"{_DC}h100/ datasheet: H100 SXM, BF16 1,979 TFLOPS sparse ('H100 80GB HBM3' "
     "is the SXM part's device name)"),
    (r"\bB200\b", 2250.0, f"{_DC}hgx/ HGX B200 datasheet: BF16 4.5 PFLOPS sparse per GPU"),
    (r"\bA100\b", 312.0, f"{_DC}a100/ datasheet: BF16 312 TFLOPS dense (SXM and PCIe)"),
    (r"\bL40S\b", 362.05, f"{_DC}l40s/ datasheet: BF16 733 TFLOPS sparse"),
    (r"\bRTX 4090$", 165.2, "NVIDIA Ada GPU architecture whitepaper (GeForce RTX 4090): BF16 with FP32 accumulate "
     "165.2 TFLOPS dense, 330.3 sparse (torch accumulates bf16 matmuls in FP32)"),
    (r"\bL4$", 121.0, f"{_DC}l4/ datasheet: BF16 242 TFLOPS sparse"),
]  # fmt: skip


def peak_bf16_flops(device_name: str | None) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, source) for a device name from `torch.cuda.get_device_name()`; (None, reason) when
    the name is not in the table. Never guessed: an H100 whose name does not say which variant is unknown."""
    if not device_name:
        return None, "no CUDA device: MFU needs a GPU's bf16 peak (none is defined here for a CPU)"
    for pattern, tflops, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name.strip()):
            return tflops * 1e12, source
    return None, (f"{device_name!r} is not in benchmarks/flops.py PEAK_BF16_TFLOPS: add its dense bf16 peak "
                  "(from its datasheet) to get MFU")  # fmt: skip
