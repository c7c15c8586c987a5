"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from mpiml.config import OptimConfig, scaled_lr

__all__ = ["build_optimizer", "build_scheduler", "scaled_lr"]


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter],
                    world_size: int = 1) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW. `foreach` keeps the step to a few fused kernels."""
    lr = scaled_lr(cfg, world_size)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, foreach=True)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=True)


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> LambdaLR:
    """Warmup, then constant, cosine (to zero at `total_steps`) or step decay; stepped per step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(1, total_steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.schedule == "step":
            return cfg.step_gamma ** (step // cfg.step_every)
        return 1.0

    return LambdaLR(optimizer, factor)
