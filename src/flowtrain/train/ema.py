"""Exponential moving average of the trainable weights (`ema:` in the config).

    ema ← decay · ema + (1 - decay) · weights        every `update_every` optimizer steps from `start_step` on

Before `start_step` the EMA copies the weights (so it starts from the weights at that step, not from the init).
The copy lives next to the weights or on the CPU (`ema.device: cpu`, saving accelerator memory at the price of a
device→host copy per update). Checkpoints store it as `ema.safetensors` (by parameter name); validation samples
and the exported LoRA / transformer use it through `swapped_in`.

With DeepSpeed ZeRO-3 the caller gathers the trainable parameters around construction, `update` and `swapped_in`
(`engines.full_parameters` / `engines.whole_model`, collectives): every process then keeps the same whole EMA.
With FSDP the parameters are shards (DTensors), and so is the EMA: each process averages its own rows, and the
full EMA weights exist only when a checkpoint or export gathers them (see `train.engines.fsdp`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from flowtrain.config.schema import EmaConfig
from flowtrain.train.engines.fsdp import copy_into_shards, is_shard, local_parts

log = logging.getLogger(__name__)


class EMA:
    """EMA of `model`'s trainable parameters (by name; pass the unwrapped model)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        decay: float = 0.999,
        update_every: int = 1,
        start_step: int = 0,
        device: torch.device | str | None = None,
    ):
        self.decay, self.update_every, self.start_step = float(decay), int(update_every), int(start_step)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("ema: the model has no trainable parameters")
        self.device = torch.device(device) if device is not None else None
        with torch.no_grad():
            self.shadow = {n: p.detach().to(self.device or p.device, copy=True) for n, p in self.params.items()}

    @classmethod
    def from_config(cls, cfg: EmaConfig, model: torch.nn.Module) -> EMA:
        return cls(
            model,
            decay=cfg.decay,
            update_every=cfg.update_every,
            start_step=cfg.start_step,
            device="cpu" if cfg.device == "cpu" else None,
        )

    def _sources(self) -> list[torch.Tensor]:
        # Blocking copies: a non-blocking device→host copy could be read before it lands.
        return [p.detach().to(s.device) for p, s in zip(self.params.values(), self.shadow.values(), strict=True)]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step `step` (1-based: the number of optimizer steps done)."""
        # FSDP: the elementwise update runs on each process's own rows (DTensor has no foreach copy).
        shadow = local_parts(list(self.shadow.values()))
        if step <= self.start_step:
            torch._foreach_copy_(shadow, local_parts(self._sources()))
        elif (step - self.start_step) % self.update_every == 0:
            torch._foreach_lerp_(shadow, local_parts(self._sources()), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: EMA tensor} (what `ema.safetensors` holds)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or unexpected:
            raise ValueError(
                f"ema.safetensors does not fit this model: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}) tensors"
            )
        for n, s in self.shadow.items():
            s.copy_(state[n])

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module | None = None) -> Iterator[None]:
        """Within the block the model's trainable parameters hold the EMA weights; afterwards the trained ones
        again (also after an exception). No copy when the EMA lives on the weights' device. `model`: only to check
        that it is the model this EMA tracks."""
        if model is not None:
            tracked = {id(p) for p in self.params.values()}
            if not any(id(p) in tracked for p in model.parameters()):
                raise ValueError("ema.swapped_in: this is not the model the EMA was made for (pass the unwrapped one)")
        if any(is_shard(p) for p in self.params.values()):
            # FSDP all-gathers from the shards' own storage, so the EMA is copied in (and the weights back).
            params = list(self.params.values())
            trained = copy_into_shards(params, list(self.shadow.values()))
            try:
                yield
            finally:
                copy_into_shards(params, trained)
            return
        originals = {n: p.data for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.data = self.shadow[n].to(p.device, p.dtype)
            yield
        finally:
            for n, p in self.params.items():
                p.data = originals[n]

    def swap_factory(self, model: torch.nn.Module | None = None) -> Callable[[], contextlib.AbstractContextManager]:
        """A zero-argument context-manager factory, the form `Validator.maybe_run(weights=...)` takes."""
        return lambda: self.swapped_in(model)


def ema_for_run(cfg: Any, model: torch.nn.Module, restored: dict | None) -> EMA | None:
    """The run's EMA (None when ema.enabled is false), restored from the checkpoint being resumed if it has one."""
    if not cfg.ema.enabled:
        return None
    ema = EMA.from_config(cfg.ema, model)
    if restored is not None:
        if restored.get("ema") is not None:
            ema.load_state_dict(restored["ema"])
        else:
            log.warning("ema: the checkpoint has no EMA weights; the EMA starts from the resumed weights")
    n = sum(s.numel() for s in ema.shadow.values())
    log.info("EMA of %d tensors (%.3fM values), decay %g, on %s", len(ema.shadow), n / 1e6, ema.decay,
             ema.device or "the weights' device")  # fmt: skip
    return ema
