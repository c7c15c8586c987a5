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


class PartStepper:
    """Steps an optimizer over one part of its parameters at a time (a gradient bucket).

    Why: the gradient sync finishes bucket by bucket, and a bucket whose average has arrived
    can be updated while later buckets are still on the wire, so the optimizer waits only for
    what is in flight. Stepping a part means calling `optimizer.step()` with each param
    group's `params` narrowed to that part, then restored: the standard optimizers keep their
    state per parameter and compute each parameter's update from its own gradient and state
    alone, so stepping every part once is bit for bit one full step (tested), and the
    optimizer's `state_dict`, LR schedulers and checkpoints see the usual object. Not for
    anything that couples parameters (clipping by global norm, LBFGS): use a full step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 parts: list[list[torch.nn.Parameter]]) -> None:
        self.optimizer = optimizer
        owner = {id(p): i for i, part in enumerate(parts) for p in part}
        last = len(parts) - 1  # parameters outside every part (frozen ones) go with the last
        self._params = [
            [[p for p in group["params"] if owner.get(id(p), last) == i]
             for group in optimizer.param_groups]
            for i in range(len(parts))
        ]

    def step(self, part: int) -> None:
        groups = self.optimizer.param_groups
        full = [group["params"] for group in groups]
        try:
            for group, params in zip(groups, self._params[part], strict=True):
                group["params"] = params
            self.optimizer.step()
        finally:
            for group, params in zip(groups, full, strict=True):
                group["params"] = params
