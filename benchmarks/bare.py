"""The hand-written baseline: a minimal PyTorch flow-matching loop with nothing of flowtrain in the timed part.

Same transformer (loaded from the same pipeline folder), same peft LoRA (rank, alpha, targets, init), same
AdamW (foreach / fused exactly as flowtrain picks it), same clipping, same batch size, same bf16 autocast, same
logit-normal σ and Gaussian noise drawn from a CPU generator. It is deliberately the *strictest* baseline: the
whole cache is read into memory and turned into packed, normalised tokens before timing starts, position ids are
built once, and nothing is logged or synchronised per step.

On a GPU (`device="cuda"`) the model, the batches and the ids live on the device before timing starts, σ and noise are
drawn on the CPU generator and copied over (as flowtrain draws them), and step times come from CUDA events. The
optimizer follows the config's `optimizer.name` (`adamw`, or bitsandbytes' `adamw8bit` as `flowtrain.train.optim`
builds it), with the config's betas / eps / weight decay when it has an `optimizer` section.
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
    device: torch.device = torch.device("cpu")


def setup(
    cfg: dict, *, mode: str = "lora", gradient_checkpointing: bool = False, device: str | torch.device = "cpu"
) -> BareSetup:
    """Build everything the loop needs from a flowtrain config dict (only its numbers are read), on `device`."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from flowtrain.data.cache import CacheDataset
    from flowtrain.models.flux2_klein.family import LORA_PRESETS
    from flowtrain.models.flux2_klein.latents import latent_ids, text_ids, training_latents

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
    device = torch.device(device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)

    ds = CacheDataset(cfg["dataset"]["cache_dir"])
    norm = ds.latent_norm  # the VAE BatchNorm statistics precompute recorded, as float32 tensors
    mean, std = norm["bn_mean"], norm["bn_std"]
    b = cfg["train"]["batch_size"]
    batches = []
    for start in range(0, len(ds) - b + 1, b):
        rows = [ds[i] for i in range(start, start + b)]
        moments = torch.stack([r["latent_moments"] for r in rows]).float()
        x0, h, w = training_latents(moments, mean, std)
        text = torch.stack([r["text_embeds"] for r in rows]).float()
        batches.append((x0.contiguous().to(device), text.to(device)))
    text_len = batches[0][1].shape[1]
    return BareSetup(
        model, params, optimizer, batches, latent_ids(b, h, w).to(device), text_ids(b, text_len).to(device),
        autocast=cfg["train"]["mixed_precision"] == "bf16", device=device,
    )  # fmt: skip


def _optimizer(params: list[torch.nn.Parameter], cfg: dict) -> torch.optim.Optimizer:
    """AdamW (fused / foreach as flowtrain picks it) or bitsandbytes' 8-bit AdamW, per `optimizer.name`."""
    from flowtrain.train.perf import optimizer_kwargs

    opt = cfg.get("optimizer") or {}
    lr = cfg["train"]["learning_rate"]
    adam = {"weight_decay": opt.get("weight_decay", 1e-4)}
    if "betas" in opt:
        adam["betas"] = tuple(opt["betas"])
    if opt.get("name", "adamw") == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, **adam)
    return torch.optim.AdamW(params, lr=lr, **adam, **optimizer_kwargs(params))


def run(s: BareSetup, steps: int, *, seed: int = 0, max_grad_norm: float = 1.0) -> list[float]:
    """`steps` optimizer steps; returns the time of each in seconds: wall time on CPU (no device sync needed),
    CUDA events on a GPU (an event at the start of every step and one after the last)."""
    if s.device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        _steps(s, steps, seed, max_grad_norm, after_step=lambda i: events[i + 1].record())
        events[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:], strict=False)]
    times, t_last = [], time.perf_counter()

    def tick(_: int) -> None:
        nonlocal t_last
        now = time.perf_counter()
        times.append(now - t_last)
        t_last = now

    _steps(s, steps, seed, max_grad_norm, after_step=tick)
    return times


def _steps(s: BareSetup, steps: int, seed: int, max_grad_norm: float, after_step) -> None:
    gen = torch.Generator().manual_seed(seed)
    dev = s.device
    for step in range(steps):
        x0, text = s.batches[step % len(s.batches)]
        b = x0.shape[0]
        sigma = torch.sigmoid(torch.randn(b, generator=gen)).to(dev, non_blocking=True)
        noise = torch.randn(x0.shape, generator=gen).to(dev, non_blocking=True)
        x_t = (1 - sigma.view(b, 1, 1)) * x0 + sigma.view(b, 1, 1) * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.autocast):
            pred = s.model(
                hidden_states=x_t, encoder_hidden_states=text, timestep=sigma, img_ids=s.img_ids,
                txt_ids=s.txt_ids, guidance=None, return_dict=False,
            )[0]  # fmt: skip
        loss = F.mse_loss(pred.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.params, max_grad_norm)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        after_step(step)
