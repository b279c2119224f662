"""The hand-written baseline: a minimal PyTorch flow-matching loop with nothing of flowtrain in the timed part.

Same transformer (loaded from the same pipeline folder), same peft LoRA (rank, alpha, targets, init), same
AdamW (foreach / fused exactly as flowtrain picks it), same clipping, same batch size, same bf16 autocast, same
logit-normal σ and Gaussian noise drawn from a CPU generator. It is deliberately the *strictest* baseline: the
whole cache is read into memory and turned into packed, normalised tokens before timing starts, position ids are
built once, and nothing is logged or synchronised per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BareSetup:
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (x0 (B, N, C), text (B, L, D)) in memory
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    autocast: bool


def setup(cfg: dict, *, mode: str = "lora", gradient_checkpointing: bool = False) -> BareSetup:
    """Build everything the loop needs from a flowtrain config dict (only its numbers are read)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from flowtrain.data.cache import CacheDataset
    from flowtrain.models.flux2_klein.family import LORA_PRESETS
    from flowtrain.models.flux2_klein.latents import latent_ids, text_ids, training_latents
    from flowtrain.train.perf import optimizer_kwargs

    torch.manual_seed(cfg["train"].get("seed", 0))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["model"]["dtype"]]
    model = Flux2Transformer2DModel.from_pretrained(
        cfg["model"]["pretrained"], subfolder="transformer", dtype=torch.float32 if mode == "full" else dtype
    )
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if mode == "lora":
        model.requires_grad_(False)
        targets = "|".join(f"(?:.*\\.)?(?:{p})" for p in LORA_PRESETS[cfg["lora"]["targets"]])
        rank = cfg["lora"]["rank"]
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
        cast_training_params(model, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg["train"]["learning_rate"], weight_decay=1e-4, **optimizer_kwargs(params)
    )

    ds = CacheDataset(cfg["dataset"]["cache_dir"])
    norm = ds.latent_norm  # the VAE BatchNorm statistics precompute recorded, as float32 tensors
    mean, std = norm["bn_mean"], norm["bn_std"]
    b = cfg["train"]["batch_size"]
    batches = []
    for start in range(0, len(ds) - b + 1, b):
        rows = [ds[i] for i in range(start, start + b)]
        moments = torch.stack([r["latent_moments"] for r in rows]).float()
        x0, h, w = training_latents(moments, mean, std)
        batches.append((x0.contiguous(), torch.stack([r["text_embeds"] for r in rows]).float()))
    text_len = batches[0][1].shape[1]
    return BareSetup(
        model, params, optimizer, batches, latent_ids(b, h, w), text_ids(b, text_len),
        autocast=cfg["train"]["mixed_precision"] == "bf16",
    )  # fmt: skip


def run(s: BareSetup, steps: int, *, seed: int = 0, max_grad_norm: float = 1.0) -> list[float]:
    """`steps` optimizer steps; returns the wall time of each (CPU: no device sync needed)."""
    gen = torch.Generator().manual_seed(seed)
    times, t_last = [], time.perf_counter()
    for step in range(steps):
        x0, text = s.batches[step % len(s.batches)]
        b = x0.shape[0]
        sigma = torch.sigmoid(torch.randn(b, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        x_t = (1 - sigma.view(b, 1, 1)) * x0 + sigma.view(b, 1, 1) * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.autocast):
            pred = s.model(
                hidden_states=x_t, encoder_hidden_states=text, timestep=sigma, img_ids=s.img_ids,
                txt_ids=s.txt_ids, guidance=None, return_dict=False,
            )[0]  # fmt: skip
        loss = F.mse_loss(pred.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.params, max_grad_norm)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - t_last)
        t_last = now
    return times
