"""Optimizers and schedules against hand computations (formulas written out, not torch's)."""

from __future__ import annotations

import math

import pytest
import torch

from mpiml.config import OptimConfig
from mpiml.optim import build_optimizer, build_scheduler, scaled_lr


@pytest.mark.parametrize("scaling,world,want", [
    ("none", 4, 0.1), ("linear", 4, 0.4), ("sqrt", 4, 0.2), ("linear", 1, 0.1),
    ("sqrt", 2, 0.1 * math.sqrt(2)),
])
def test_lr_scaling_with_world_size(scaling, world, want):
    cfg = OptimConfig(lr=0.1, lr_scaling=scaling)
    assert scaled_lr(cfg, world) == pytest.approx(want)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))], world_size=world)
    assert opt.param_groups[0]["lr"] == pytest.approx(want)


def lrs(cfg: OptimConfig, total: int, world: int = 1) -> list[float]:
    """The lr each optimizer step actually uses, stepping as the trainer does."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(cfg, [param], world)
    sched = build_scheduler(cfg, opt, total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        param.grad = torch.zeros(1)
        opt.step()
        sched.step()
    return used


def test_warmup_then_cosine_to_zero():
    cfg = OptimConfig(lr=2.0, schedule="cosine", warmup_steps=4, lr_scaling="linear")
    got = lrs(cfg, total=12, world=2)  # peak 4.0
    want = [4.0 * (k + 1) / 4 for k in range(4)]  # 1, 2, 3, 4
    want += [4.0 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 8)) for k in range(4, 12)]
    assert got == pytest.approx(want)
    assert got[3] == got[4] == pytest.approx(4.0)  # warmup ends at the peak, no jump
    assert got[-1] == pytest.approx(4.0 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_step_schedule_counts_from_step_zero_after_warmup():
    cfg = OptimConfig(lr=1.0, schedule="step", step_every=3, step_gamma=0.5, warmup_steps=2)
    got = lrs(cfg, total=8)
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_constant_schedule_and_no_warmup():
    assert lrs(OptimConfig(lr=0.3), total=5) == pytest.approx([0.3] * 5)


def _two_steps(cfg: OptimConfig, p0: float, grads: tuple[float, float]) -> float:
    param = torch.nn.Parameter(torch.tensor([p0], dtype=torch.float64))
    opt = build_optimizer(cfg, [param])
    for g in grads:
        param.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    return float(param.detach()[0])


def test_sgd_momentum_and_coupled_weight_decay():
    lr, m, wd, p, (g1, g2) = 0.1, 0.9, 0.01, 2.0, (0.5, -0.3)
    got = _two_steps(OptimConfig(name="sgd", lr=lr, momentum=m, weight_decay=wd), p, (g1, g2))
    b1 = g1 + wd * p
    p1 = p - lr * b1
    b2 = m * b1 + (g2 + wd * p1)
    assert got == pytest.approx(p1 - lr * b2, rel=1e-12)


def test_sgd_nesterov():
    lr, m, p, (g1, g2) = 0.1, 0.9, 2.0, (0.5, -0.3)
    got = _two_steps(OptimConfig(name="sgd", lr=lr, momentum=m, nesterov=True), p, (g1, g2))
    b1 = g1
    p1 = p - lr * (g1 + m * b1)
    b2 = m * b1 + g2
    assert got == pytest.approx(p1 - lr * (g2 + m * b2), rel=1e-12)


def _adam(p: float, grads: tuple[float, ...], lr: float, b1: float, b2: float, eps: float,
          wd: float, decoupled: bool) -> float:
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p *= 1 - lr * wd  # AdamW: decay the weight itself, apart from the gradient
        else:
            g = g + wd * p  # Adam: L2 penalty folded into the gradient
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_weight_decay(name):
    lr, betas, eps, wd, p, grads = 0.01, (0.8, 0.99), 1e-6, 0.1, 2.0, (0.5, -0.3)
    cfg = OptimConfig(name=name, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    want = _adam(p, grads, lr, *betas, eps, wd, decoupled=name == "adamw")
    assert _two_steps(cfg, p, grads) == pytest.approx(want, rel=1e-12)
    other = _adam(p, grads, lr, *betas, eps, wd, decoupled=name != "adamw")
    assert abs(want - other) > 1e-6  # the two kinds of decay are told apart by this test
