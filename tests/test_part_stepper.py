"""Stepping the optimizer bucket by bucket is bit for bit one full step, for every optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpiml.config import OptimConfig
from mpiml.optim import PartStepper, build_optimizer, build_scheduler


def model_and_data(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3))
    model[2].bias.requires_grad_(False)  # a frozen parameter belongs to no bucket
    return model, torch.randn(32, 6), torch.randint(0, 3, (32,))


def train(cfg: OptimConfig, parts_of: list[list[int]] | None, steps: int = 5) -> list[torch.Tensor]:
    model, x, y = model_and_data(0)
    opt = build_optimizer(cfg, model.parameters())
    sched = build_scheduler(cfg, opt, steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    stepper = (PartStepper(opt, [[trainable[i] for i in part] for part in parts_of])
               if parts_of is not None else None)
    for step in range(steps):
        model.zero_grad()
        nn.functional.cross_entropy(model(x * (step + 1)), y).backward()
        if stepper is None:
            opt.step()
        else:
            for i in reversed(range(len(parts_of))):  # the sync finishes the last layers first
                stepper.step(i)
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cfg", [
    OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, schedule="cosine",
                warmup_steps=2),
    OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True),
    OptimConfig(name="adam", lr=0.01, weight_decay=1e-2),
    OptimConfig(name="adamw", lr=0.01, weight_decay=0.1, schedule="step", step_every=2),
], ids=["sgd", "nesterov", "adam", "adamw"])
def test_parts_equal_one_full_step_bitwise(cfg):
    whole = train(cfg, None)
    parts = train(cfg, [[4, 3], [2], [0, 1]])
    moved = [not torch.equal(a, b) for a, b in zip(whole, train(cfg, None, steps=1),
                                                    strict=True)]
    assert any(moved), "the oracle did not train at all"
    for i, (a, b) in enumerate(zip(whole, parts, strict=True)):
        assert torch.equal(a, b), f"parameter {i} differs by {(a - b).abs().max()}"


def test_param_groups_are_restored_for_state_dict():
    model, x, y = model_and_data(1)
    opt = build_optimizer(OptimConfig(name="adam", lr=0.01), model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    stepper = PartStepper(opt, [trainable[:2], trainable[2:]])
    nn.functional.cross_entropy(model(x), y).backward()
    stepper.step(0)
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    assert len(opt.state) == 2  # only the first part has been stepped
    stepper.step(1)
    assert len(opt.state_dict()["state"]) == len(trainable)
