"""One flow-matching micro-step: cached batch → x0, σ, ε → prediction → loss. No optimizer, no accelerate.

The model family turns the batch into tokens and conditioning and runs the transformer; this module draws the
randomness and applies the one flow-matching convention (`flowtrain.flow`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flowtrain.config.schema import FlowtrainConfig
from flowtrain.flow import interpolate, restrict_sigmas, sample_sigmas
from flowtrain.losses import LossContext
from flowtrain.models import ModelFamily, RestrictsTimesteps


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the generator for one micro-batch: noise, σ and dropout depend only on (seed, step, micro, rank),
    so a resumed run draws exactly what an uninterrupted one would. `rank` is 0 on every process with
    `train.random_draws: global` (see `make_inputs`), the process's rank with `per_process`."""
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 97 + rank) % (2**63 - 1)


@dataclass(frozen=True)
class BatchPart:
    """Where one process's rows sit in the global micro-batch: every process's rows, instance rows in rank order,
    then (DreamBooth) class rows in rank order, which is the batch one process with the global batch size reads.

    rows: (B,) int64 positions of this process's batch rows in it; total: its number of rows.
    """

    rows: torch.Tensor
    total: int


def batch_part(batch: Mapping[str, torch.Tensor], rank: int, world: int) -> BatchPart | None:
    """This process's `BatchPart` (None for one process: its batch is the global one). Every process holds as many
    instance rows, and as many class rows, as the others (the sampler gives each the same batch size)."""
    if world == 1:
        return None
    n = len(batch["index"])  # instance rows; merged class rows follow them (data.prior)
    c = len(batch["is_prior"]) - n if "is_prior" in batch else 0
    rows = torch.cat([rank * n + torch.arange(n), world * n + rank * c + torch.arange(c)])
    return BatchPart(rows=rows, total=world * (n + c))


def draws_for(mode: str, batch: Mapping[str, torch.Tensor], rank: int, world: int) -> tuple[int, BatchPart | None]:
    """`train.random_draws` → (the rank that keys this process's `step_seed`, its `BatchPart` or None)."""
    if mode == "per_process":
        return rank, None
    return 0, batch_part(batch, rank, world)


class _GlobalRows(Mapping):
    """A batch seen as the global micro-batch: a column read from it has `part.total` rows, this process's rows at
    `part.rows` and zeros elsewhere. Columns are filled only when read, so only the latents a family samples from
    are widened (not the text embeddings)."""

    def __init__(self, batch: Mapping[str, torch.Tensor], part: BatchPart):
        self._batch, self._part = batch, part

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._batch[key]
        full = t.new_zeros((self._part.total, *t.shape[1:]))
        full[self._part.rows] = t
        return full

    def __iter__(self) -> Iterator[str]:
        return iter(self._batch)

    def __len__(self) -> int:
        return len(self._batch)


@dataclass
class StepInputs:
    """The tensors of one micro-batch, on the training device. Tokens (B, N, C); sigma (B,); `cond` the family's
    conditioning tensors; `shape` the token grid (h, w) or (f, h, w)."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    cond: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    mask: torch.Tensor | None = None  # (B,) per-sample or (B, N) per-token loss weights (cache column loss_mask)
    is_prior: torch.Tensor | None = None  # (B,) bool: class rows of prior preservation (dataset.class_cache_dir)


def sigma_shift(cfg: FlowtrainConfig, family: ModelFamily, num_tokens: int) -> float:
    """The σ shift of this batch: timesteps.shift, or the family's resolution-dependent one."""
    t = cfg.timesteps
    return family.resolution_shift(cfg.model, num_tokens) if t.shift_mode == "resolution" else t.shift


def batch_mask(batch: Mapping[str, torch.Tensor], num_tokens: int) -> torch.Tensor | None:
    """The optional `loss_mask` of a batch as (B,) or (B, N): a (B, h, w) token-grid mask is flattened row-major,
    the order tokens are packed in."""
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


def to_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy to the device in the storage dtype (half the bytes of float32 for bf16 caches), then cast floating
    tensors to float32 there; masks keep their dtype."""
    out = {}
    for k, t in tensors.items():
        t = t.to(device, non_blocking=True)
        out[k] = t.float() if t.is_floating_point() else t
    return out


_RESTRICTS: dict[type, bool] = {}


def _restricts_timesteps(family: ModelFamily) -> bool:
    """isinstance(family, RestrictsTimesteps), checked once per family class: a runtime Protocol check inspects the
    members each time (~10 µs), and this runs every micro-batch."""
    known = _RESTRICTS.get(type(family))
    if known is None:
        known = _RESTRICTS[type(family)] = isinstance(family, RestrictsTimesteps)
    return known


def make_inputs(
    batch: Mapping[str, torch.Tensor],
    cfg: FlowtrainConfig,
    family: ModelFamily,
    norm: Mapping[str, torch.Tensor],
    empty: dict[str, torch.Tensor] | None,
    generator: torch.Generator,
    device: torch.device,
    part: BatchPart | None = None,
) -> StepInputs:
    """Draw everything random for a micro-batch from `generator` (CPU), in a fixed order, then move to device.

    norm: the cache's latent statistics as tensors; empty: the empty prompt's conditioning (caption dropout).
    part: with several processes and `train.random_draws: global`, where this process's rows sit in the global
    micro-batch: every draw is made for the whole global batch and this process keeps its rows, so each row gets
    the numbers one process with the global batch would give it (same `generator` seed on every process).
    """
    sample_gen = generator if cfg.dataset.latent_sampling == "sample" else None
    if part is not None and sample_gen is not None:  # the posterior draw is sized by the batch: draw the global one
        x0, shape = family.training_latents(_GlobalRows(batch, part), norm, sample_gen)
        x0 = x0[part.rows]
    else:
        x0, shape = family.training_latents(batch, norm, sample_gen)
    b = x0.shape[0] if part is None else part.total  # rows drawn for: this batch, or the global one

    def mine(t: torch.Tensor) -> torch.Tensor:
        return t if part is None else t[part.rows]

    t = cfg.timesteps
    sigma = sample_sigmas(
        b,
        generator,
        t.scheme,
        logit_mean=t.logit_mean,
        logit_std=t.logit_std,
        mode_scale=t.mode_scale,
        shift=sigma_shift(cfg, family, x0.shape[1]),
    )
    if _restricts_timesteps(family) and (bounds := family.sigma_range(cfg.model)) is not None:
        sigma = restrict_sigmas(sigma, *bounds)  # a map of the same draws: the random stream is unchanged
    sigma = mine(sigma)
    noise = mine(torch.randn((b, *x0.shape[1:]), generator=generator, dtype=x0.dtype))
    cond = family.conditioning(batch, cfg.model)
    if cfg.train.caption_dropout > 0:
        if empty is None:
            raise ValueError("train.caption_dropout > 0 needs the cache's empty-prompt conditioning")
        drop = mine(torch.rand(b, generator=generator) < cfg.train.caption_dropout)
        cond = family.drop_captions(cond, empty, drop)
    # New random draws go here, after the existing ones: golden losses and exact resume depend on that order.
    mask, is_prior = batch_mask(batch, x0.shape[1]), batch.get("is_prior")
    return StepInputs(
        x0=x0.to(device, non_blocking=True),
        noise=noise.to(device, non_blocking=True),
        sigma=sigma.to(device, non_blocking=True),
        cond=to_device(cond, device),
        shape=shape,
        mask=None if mask is None else mask.to(device, non_blocking=True),
        is_prior=None if is_prior is None else is_prior.to(device, non_blocking=True),
    )


def step_loss(
    model: torch.nn.Module, family: ModelFamily, inputs: StepInputs, loss_fn: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward the transformer at x_σ and score it with `loss_fn`. Returns (scalar loss, logs)."""
    x_t = interpolate(inputs.x0, inputs.noise, inputs.sigma)
    pred = family.predict(model, x_t, inputs.sigma, inputs.cond, inputs.shape)
    extra: dict[str, Any] = {"cond": inputs.cond, "shape": inputs.shape}
    if inputs.is_prior is not None:
        extra["is_prior"] = inputs.is_prior
    ctx = LossContext(
        pred=pred, x0=inputs.x0, noise=inputs.noise, sigma=inputs.sigma, x_t=x_t, mask=inputs.mask, extra=extra
    )
    return loss_fn(ctx)
