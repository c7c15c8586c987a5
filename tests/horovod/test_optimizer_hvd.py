"""broadcast_parameters, broadcast_optimizer_state and DistributedOptimizer against oracles
that every rank computes alone: one process training on all ranks' data at once."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

import mpiml.horovod.torch as hvd

# Horovod registers no gradient hooks on one rank, so its misuse errors need two.
needs_peers = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() < 2, reason="no hooks on one rank")

OPTIMIZERS = {
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-3),
    "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "AdamW": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.05),
    "RMSprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr, momentum=0.5),
    "Adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr),
}
PLAIN_SGD = {"SGD-momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)}


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(rank: int, step: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(97 * step + rank)
    return torch.randn(rows, 6, generator=gen), torch.randint(0, 3, (rows,), generator=gen)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_broadcast_parameters_from_a_state_dict_and_named_parameters():
    n, r = hvd.size(), hvd.rank()
    model = build_model(seed=r)  # different weights on every rank
    model.register_buffer("steps", torch.tensor([r], dtype=torch.int64))
    hvd.broadcast_parameters(model.state_dict(), root_rank=n - 1)
    want = build_model(seed=n - 1)
    for got, ref in zip(model.parameters(), want.parameters(), strict=True):
        assert torch.equal(got, ref)
    assert model.steps.item() == n - 1
    other = build_model(seed=10 + r)
    hvd.broadcast_parameters(other.named_parameters(), root_rank=0)
    for got, ref in zip(other.parameters(), build_model(seed=10).parameters(), strict=True):
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="invalid params"):
        hvd.broadcast_parameters(torch.ones(2), root_rank=0)


def local_training(kind: str, rank: int, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """What rank `rank` holds after `steps` local steps on its own data and lr (no sync)."""
    model = build_model(seed=100 + rank)
    opt = OPTIMIZERS[kind](model.parameters(), 0.01 * (rank + 1))
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def assert_same_state(got: dict, want: dict) -> None:
    assert [g["lr"] for g in got["param_groups"]] == [g["lr"] for g in want["param_groups"]]
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for key in want["state"]:
        for name, value in want["state"][key].items():
            theirs = got["state"][key][name]
            if torch.is_tensor(value):
                assert torch.equal(theirs, value), (key, name)
            else:
                assert theirs == value, (key, name)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_broadcast_optimizer_state(kind):
    n, r = hvd.size(), hvd.rank()
    root = n - 1
    _, opt = local_training(kind, r, steps=r + 1)  # state and lr differ between ranks
    hvd.broadcast_optimizer_state(opt, root_rank=root)
    _, reference = local_training(kind, root, steps=root + 1)  # the oracle: root, replayed
    assert_same_state(opt.state_dict(), reference.state_dict())


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_broadcast_optimizer_state_of_a_fresh_optimizer(kind):
    r = hvd.rank()
    model = build_model(seed=0)
    opt = OPTIMIZERS[kind](model.parameters(), 0.1 * (r + 1))
    before = params_of(model)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert len(opt.state_dict()["state"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True))
    with pytest.raises(ValueError, match="LBFGS"):
        hvd.broadcast_optimizer_state(torch.optim.LBFGS(model.parameters()), root_rank=0)


def oracle_training(steps: int, lr: float, passes: int = 1, clip: float | None = None,
                    kind: str = "SGD") -> list[torch.Tensor]:
    """One process, every rank's data: the gradient is the mean over ranks of each rank's
    gradient (summed over its `passes` micro-batches, as Horovod accumulates them)."""
    n = hvd.size()
    model = build_model(seed=7)
    opt = (OPTIMIZERS | PLAIN_SGD)[kind](model.parameters(), lr)
    for step in range(steps):
        opt.zero_grad()
        for k in range(n):
            for m in range(passes):
                x, y = batch(k, passes * step + m)
                (F.cross_entropy(model(x), y) / n).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return params_of(model)


def distributed_training(steps: int, lr: float, passes: int = 1, clip: float | None = None,
                         kind: str = "SGD", groups=None, **kwargs) -> list[torch.Tensor]:
    r = hvd.rank()
    model = build_model(seed=7 + 1000 * r)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if groups == "explicit":  # two listed groups; the parameters left out form their own
        params = list(model.parameters())
        groups = [[params[0], params[3]], [params[1]]]
    if groups is not None:
        kwargs["groups"] = groups
    opt = hvd.DistributedOptimizer((OPTIMIZERS | PLAIN_SGD)[kind](model.parameters(), lr),
                                   named_parameters=model.named_parameters(),
                                   backward_passes_per_step=passes, **kwargs)
    for step in range(steps):
        opt.zero_grad()
        for m in range(passes):
            x, y = batch(r, passes * step + m)
            F.cross_entropy(model(x), y).backward()
        if clip is None:
            opt.step()
        else:
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            with opt.skip_synchronize():
                opt.step()
    opt.close()
    return params_of(model)


def assert_params_close(got, want, **tol):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_distributed_optimizer_equals_one_process_on_all_data(kind):
    got = distributed_training(steps=6, lr=0.05, kind=kind)
    want = oracle_training(steps=6, lr=0.05, kind=kind)
    assert_params_close(got, want, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(want, params_of(build_model(7)),
                                                   strict=True))


def test_backward_passes_per_step_accumulates_before_reducing():
    got = distributed_training(steps=4, lr=0.05, passes=3)
    want = oracle_training(steps=4, lr=0.05, passes=3)
    assert_params_close(got, want, rtol=1e-5, atol=1e-6)


def test_fp16_compression():
    got = distributed_training(steps=4, lr=0.05, compression=hvd.Compression.fp16)
    want = oracle_training(steps=4, lr=0.05)
    assert_params_close(got, want, rtol=2e-3, atol=2e-3)


def test_clipping_between_synchronize_and_step():
    got = distributed_training(steps=4, lr=0.5, clip=0.05)
    want = oracle_training(steps=4, lr=0.5, clip=0.05)
    unclipped = oracle_training(steps=4, lr=0.5)
    assert_params_close(got, want, rtol=1e-5, atol=1e-6)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(want, unclipped, strict=True))


@pytest.mark.parametrize("groups", [None, 2, "explicit"])
def test_groups_and_small_fusion_buckets(groups, monkeypatch):
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "64")  # many buckets: overlap in play
    got = distributed_training(steps=3, lr=0.05, groups=groups)
    want = oracle_training(steps=3, lr=0.05)
    assert_params_close(got, want, rtol=1e-5, atol=1e-6)


def test_sum_op_and_predivide_factor():
    n = hvd.size()
    # Summed gradients with lr / n step exactly as averaged ones with lr (no weight decay).
    got = distributed_training(steps=3, lr=0.05 / n, op=hvd.Sum, kind="SGD-momentum")
    want = oracle_training(steps=3, lr=0.05, kind="SGD-momentum")
    assert_params_close(got, want, rtol=1e-5, atol=1e-6)
    got = distributed_training(steps=3, lr=0.05, gradient_predivide_factor=2.0)
    assert_params_close(got, oracle_training(steps=3, lr=0.05), rtol=1e-5, atol=1e-6)


def test_parameter_unused_on_some_ranks_is_averaged_with_zeros():
    n, r = hvd.size(), hvd.rank()
    torch.manual_seed(3)
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    hvd.broadcast_parameters(dict(a.named_parameters(prefix="a")) | dict(
        b.named_parameters(prefix="b")), root_rank=0)
    before = b.weight.detach().clone()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(list(a.parameters()) + list(b.parameters()),
                                                   lr=1.0))
    x = torch.ones(1, 2)
    out = a(x) if r != 0 else b(a(x))  # b gets a gradient on rank 0 only
    out.sum().backward()
    opt.step()
    grad_b = b.weight.grad.clone()
    opt.close()
    # Rank 0's gradient for b.weight is a(x) broadcast over rows; others contribute zeros.
    torch.manual_seed(3)
    a0 = nn.Linear(2, 2)
    want = a0(x).detach().expand(2, 2) / n
    torch.testing.assert_close(grad_b, want)
    torch.testing.assert_close(b.weight.detach(), before - want)


@needs_peers
def test_misuse_errors():
    r = hvd.rank()
    model = build_model(seed=1)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    x, y = batch(r, 0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(AssertionError, match="zero_grad"):
        opt.zero_grad()
    with pytest.raises(AssertionError, match="backward_passes_per_step"):
        F.cross_entropy(model(x), y).backward()
    opt.synchronize()
    with pytest.warns(UserWarning, match="skip_synchronize"):
        opt.step()  # after synchronize() without skip_synchronize(): reduces again, warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.close()

    with pytest.raises(ValueError, match="unique"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=[("w", p) for p in model.parameters()])
    with pytest.raises(ValueError, match="not named"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=list(model.named_parameters())[:1])
    with pytest.raises(ValueError, match="tuples"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=list(model.parameters()))
    with pytest.raises(ValueError, match="gradient_predivide_factor"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Sum,
                                 gradient_predivide_factor=2.0)
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum)


@needs_peers
def test_models_that_differ_between_ranks_are_an_error_everywhere():
    r = hvd.rank()
    model = nn.Linear(3, 2 + (r == 1))
    with pytest.raises(hvd.HorovodInternalError, match="rank 1"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))


def test_distributed_optimizer_works_with_lr_schedulers_and_state_dicts():
    r = hvd.rank()
    model = build_model(seed=5)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(r, 0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and opt.param_groups is \
        inner.param_groups
    state = opt.state_dict()
    assert len(state["state"]) == len(list(model.parameters()))
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    opt.load_state_dict(state)
    opt.close()
