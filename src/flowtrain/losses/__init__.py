"""Losses: callables `(LossContext) -> (scalar, log_dict)`, selected by `loss.name` or `pkg.mod:Class`."""

from flowtrain.losses.base import LOSSES, LossContext, build_loss, loss_from_config

from flowtrain.losses import flow_matching, prior, distill  # noqa: F401  registers the built-ins  isort: skip

__all__ = ["LOSSES", "LossContext", "build_loss", "loss_from_config"]
