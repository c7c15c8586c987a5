"""Sharded update (`GradSync(shard=True)` + `optim.shard_optimizer`): parameters once per node in
shared memory, each local rank stepping its share, against the unsharded path as the oracle.

The oracle is a second copy of the model trained side by side with the plain path (private
parameters, whole averages in `.grad`, one full optimizer per rank). Both see the same
per-rank data, so after every step the parameters must agree; the state dicts must be the
unsharded layout and load back at any rank count.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpiml.comm import World, shm
from mpiml.comm.sync import GradSync
from mpiml.errors import CommError
from mpiml.optim import bucket_stepper, clip_shards, shard_optimizer

pytestmark = pytest.mark.mpi


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # registered first, so bucketed last and alone: one element, an empty share for all
        # local ranks but one
        self.scale = nn.Parameter(torch.full((1,), 1.5))
        self.a = nn.Linear(13, 301)
        self.h = nn.Linear(301, 301)  # 354 KiB: over shm.SMALL_BUCKET_BYTES, a shared bucket
        self.b = nn.Linear(301, 7)
        self.frozen = nn.Linear(2, 2)  # not bucketed, stays private, never stepped
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.h(torch.tanh(self.a(x))))) * self.scale


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                      foreach=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
}


@pytest.fixture
def world():
    w = World()
    yield w
    w.close()


def batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(5 + rank, 13, generator=gen)


def pair(world: World, kind: str, node_comm=None, dtype=torch.float32, **sync_kw):
    """(model, sync, optimizer) sharded and the same unsharded, from the same weights."""
    if world.size == 1:
        pytest.skip("one rank: nothing to shard (GradSync.sharded is False)")
    torch.manual_seed(7 + world.rank)  # different on purpose: GradSync broadcasts rank 0's
    model = Net().to(dtype)
    oracle = copy.deepcopy(model)
    kw = dict(bucket_mb=0.001, algorithm="auto", node_comm=node_comm, **sync_kw)
    sync = GradSync(world, model, shard=True, **kw)
    plain = GradSync(world, oracle, shard=False, **kw)
    opt = shard_optimizer(OPTIMIZERS[kind](model.parameters()), sync)
    plain_opt = OPTIMIZERS[kind](oracle.parameters())
    return (model, sync, opt), (oracle, plain, plain_opt)


def train_step(model, sync, step_fn, rank, step):
    x = batch(rank, step).to(next(model.parameters()).dtype)
    model(x).float().pow(2).mean().backward()
    step_fn(sync)
    sync.zero_grad()


def same_parameters(a: nn.Module, b: nn.Module, exact: bool = True) -> None:
    differ, total = 0, 0
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p.detach(), q.detach()), name
        elif p.dtype == torch.float32:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
        else:  # 16 bits: see test_sharded_steps_in_other_dtypes
            apart = (p.detach().double() - q.detach().double()).abs()
            assert apart.max() <= 4 * ulp(q.detach().abs().max()), (name, apart.max())
            differ, total = differ + int((apart > 0).sum()), total + apart.numel()
    assert differ <= 0.05 * total, (differ, total)


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of `t`'s dtype at each element (as float64)."""
    bits = {torch.bfloat16: 8, torch.float16: 11}[t.dtype]  # significand, implicit 1 too
    _, exponent = torch.frexp(t.double())
    tiny = torch.finfo(t.dtype).smallest_normal * torch.finfo(t.dtype).eps
    return torch.clamp(torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent - bits),
                       min=tiny)


def same_everywhere(world: World, model: nn.Module) -> None:
    mine = [p.detach().double().numpy() for p in model.parameters()]
    for theirs in world.allgather_object(mine):
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("by_bucket", [True, False])
def test_sharded_steps_match_the_unsharded_path(world, kind, overlap, by_bucket):
    (model, sync, opt), (oracle, plain, plain_opt) = pair(world, kind, overlap=overlap)
    with sync, plain:
        assert sync.sharded  # every rank of these tests shares one node
        # both kinds of bucket: private (MPI's Allreduce) and in shared memory
        assert sorted(set(sync._shared[torch.float32]._shared_index)) == [False, True]
        parts = bucket_stepper(opt, sync)
        for step in range(4):
            if by_bucket:  # as the trainer does: each share stepped as its average arrives
                train_step(model, sync, lambda s: s.finish(parts.step), world.rank, step)
            else:
                train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, step)
            train_step(oracle, plain, lambda s: (s.finish(), plain_opt.step()), world.rank, step)
            same_parameters(model, oracle)
        same_everywhere(world, model)
        # the frozen layer was neither moved nor stepped
        assert not any(p.data_ptr() == q.data_ptr()
                       for p in model.frozen.parameters() for q in oracle.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_sharded_steps_in_other_dtypes(world, dtype):
    """16-bit parameters in the node's copy (gradients summed in float32, rounded once) and
    float64. The averaged gradients are the same bits as the unsharded path's (checked from
    equal parameters); the update is too in float64, but in 16 bits torch's elementwise
    kernels round the vectorised body and the scalar tail of a tensor differently, and a flat
    share cuts those elsewhere than the parameters do: a few elements near the cut points end
    a unit in the last place apart (at the scale of the update, which momentum carries on,
    and the forward spreads a little). So: at most 5% of the model's elements
    differ, by at most 4 units in the last place at the tensor's largest magnitude (a share
    left unstepped or averaged wrong would differ almost everywhere). Every rank still holds
    the same bits. (SGD: Adam's eps underflows in float16.)"""
    (model, sync, opt), (oracle, plain, plain_opt) = pair(world, "sgd", overlap=False,
                                                          dtype=dtype)
    with sync, plain:
        assert {p.dtype for p in model.parameters()} == {dtype}
        for step in range(3):
            for m, s in ((model, sync), (oracle, plain)):
                x = batch(world.rank, step).to(dtype)
                m(x).float().pow(2).mean().backward()
                s.finish()
            for i in range(len(sync.buckets)):  # from equal parameters, equal bits
                lo, hi = sync.owned(i)
                if step == 0 or dtype == torch.float64:
                    assert torch.equal(sync.share(i)[1], plain.buckets[i].buffer[lo:hi])
            opt.step()
            plain_opt.step()
            sync.zero_grad()
            plain.zero_grad()
            same_parameters(model, oracle, exact=dtype == torch.float64)
            assert all(p.isfinite().all() for p in model.parameters())
        same_everywhere(world, model)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_state_dict_is_the_unsharded_one_and_loads_back(world, kind):
    (model, sync, opt), (oracle, plain, plain_opt) = pair(world, kind, overlap=False)
    with sync, plain:
        for step in range(3):
            train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, step)
            train_step(oracle, plain, lambda s: (s.finish(), plain_opt.step()), world.rank, step)
        whole = opt.state_dict()  # collective on the node
        expected = plain_opt.state_dict()
        if world.local_rank == 0 or not sync.sharded:
            assert whole["param_groups"] == expected["param_groups"]
            assert sorted(whole["state"]) == sorted(expected["state"])
            for i, state in expected["state"].items():
                assert sorted(whole["state"][i]) == sorted(state)
                for key, value in state.items():
                    assert torch.equal(torch.as_tensor(whole["state"][i][key]),
                                       torch.as_tensor(value)), (i, key)
        # Load the unsharded state into a fresh sharded optimizer (as a resume does, on every
        # rank) and into a fresh plain one: the next steps must still agree.
        fresh = shard_optimizer(OPTIMIZERS[kind](model.parameters()), sync)
        fresh.load_state_dict(expected)
        for share in fresh.param_groups[0]["params"]:  # each rank holds its share's state only
            for key, value in fresh.state[share].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    assert value.shape == share.shape, key
                    assert value.untyped_storage().nbytes() == share.nbytes, key
        fresh_plain = OPTIMIZERS[kind](oracle.parameters())
        fresh_plain.load_state_dict(expected)
        for step in range(3, 5):
            train_step(model, sync, lambda s: (s.finish(), fresh.step()), world.rank, step)
            train_step(oracle, plain, lambda s: (s.finish(), fresh_plain.step()), world.rank,
                       step)
            same_parameters(model, oracle)


def test_clipping_uses_the_norm_of_the_whole_average(world):
    (model, sync, opt), (oracle, plain, plain_opt) = pair(world, "sgd", overlap=False)
    with sync, plain:
        for step in range(3):
            model(batch(world.rank, step)).pow(2).mean().mul(50).backward()
            sync.finish()
            norm = clip_shards(opt, sync, 0.5)
            opt.step()
            sync.zero_grad()
            oracle(batch(world.rank, step)).pow(2).mean().mul(50).backward()
            plain.finish()
            expected = torch.nn.utils.clip_grad_norm_(oracle.parameters(), 0.5, foreach=True)
            plain_opt.step()
            plain.zero_grad()
            assert norm > 0.5  # the clipping really happened
            assert norm == pytest.approx(float(expected), rel=1e-5)
            same_parameters(model, oracle, exact=False)
        same_everywhere(world, model)


def test_sharded_across_emulated_nodes(world):
    """Two 'nodes' of size N/2 (rank % 2): shares are summed within a node and across them by
    the ring; the parameters of both nodes must stay identical."""
    if world.size < 4:
        pytest.skip("needs two emulated nodes of two ranks")
    node = world.comm.Split(world.rank % 2, world.rank)
    try:
        (model, sync, opt), (oracle, plain, plain_opt) = pair(world, "adam", node_comm=node,
                                                              overlap=True)
        with sync, plain:
            assert sync.sharded
            for step in range(3):
                train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, step)
                train_step(oracle, plain, lambda s: (s.finish(), plain_opt.step()), world.rank,
                           step)
                same_parameters(model, oracle)
            same_everywhere(world, model)
    finally:
        node.Free()


def test_parameters_outlive_close(world):
    (model, sync, opt), (oracle, plain, plain_opt) = pair(world, "sgd", overlap=False)
    train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, 0)
    before = [p.detach().clone() for p in model.parameters()]
    sync.close()
    plain.close()
    after = [p.detach() for p in model.parameters()]  # would fault if still in the window
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    model(batch(world.rank, 1)).sum().backward()  # and the model still trains alone
    assert MPI.Is_initialized()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_every_slot_starts_on_a_cache_line_and_the_padding_stays_zero(world, kind):
    """Net's 7-element bias comes first in its bucket: without padding every later slot would
    start 28 bytes off a cache line. Parameters (node-shared) and gradient slots start on one,
    and what lies between slots stays zero through the steps, in the gradients and the
    parameters alike (it is inside the shares the optimizer steps)."""
    (model, sync, opt), _ = pair(world, kind, overlap=False)
    with sync:
        for step in range(3):
            train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, step)
            gaps = []
            for bucket in sync.buckets:
                used = torch.zeros(bucket.buffer.numel(), dtype=torch.bool)
                for view in bucket.views:
                    assert view.data_ptr() % 64 == 0
                    at = (view.data_ptr() - bucket.buffer.data_ptr()) // view.element_size()
                    used[at : at + view.numel()] = True
                gaps.append(int((~used).sum()))
                assert torch.count_nonzero(bucket.buffer[~used]) == 0
                if sync.sharded:
                    params = sync._shared[bucket.buffer.dtype].param_tensors[bucket.slot]
                    assert torch.count_nonzero(params[~used]) == 0
            assert sum(gaps) > 0  # Net has padding to check
        for p in model.parameters():
            assert p.data_ptr() % 64 == 0


@pytest.fixture(params=["own buckets", "node copy"])
def layout(request, monkeypatch):
    """Both places the sharded parameters can live (`SharedBuckets.holds_own_parameters`):
    each rank's own buckets where the shares are small (Net's are), else one copy per node
    (forced here by a threshold below every share, which also turns `hand_back` off)."""
    if request.param == "node copy":
        monkeypatch.setattr(shm, "HAND_BACK_BYTES", -1)
    return request.param


def test_where_the_parameters_live(world, layout):
    (model, sync, opt), (oracle, plain, plain_opt) = pair(world, "sgd", overlap=False)
    with sync, plain:
        shared = sync._shared[torch.float32]
        assert shared.params_in_buckets == (layout == "own buckets")
        for bucket in sync.buckets:
            if not shared._shared_index[bucket.slot]:
                continue
            own = bucket.buffer.data_ptr(), bucket.buffer.data_ptr() + bucket.buffer.nbytes
            for p in bucket.params:
                assert (own[0] <= p.data_ptr() < own[1]) == (layout == "own buckets")
        for step in range(3):
            train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, step)
            train_step(oracle, plain, lambda s: (s.finish(), plain_opt.step()), world.rank, step)
            same_parameters(model, oracle)
        same_everywhere(world, model)


class Sometimes(Net):
    """Net with a layer (in a shared bucket, cut by the shares) used on even steps only."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(301, 301)
        self.use_extra = True

    def forward(self, x):
        h = torch.tanh(self.h(torch.tanh(self.a(x))))
        if self.use_extra:
            h = torch.tanh(self.extra(h))
        return self.b(h) * self.scale


def test_a_parameter_without_gradient_keeps_its_values(world, layout):
    """A step where a layer gets no gradient: its slot goes in as zeros, and where the
    parameters live in the buckets, the own part of the slot (this rank's parameters) must
    be neither read as gradient nor zeroed."""
    if world.size == 1:
        pytest.skip("one rank: nothing to shard")
    torch.manual_seed(3)
    model = Sometimes()
    oracle = copy.deepcopy(model)
    kw = dict(bucket_mb=0.001, algorithm="auto", overlap=False)
    with GradSync(world, model, shard=True, **kw) as sync, \
            GradSync(world, oracle, shard=False, **kw) as plain:
        # Adam: a zero gradient still moves a parameter that has momentum, so a wrong one shows
        opt = shard_optimizer(OPTIMIZERS["adam"](model.parameters()), sync)
        plain_opt = OPTIMIZERS["adam"](oracle.parameters())
        for step in range(4):
            model.use_extra = oracle.use_extra = step % 2 == 0
            train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, step)
            train_step(oracle, plain, lambda s: (s.finish(), plain_opt.step()), world.rank, step)
            same_parameters(model, oracle)
        same_everywhere(world, model)


def test_a_skipped_update_leaves_the_parameters(world, layout):
    """finish() with no optimizer step (train.nonfinite=skip), and a backward with no
    finish() at all: zero_grad() must leave every parameter as it was (in the buckets
    layout, the backward has copied gradients over the peers' shares)."""
    (model, sync, opt), _ = pair(world, "sgd", overlap=False)
    with sync:
        train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, 0)
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, sync, lambda s: s.finish(), world.rank, 1)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        train_step(model, sync, lambda s: None, world.rank, 2)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        same_everywhere(world, model)
        train_step(model, sync, lambda s: (s.finish(), opt.step()), world.rank, 3)
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(),
                                                         strict=True))
        same_everywhere(world, model)


def test_a_second_backward_before_finish_is_an_error_where_parameters_are_in_buckets(world,
                                                                                    layout):
    """Two backward passes without no_sync(): with the parameters in the buckets, the first
    one's gradient copies have overwritten the peers' shares the second forward read, so the
    second backward must fail loudly; with one node copy it accumulates as before."""
    (model, sync, opt), (oracle, plain, plain_opt) = pair(world, "sgd", overlap=False)
    with sync, plain:
        model(batch(world.rank, 0)).pow(2).mean().backward()
        if layout == "own buckets":
            with pytest.raises(CommError, match="second gradient before finish"):
                model(batch(world.rank, 1)).pow(2).mean().backward()
            return
        model(batch(world.rank, 1)).pow(2).mean().backward()
        sync.finish()
        opt.step()
        sync.zero_grad()
        for step in (0, 1):
            oracle(batch(world.rank, step)).pow(2).mean().backward()
        plain.finish()
        plain_opt.step()
        plain.zero_grad()
        same_parameters(model, oracle)
