"""One flow-matching micro-step: cached batch → x0, σ, ε → prediction → loss. No optimizer, no accelerate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowtrain.config.schema import FlowtrainConfig
from flowtrain.flow import interpolate, resolution_shift, sample_sigmas
from flowtrain.losses import LossContext


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the generator for one micro-batch: noise, σ and dropout depend only on (seed, step, micro, rank),
    so a resumed run draws exactly what an uninterrupted one would."""
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 97 + rank) % (2**63 - 1)


@dataclass
class StepInputs:
    """The tensors of one micro-batch, on the training device. Tokens (B, N, C); sigma (B,); text (B, L, D)."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    text_embeds: torch.Tensor
    grid: tuple[int, int]
    mask: torch.Tensor | None = None  # (B,) per-sample or (B, N) per-token loss weights (cache column loss_mask)
    is_prior: torch.Tensor | None = None  # (B,) bool: class rows of prior preservation (dataset.class_cache_dir)


def sigma_shift(cfg: FlowtrainConfig, image_seq_len: int) -> float:
    """The σ shift of this batch: timesteps.shift, or FLUX.2's resolution-dependent one (flow.timesteps)."""
    t = cfg.timesteps
    return resolution_shift(image_seq_len, t.reference_steps) if t.shift_mode == "resolution" else t.shift


def batch_mask(batch: dict[str, torch.Tensor], num_tokens: int) -> torch.Tensor | None:
    """The optional `loss_mask` of a batch as (B,) or (B, N): a (B, h, w) token-grid mask is flattened row-major,
    the order `pack` puts tokens in."""
    mask = batch.get("loss_mask")
    if mask is None:
        return None
    mask = mask.float()
    if mask.ndim > 2:
        mask = mask.flatten(1)
    if mask.ndim == 2 and mask.shape[1] == 1 and num_tokens != 1:  # a per-sample weight column
        mask = mask[:, 0]
    if mask.ndim == 2 and mask.shape[1] != num_tokens:
        raise ValueError(
            f"loss_mask rows have {mask.shape[1]} values, the latents {num_tokens} tokens: the cache column loss_mask "
            "must be a scalar, an (N,) vector or an (h, w) grid at token resolution"
        )
    return mask


def make_inputs(
    batch: dict[str, torch.Tensor],
    cfg: FlowtrainConfig,
    adapter: Any,
    latent_stats: tuple[torch.Tensor, torch.Tensor],
    empty_embeds: torch.Tensor | None,
    generator: torch.Generator,
    device: torch.device,
) -> StepInputs:
    """Draw everything random for a micro-batch from `generator` (CPU), in a fixed order, then move to device."""
    moments = batch["latent_moments"]
    sample_gen = generator if cfg.dataset.latent_sampling == "sample" else None
    x0, h, w = adapter.training_latents(moments, *latent_stats, generator=sample_gen)
    b = x0.shape[0]
    t = cfg.timesteps
    shift = sigma_shift(cfg, x0.shape[1])
    sigma = sample_sigmas(
        b, generator, t.scheme, logit_mean=t.logit_mean, logit_std=t.logit_std, mode_scale=t.mode_scale, shift=shift
    )
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    text = batch["text_embeds"]
    if cfg.train.caption_dropout > 0:
        if empty_embeds is None:
            raise ValueError("train.caption_dropout > 0 needs the cache's empty-prompt embedding")
        drop = torch.rand(b, generator=generator) < cfg.train.caption_dropout
        text = torch.where(drop.view(b, 1, 1), empty_embeds.unsqueeze(0).to(text), text)
    # New random draws go here, after the existing ones: golden losses and exact resume depend on that order.
    mask, is_prior = batch_mask(batch, x0.shape[1]), batch.get("is_prior")
    return StepInputs(
        x0=x0.to(device, non_blocking=True),
        noise=noise.to(device, non_blocking=True),
        sigma=sigma.to(device, non_blocking=True),
        text_embeds=text.to(device, non_blocking=True).float(),  # cached in bf16 for Klein: cast after the copy
        grid=(h, w),
        mask=None if mask is None else mask.to(device, non_blocking=True),
        is_prior=None if is_prior is None else is_prior.to(device, non_blocking=True),
    )


def step_loss(
    model: torch.nn.Module, adapter: Any, inputs: StepInputs, loss_fn: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward the transformer at x_σ and score it with `loss_fn`. Returns (scalar loss, logs)."""
    x_t = interpolate(inputs.x0, inputs.noise, inputs.sigma)
    pred = adapter.predict(model, x_t, inputs.sigma, inputs.text_embeds, inputs.grid)
    extra: dict[str, Any] = {"text_embeds": inputs.text_embeds, "grid": inputs.grid}
    if inputs.is_prior is not None:
        extra["is_prior"] = inputs.is_prior
    ctx = LossContext(
        pred=pred, x0=inputs.x0, noise=inputs.noise, sigma=inputs.sigma, x_t=x_t, mask=inputs.mask, extra=extra
    )
    return loss_fn(ctx)
