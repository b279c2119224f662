"""Losses: callables `(LossContext) -> (scalar, log_dict)`, selected by `loss.name` or `pkg.mod:Class`."""

from flowtrain.losses.base import LOSSES, LossContext, build_loss

from flowtrain.losses import flow_matching  # noqa: F401  registers "flow_matching"  isort: skip

__all__ = ["LOSSES", "LossContext", "build_loss"]
