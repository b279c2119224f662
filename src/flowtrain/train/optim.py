"""Optimizer and LR schedule from config."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from flowtrain.config.schema import LrSchedulerConfig, OptimizerConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """torch optimizers; `foreach` implementations (fast multi-tensor) where torch offers them."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check train_mode and lora.targets")
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, foreach=True
        )
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, foreach=True
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LrSchedulerConfig, max_steps: int):
    """diffusers' `get_scheduler` (LambdaLR-based: its state_dict round-trips through checkpoints)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)
