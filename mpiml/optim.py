"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from mpiml.config import OptimConfig, scaled_lr

if TYPE_CHECKING:
    from mpiml.comm.sync import GradSync

__all__ = ["bucket_stepper", "build_optimizer", "build_scheduler", "clip_shards", "scaled_lr",
           "shard_optimizer"]


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


def bucket_stepper(optimizer: torch.optim.Optimizer, sync: GradSync) -> PartStepper:
    """A `PartStepper` whose part i is what bucket i's average updates: the bucket's parameters,
    or, for a `shard_optimizer` over a sharded `sync`, its share (that optimizer's i-th)."""
    if sync.sharded:
        return PartStepper(optimizer, [[p] for p in optimizer.param_groups[0]["params"]])
    return PartStepper(optimizer, [b.params for b in sync.buckets])


def shard_optimizer(optimizer: torch.optim.Optimizer, sync: GradSync) -> torch.optim.Optimizer:
    """The same optimizer (class and settings) over this rank's shares of `sync`'s buckets.

    Why: under `GradSync(shard=True)` the parameters are in node-shared memory and each of
    the node's L ranks updates only the 1/L of every bucket whose average it
    computed (`sync.share(i)`), so a step costs each rank 1/L of the optimizer's work and
    state. Only for optimizers whose update of an element depends on that element alone
    (SGD, Adam, AdamW: all `build_optimizer` makes), with one param group.

    The result is a genuine torch optimizer (schedulers and `PartStepper` work on it, with
    bucket i's share as its i-th parameter), and its state dicts use the unsharded layout, so
    checkpoints load at any rank count, sharded or not: `state_dict()` is collective on the
    node and returns the whole state on the node's first rank (on the others, their shares);
    `load_state_dict` takes a whole, unsharded state dict on every rank.
    """
    if not sync.sharded:
        raise ValueError("shard_optimizer needs GradSync(shard=True) with shared buckets "
                         "(GradSync.sharded is False: one rank per node or algorithm != auto)")
    if len(optimizer.param_groups) != 1:
        raise ValueError("a sharded optimizer needs exactly one param group; "
                         "set comm.shard_optimizer: false")
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    full = list(optimizer.param_groups[0]["params"])
    index = {id(p): i for i, p in enumerate(full)}
    shares = []
    for i in range(len(sync.buckets)):
        param, grad = sync.share(i)
        param.grad = grad
        shares.append(param)
    # Some group keys are not constructor arguments (AdamW's decoupled_weight_decay): build
    # with those that are, then take the group over whole.
    accepted = inspect.signature(type(optimizer)).parameters
    inner = type(optimizer)(shares, **{k: v for k, v in settings.items() if k in accepted})
    inner.param_groups[0].update(settings)
    # Where each bucket's elements go in the unsharded layout: (param index, shape, start in
    # the bucket) in order; the bucket's length, padding between slots included.
    layout = [[(index[id(p)], p.shape, start) for p, start in zip(bucket.params, bucket.starts,
                                                                   strict=True)]
              for bucket in sync.buckets]
    lengths = [bucket.buffer.numel() for bucket in sync.buckets]
    owned = [sync.owned(i) for i in range(len(sync.buckets))]

    def to_whole(_: torch.optim.Optimizer, sd: dict) -> dict | None:
        pieces = sync.node_gather(sd["state"])
        if pieces is None:
            return None
        state: dict[int, dict] = {}
        for i, params in enumerate(layout):
            per_rank = [p[i] for p in pieces if i in p]
            if not per_rank:
                continue
            whole: dict[str, object] = {}
            for key, value in per_rank[0].items():
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    whole[key] = torch.cat([p[key] for p in per_rank])
                else:  # per bucket (Adam's `step`): the same on every share
                    whole[key] = value
            for param_index, shape, start in params:
                n = math.prod(shape)
                # Every tensor its own (a `step` shared by several parameters would count
                # once per parameter in an unsharded optimizer that loads this).
                state[param_index] = {
                    key: (v[start : start + n].view(shape).clone()
                          if isinstance(v, torch.Tensor) and v.dim() == 1 else _own(v))
                    for key, v in whole.items()}
        group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(full)))}]}

    def from_whole(_: torch.optim.Optimizer, sd: dict) -> dict:
        groups = sd["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(full):
            raise ValueError(f"the optimizer state has {sum(len(g['params']) for g in groups)} "
                             f"parameters in {len(groups)} group(s); this model has "
                             f"{len(full)} in one")
        ids = groups[0]["params"]
        saved = sd["state"]
        state: dict[int, dict] = {}
        for i, params in enumerate(layout):
            entries = [saved.get(ids[param_index]) for param_index, _, _ in params]
            if all(e is None for e in entries):
                continue
            if any(e is None for e in entries):
                raise ValueError(f"the optimizer state covers only part of gradient bucket {i}")
            lo, hi = owned[i]
            state[i] = {
                # cloned: the share alone, not a view keeping the whole bucket's state alive
                key: (_bucket_layout([e[key] for e in entries], params, lengths[i])[lo:hi].clone()
                      if isinstance(value, torch.Tensor) and value.dim() > 0 else _own(value))
                for key, value in entries[0].items()}
        group = {k: v for k, v in groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(shares)))}]}

    inner.register_state_dict_post_hook(to_whole)
    inner.register_load_state_dict_pre_hook(from_whole)
    return inner


def _bucket_layout(values: list[torch.Tensor], params: list[tuple[int, torch.Size, int]],
                   length: int) -> torch.Tensor:
    """Per-parameter state laid out as its bucket is: each at its slot, zeros between."""
    flat = torch.zeros(length, dtype=values[0].dtype)
    for value, (_, _, start) in zip(values, params, strict=True):
        flat[start : start + value.numel()] = value.reshape(-1)
    return flat


def _own(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else value


def clip_shards(optimizer: torch.optim.Optimizer, sync: GradSync, max_norm: float) -> float:
    """`clip_grad_norm_` for a sharded optimizer: the norm of the whole averaged gradient,
    from every local rank's shares (collective on the node); returns it."""
    params = [p for group in optimizer.param_groups for p in group["params"]
              if p.grad is not None]
    mine = float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))
    norm = math.sqrt(float(sync.node_sum(np.array([mine * mine]))[0]))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm), foreach=True)
    return norm
