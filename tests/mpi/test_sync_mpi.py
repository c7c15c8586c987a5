"""GradSync: bucketed, overlapped gradient averaging against an oracle built with allgather."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mpiml.comm import World
from mpiml.comm.sync import GradSync
from mpiml.errors import CommError

pytestmark = pytest.mark.mpi


class Net(nn.Module):
    def __init__(self, extra: int = 0) -> None:
        super().__init__()
        self.a = nn.Linear(13, 31)
        self.b = nn.Linear(31, 7 + extra)
        self.unused = nn.Linear(3, 5)  # never in forward: must be synced as zeros

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def local_grads(model: nn.Module, rank: int, micro: int = 0) -> None:
    gen = torch.Generator().manual_seed(100 * rank + micro)
    x = torch.randn(9 + rank, 13, generator=gen)
    model(x).pow(2).mean().backward()


def local_copy(model: nn.Module) -> dict[str, np.ndarray]:
    """Each parameter's gradient before the sync; one backward did not reach (None) is zeros."""
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad).detach().clone().numpy()
            for n, p in model.named_parameters()}


def step_and_check_average(world: World, model: Net, sync: GradSync, micro: int) -> None:
    """One backward and finish(); every gradient must be the float64 mean of every rank's."""
    local_grads(model, world.rank, micro=micro)
    mine = local_copy(model)
    assert model.unused.weight.grad is None  # backward never reached it
    sync.finish()
    everyone = world.allgather_object(mine)
    for n, p in model.named_parameters():
        expected = np.mean([g[n].astype(np.float64) for g in everyone], axis=0)
        np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=n)
    assert not model.unused.weight.grad.any()
    sync.zero_grad()


@pytest.fixture
def world():
    w = World()
    yield w
    w.close()


@pytest.mark.parametrize("overlap", [True, False, "auto"])
@pytest.mark.parametrize("bucket_mb", [0.001, 4.0])
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
def test_gradients_are_the_average_of_every_rank(world, overlap, bucket_mb, algorithm):
    torch.manual_seed(1234 + world.rank)  # different on purpose: GradSync broadcasts rank 0's
    model = Net()
    with GradSync(world, model, bucket_mb=bucket_mb, overlap=overlap, algorithm=algorithm) as sync:
        assert len(sync.buckets) >= (2 if bucket_mb < 0.01 else 1)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in params.values():  # every rank now starts from rank 0's weights
            assert all(np.array_equal(o, p.numpy()) for o in world.allgather_object(p.numpy()))
        for step in range(2):
            step_and_check_average(world, model, sync, step)


def test_accumulation_syncs_once(world):
    model = Net()
    with GradSync(world, model, bucket_mb=0.001, overlap=True) as sync:
        local = []
        with sync.no_sync():
            local_grads(model, world.rank, micro=0)
            assert sync.stats.calls == 0
        local_grads(model, world.rank, micro=1)
        local.append(local_copy(model))
        sync.finish()
        assert sync.stats.calls == len(sync.buckets)
        everyone = world.allgather_object(local[0])
        for n, p in model.named_parameters():
            expected = np.mean([g[n] for g in everyone], axis=0)
            np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overlap", [True, False])
def test_gradients_land_in_their_bucket_and_micro_batches_add_there(world, overlap):
    """After zero_grad() every .grad is None; backward's gradient is moved into the bucket
    slot (and .grad points there), the next micro-batch adds to it, and the average equals
    plain PyTorch's accumulated gradients averaged over ranks."""
    model = Net()
    with GradSync(world, model, bucket_mb=0.001, overlap=overlap) as sync:
        oracle = Net()
        oracle.load_state_dict(model.state_dict())  # rank 0's weights, as GradSync made them
        assert all(p.grad is None for p in model.parameters())
        for step in range(2):  # the second step starts from zero_grad(), not from fresh
            with sync.no_sync():
                local_grads(model, world.rank, micro=10 * step)
            slots = {id(p): v for b in sync.buckets
                     for p, v in zip(b.params, b.views, strict=True)}
            for n, p in model.named_parameters():
                if n.startswith("unused."):
                    assert p.grad is None, n
                else:
                    assert p.grad.data_ptr() == slots[id(p)].data_ptr(), f"{n} not in its bucket"
            local_grads(model, world.rank, micro=10 * step + 1)
            oracle.zero_grad()
            for micro in (10 * step, 10 * step + 1):
                local_grads(oracle, world.rank, micro=micro)
            sync.finish()
            everyone = world.allgather_object(local_copy(oracle))
            for n, p in model.named_parameters():
                expected = np.mean([g[n].astype(np.float64) for g in everyone], axis=0)
                np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-5, atol=1e-6,
                                           err_msg=f"step {step}, {n}")
            sync.zero_grad()


def test_grad_replaced_by_set_to_none_is_still_synced(world):
    model = Net()
    with GradSync(world, model, overlap=False) as sync:
        for p in model.parameters():
            p.grad = None  # what optimizer.zero_grad() does by default
        local_grads(model, world.rank)
        mine = {n: p.grad.detach().clone().numpy() for n, p in model.named_parameters()
                if p.grad is not None}
        sync.finish()
        everyone = world.allgather_object(mine)
        for n in mine:
            expected = np.mean([g[n] for g in everyone], axis=0)
            np.testing.assert_allclose(dict(model.named_parameters())[n].grad.numpy(), expected,
                                       rtol=1e-5, atol=1e-6)


def test_layout_mismatch_is_an_error_on_every_rank(world):
    if world.size == 1:
        pytest.skip("needs two ranks to differ")
    model = Net(extra=1 if world.rank == world.size - 1 else 0)
    expected = r"model layout differs: parameter #2 is 'b.weight' \[7, 31\]"
    with pytest.raises(CommError, match=expected):
        GradSync(world, model)


@pytest.mark.parametrize("dtype,compression,rtol", [
    (torch.float32, "fp16", 3e-3),
    (torch.float32, "bf16", 2e-2),
    (torch.float16, "none", 3e-3),
    (torch.bfloat16, "none", 2e-2),
])
def test_half_precision_and_compression_against_float64(world, dtype, compression, rtol):
    """16-bit paths reduce in float32: within a few 16-bit roundings of the float64 mean."""
    torch.manual_seed(7)
    model = Net().to(dtype)
    with GradSync(world, model, bucket_mb=0.002, compression=compression) as sync:
        gen = torch.Generator().manual_seed(world.rank)
        for p in model.parameters():  # rank-dependent gradients of varied magnitude
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + world.rank)).to(dtype)
        mine = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
        sync.finish()
        everyone = world.allgather_object({n: g.to(dtype).double() for n, g in mine.items()})
        for n, p in model.named_parameters():
            expected = torch.stack([g[n] for g in everyone]).mean(0)
            got = p.grad.double()
            scale = expected.abs().max().item() + 1e-12
            err = (got - expected).abs().max().item() / scale
            assert err <= rtol, f"{n}: relative error {err:.2e} > {rtol:.0e}"
            digests = world.allgather_object(p.grad.view(-1).float().numpy().tobytes())
            assert len(set(digests)) == 1, f"{n}: ranks hold different bits"


def test_overlap_auto_times_both_ways_then_every_rank_keeps_one(world):
    """The tuner alternates overlap on/off after its warm-up, then all ranks agree on one;
    the averages are right under either mode and across the switches."""
    model = Net()
    with GradSync(world, model, bucket_mb=0.001, overlap="auto") as sync:
        tuner = sync._tuner
        if world.size == 1:
            assert tuner is None and sync.overlap is False  # nothing to overlap with
            assert not sync.tuning
            return
        modes = []
        steps = tuner.warmup + 2 * tuner.blocks * tuner.block
        for step in range(steps + 2):
            modes.append(sync.overlap)
            step_and_check_average(world, model, sync, step)
            assert (sync.decision is None) == (step + 1 < steps), (step, sync.decision)
            assert sync.tuning == (step + 1 < steps), step
        # warm-up with overlap, then blocks alternating from off, then the choice held
        assert modes[: tuner.warmup] == [True] * tuner.warmup
        trial = modes[tuner.warmup : steps]
        assert trial == [bool(i // tuner.block % 2) for i in range(len(trial))]
        # every step of a block but its first is timed
        timed = (tuner.block - 1) * tuner.blocks
        assert len(tuner.times[True]) == len(tuner.times[False]) == timed
        assert f"{timed} steps each" in sync.decision
        assert modes[steps:] == [sync.overlap] * 2
        assert len(set(world.allgather_object((sync.overlap, sync.decision)))) == 1
        assert ("auto: on" if sync.overlap else "auto: off") in sync.decision


class Wide(nn.Module):
    """Buckets over shm.SMALL_BUCKET_BYTES: shared, so each rank's own share of the gradients
    stays where autograd put it until the sum (`GradSync._copy_for_peers`)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 600)
        self.b = nn.Linear(600, 300)
        self.unused = nn.Linear(100, 400)  # never in forward: synced as zeros

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def wide_grads(model: nn.Module, rank: int, micro: int) -> None:
    gen = torch.Generator().manual_seed(1000 * rank + micro)
    model(torch.randn(5 + rank, 64, generator=gen)).pow(2).mean().backward()


@pytest.mark.parametrize("between", ["nothing", "no_sync", "scaled", "replaced"])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("bucket_mb", [0.2, 4.0])
def test_own_share_kept_out_of_the_bucket_until_the_sum(world, overlap, bucket_mb, between):
    """Sharded: whatever happens to `.grad` between backward and finish(), this rank's share
    of each bucket holds the float64 mean of what every rank's `.grad` held: after a
    micro-batch under no_sync (accumulated in autograd's tensor), scaled in place after the
    hook copied it, or replaced by a new tensor.
    Each rank scales or replaces a different parameter. (With overlap on, buckets are already
    on their way when backward returns, so `.grad` is not to be touched before finish().)"""
    if overlap and between in ("scaled", "replaced"):
        pytest.skip("with overlap on, .grad is in flight between backward and finish()")
    model = Wide()
    with GradSync(world, model, bucket_mb=bucket_mb, overlap=overlap, shard=True) as sync:
        kept = [b for b in sync.buckets if b.own is not None]
        assert kept or not sync.sharded
        touched = list(model.named_parameters())[world.rank % 4][0]
        for step in range(2):
            if between == "no_sync":
                with sync.no_sync():
                    wide_grads(model, world.rank, 10 * step)
            wide_grads(model, world.rank, 10 * step + 1)
            p = dict(model.named_parameters())[touched]
            if between == "scaled":
                p.grad.mul_(3.0)  # after the hook: the copy for the peers is stale
            elif between == "replaced":
                p.grad = torch.full_like(p, float(world.rank + 1))
            mine = local_copy(model)
            sync.finish()
            everyone = world.allgather_object(mine)
            names = {id(q): n for n, q in model.named_parameters()}
            for bucket in sync.buckets:  # sharded: the average is in this rank's share only
                expected = np.zeros(bucket.buffer.numel())  # padding between slots: zeros
                for q, view in zip(bucket.params, bucket.views, strict=True):
                    at = (view.data_ptr() - bucket.buffer.data_ptr()) // view.element_size()
                    expected[at : at + q.numel()] = np.mean(
                        [g[names[id(q)]].astype(np.float64) for g in everyone],
                        axis=0).reshape(-1)
                lo, hi = sync.owned(bucket.index) if sync.sharded else (0, expected.size)
                got = sync.share(bucket.index)[1] if sync.sharded else bucket.buffer
                np.testing.assert_allclose(got.numpy(), expected[lo:hi],
                                           rtol=1e-5, atol=1e-6,
                                           err_msg=f"step {step}, bucket {bucket.index}")
            sync.zero_grad()
