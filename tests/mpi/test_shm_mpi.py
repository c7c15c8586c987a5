"""`SharedBuckets` (gradient buckets in node-shared memory) against a float64 numpy oracle.

The ranks of one machine are grouped into "nodes" in four ways, so that one host can stand in
for several: the real shared-memory split (`host`), `rank // 2` (`pairs`: at N = 4, two nodes
of two, which puts the ring across nodes to work), `rank % 2` (`interleaved`: nodes whose
ranks are not contiguous) and `rank` (`alone`: one rank per node). Shared buckets are built
only where `usable()` says so, and `usable()` itself is checked for every grouping and N.

Each rank fills every bucket from a seed of (rank, length, round, bucket); the oracle is the
float64 mean of every rank's input as `comm.Allgather` delivers it. Tolerances are
elementwise and relative to the mean magnitude of the terms, m = mean over ranks of |x_r|
(a relative error on the mean itself means nothing where the terms cancel), with u the unit
roundoff of the type named:
  float64, float32     1e-12 * m, 1e-6 * m     the sums' own roundings: (N + 1) * u * m at most
  float16, bfloat16    2 * u(half) * m         summed in float32, rounded once to 16 bits
  16-bit wire          the above + (nodes + 1) * u(wire) * m   every hop of the ring across
                       nodes rounds to 16 bits (test_allreduce_mpi.py's error model)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpiml.comm import World, shm
from mpiml.comm.shm import (
    SMALL_BUCKET_BYTES,
    SharedBuckets,
    usable,
)
from mpiml.comm.staged import share_bounds, shm_free_bytes
from mpiml.comm.sync import GradSync
from mpiml.errors import CommError

pytestmark = pytest.mark.mpi

UNIT = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
RTOL = {"float64": 1e-12, "float32": 1e-6, "float16": 2 * UNIT["float16"],
        "bfloat16": 2 * UNIT["bfloat16"]}
TORCH = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
         "bfloat16": torch.bfloat16}
# Empty, one element, fewer than the ranks of a node (2-4 here), odd and off the 16-element
# alignment, a bucket that spans several of the owner's 256 KiB segments; empty ones between.
LENGTHS = (37, 0, 1, 3, 300_007, 0, 1001, 17)
LARGE = 40_000.0  # a float16 sum of two of these overflows (max 65504); their mean does not
GROUPINGS_WITH_SHARING = ["host", "pairs", "interleaved"]


# -- node groupings ---------------------------------------------------------------------------
def split_nodes(comm: MPI.Comm, grouping: str) -> MPI.Comm:
    """The ranks that share memory: the real split, or a finer one standing in for nodes."""
    rank = comm.Get_rank()
    if grouping == "host":
        return comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    color = {"pairs": rank // 2, "interleaved": rank % 2, "alone": rank}[grouping]
    return comm.Split(color, rank)


def expected_usable(grouping: str, size: int) -> bool:
    """Whether every node holds the same number (> 1) of ranks; mpiexec runs on one host."""
    return {
        "host": size > 1,
        "pairs": size % 2 == 0,  # N = 2: one node of two; N = 3: nodes of 2 and 1
        "interleaved": size % 2 == 0 and size >= 4,  # N = 2: two nodes of one rank
        "alone": False,
    }[grouping]


@pytest.fixture(params=["host", "pairs", "interleaved", "alone"])
def grouping(request) -> str:
    return request.param


@pytest.fixture
def node(comm, grouping) -> Iterator[MPI.Comm]:
    """This rank's node communicator under `grouping`, freed after the test."""
    split = split_nodes(comm, grouping)
    yield split
    split.Free()


def require_sharing(comm: MPI.Comm, node: MPI.Comm) -> None:
    """Skip (on every rank: `usable` is collective) where shared buckets cannot be built."""
    if not usable(comm, node):
        pytest.skip(f"node sizes {comm.allgather(node.Get_size())} allow no shared buckets")


@contextmanager
def shared_buckets(comm: MPI.Comm, node: MPI.Comm, dtype: str,
                   **kwargs: object) -> Iterator[SharedBuckets]:
    """SharedBuckets of LENGTHS, closed (the window freed) on the way out.

    `small_bytes=0` unless given: every bucket, however short, takes the shared path, which is
    what these tests are about (by default buckets under 128 KiB go through MPI instead).
    """
    kwargs.setdefault("small_bytes", 0)
    buckets = SharedBuckets(comm, node, list(LENGTHS), dtype, **kwargs)
    try:
        yield buckets
    finally:
        buckets.close()


# -- data and oracle --------------------------------------------------------------------------
def inputs(rank: int, length: int, dtype: str, seed: int, large: bool = True) -> np.ndarray:
    """Rank `rank`'s input as float64 values exactly representable in `dtype`."""
    rng = np.random.default_rng([rank, length, seed])
    x = rng.standard_normal(length) * (rank + 1) + rank
    if large:
        x[5::97] = LARGE + 1000 * rank  # in every share of the 300k bucket
    return torch.from_numpy(x).to(TORCH[dtype]).double().numpy()


def fill(buckets: SharedBuckets, rank: int, seed: int, large: bool = True) -> list[np.ndarray]:
    """Write this rank's inputs into every bucket; returns them (float64)."""
    data = []
    for i, tensor in enumerate(buckets.tensors):
        x = inputs(rank, tensor.numel(), buckets.dtype, 100 * seed + i, large)
        tensor.copy_(torch.from_numpy(x))
        data.append(x)
    return data


def digest(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).digest()


def errors(comm: MPI.Comm, got: torch.Tensor, mine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|got - float64 mean of every rank's input|, and the mean magnitude of those inputs."""
    # The buffer form of comm.allgather: pickling 300k float64 per rank costs 0.3 s at N = 4.
    everyone = np.empty((comm.Get_size(), mine.size))
    comm.Allgather(np.ascontiguousarray(mine, dtype=np.float64).reshape(-1), everyone)
    got64 = got.double().reshape(-1).numpy()
    return np.abs(got64 - everyone.mean(axis=0)), np.abs(everyone).mean(axis=0)


def assert_everywhere(comm: MPI.Comm, ok: bool, message: str) -> None:
    """Fail on every rank or on none: a rank failing alone would leave for the collective
    close() of its buckets while the others wait in the next check, a hang, not a report."""
    failures = [f"rank {r}: {m}" for r, (good, m) in enumerate(comm.allgather((bool(ok), message)))
                if not good]
    assert not failures, "\n".join(failures)


def within(err: np.ndarray, tol: np.ndarray) -> tuple[bool, str]:
    excess = err - tol
    worst = int(np.argmax(excess)) if excess.size else 0
    return bool(np.all(excess <= 0)), (f"worst excess {excess[worst]:.3e} at {worst}"
                                       if excess.size else "")


def check_average(comm: MPI.Comm, got: torch.Tensor, mine: np.ndarray, rtol: float,
                  where: str) -> None:
    """`got` is the mean of every rank's `mine` within rtol * m, with the same bits everywhere.

    Pass a copy, never a view of the window: pytest prints a failing frame's arguments once
    the test has ended, and by then the window is unmapped (a segfault instead of a report).
    """
    err, scale = errors(comm, got, mine)
    ok, worst = within(err, rtol * scale + 2.0**-24)  # floor: float16's smallest subnormal
    assert_everywhere(comm, ok, f"{where}: {worst}")
    digests = comm.allgather(digest(got))
    assert len(set(digests)) == 1, f"{where}: ranks hold different bits"


# -- usable and the share layout ---------------------------------------------------------------
def test_usable_needs_equal_nodes_of_more_than_one_rank(comm, grouping, node):
    got = usable(comm, node)
    assert got == expected_usable(grouping, comm.Get_size()), comm.allgather(node.Get_size())
    assert comm.allgather(got) == [got] * comm.Get_size()


def test_share_bounds_cover_the_bucket_in_aligned_near_equal_shares():
    for length in [*range(70), 1001, 300_007]:
        for parts in (1, 2, 3, 4, 7):
            for align in (1, 8, 16, 32):
                bounds = share_bounds(length, parts, align)
                where = f"length {length}, {parts} parts, align {align}: {bounds}"
                assert len(bounds) == parts, where
                assert bounds[0][0] == 0 and bounds[-1][1] == length, where
                for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
                    assert stop == start, where  # no gap, no overlap
                for start, stop in bounds:
                    assert 0 <= start <= stop <= length, where
                    assert start % align == 0, where  # so every stop but the last too
                    assert abs((stop - start) - length / parts) < align, where


def test_shm_free_bytes():
    assert shm_free_bytes("/dev/shm") > 0
    assert shm_free_bytes("/no/such/dir") is None


def test_unknown_dtype_is_an_error(comm):
    with pytest.raises(CommError, match="int8"):
        SharedBuckets(comm, comm, [3], "int8")


# -- the reduction -----------------------------------------------------------------------------
@pytest.mark.parametrize("small_bytes", [0, SMALL_BUCKET_BYTES])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("grouping", GROUPINGS_WITH_SHARING)
def test_reduce_averages_every_bucket_over_every_rank(comm, node, dtype, small_bytes):
    """With the default threshold the short buckets are private and go through MPI."""
    require_sharing(comm, node)
    rank = comm.Get_rank()
    with shared_buckets(comm, node, dtype, small_bytes=small_bytes) as buckets:
        assert [t.numel() for t in buckets.tensors] == list(LENGTHS)
        assert all(t.dtype == TORCH[dtype] for t in buckets.tensors)
        data = fill(buckets, rank, seed=1)
        for i in range(len(LENGTHS)):
            buckets.reduce(i)
        for i, (tensor, mine) in enumerate(zip(buckets.tensors, data, strict=True)):
            check_average(comm, tensor.clone(), mine, RTOL[dtype], f"{dtype} bucket {i}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grouping", GROUPINGS_WITH_SHARING)
def test_reducing_one_bucket_leaves_the_others_alone(comm, node, dtype):
    require_sharing(comm, node)
    rank = comm.Get_rank()
    with shared_buckets(comm, node, dtype) as buckets:
        for j in range(len(LENGTHS)):
            data = fill(buckets, rank, seed=10 + j)
            buckets.reduce(j)
            changed = [i for i, (tensor, mine) in enumerate(zip(buckets.tensors, data,
                                                                 strict=True))
                       if i != j and not torch.equal(tensor, torch.from_numpy(mine).to(tensor))]
            assert_everywhere(comm, not changed, f"reducing {j} changed buckets {changed}")
            check_average(comm, buckets.tensors[j].clone(), data[j], RTOL[dtype], f"bucket {j}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("grouping", ["host", "pairs"])
def test_reuse_with_new_data(comm, node, dtype):
    """A second round on the same buffers, in another order, with other data."""
    require_sharing(comm, node)
    rank = comm.Get_rank()
    with shared_buckets(comm, node, dtype, polling=True) as buckets:
        for seed, order in ((2, range(len(LENGTHS))), (3, reversed(range(len(LENGTHS))))):
            data = fill(buckets, rank, seed)
            for i in order:
                buckets.reduce(i)
            for i, (tensor, mine) in enumerate(zip(buckets.tensors, data, strict=True)):
                check_average(comm, tensor.clone(), mine, RTOL[dtype], f"round {seed}, bucket {i}")


@pytest.mark.parametrize("grouping", ["host", "pairs"])
def test_writing_a_bucket_right_after_its_reduce_is_safe(comm, node):
    """What backward does to `.grad` next step, with no pause: a rank back from reduce(i) adds
    new data into bucket i at once, while a slower peer may still copy its share from there
    (the closing barrier is what prevents it). Each round adds onto the average, so a stale
    copy in any round stays in the end result. Without the barrier this fails where ranks
    outnumber cores (N = 3, 4 on the 2-core machine)."""
    require_sharing(comm, node)
    rank, size, rounds = comm.Get_rank(), comm.Get_size(), 12
    n = LENGTHS[4]
    data = [inputs(rank, n, "float32", seed=20 + k, large=False) for k in range(rounds)]
    addends = [torch.from_numpy(x).float() for x in data]
    with shared_buckets(comm, node, "float32") as buckets:
        bucket = buckets.tensors[4]
        bucket.copy_(addends[0])
        for k in range(rounds):
            buckets.reduce(4)
            if k + 1 < rounds:
                bucket.add_(addends[k + 1])  # no check in between: that would close the race
        got = bucket.double().numpy().copy()
    # The result is the sum over rounds of each round's mean; m is now the mean over ranks of
    # sum over rounds of |x|, and every round adds its own roundings.
    mine = np.stack([np.sum(data, axis=0), np.sum(np.abs(data), axis=0)])
    everyone = np.empty((size, *mine.shape))
    comm.Allgather(mine, everyone)
    err = np.abs(got - everyone[:, 0].mean(axis=0))
    assert_everywhere(comm, *within(err, rounds * RTOL["float32"] * everyone[:, 1].mean(axis=0)))
    digests = comm.allgather(hashlib.sha256(got.tobytes()).digest())
    assert len(set(digests)) == 1, "ranks hold different bits"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grouping", ["host", "pairs"])
def test_polling_gives_the_same_bits(comm, node, dtype):
    require_sharing(comm, node)
    rank = comm.Get_rank()
    with shared_buckets(comm, node, dtype) as blocking, \
            shared_buckets(comm, node, dtype, polling=True) as polling:
        data = fill(blocking, rank, seed=4)
        fill(polling, rank, seed=4)
        for i in range(len(LENGTHS)):
            blocking.reduce(i)
            polling.reduce(i)
        differ = [i for i, (a, b) in enumerate(zip(blocking.tensors, polling.tensors,
                                                   strict=True))
                  if not torch.equal(a.view(torch.uint8), b.view(torch.uint8))]
        assert_everywhere(comm, not differ, f"polling changed the bits of buckets {differ}")
        check_average(comm, polling.tensors[4].clone(), data[4], RTOL[dtype], "polling, 300k")


@pytest.mark.parametrize("dtype,wire", [("float32", "float16"), ("bfloat16", "bfloat16")])
@pytest.mark.parametrize("grouping", GROUPINGS_WITH_SHARING)
def test_wire_compression_applies_across_nodes_only(comm, node, dtype, wire):
    """On one node nothing travels, so `wire` changes nothing; across nodes it rounds each hop."""
    require_sharing(comm, node)
    rank, size = comm.Get_rank(), comm.Get_size()
    nodes = size // node.Get_size()
    with shared_buckets(comm, node, dtype, wire=wire) as buckets:
        data = fill(buckets, rank, seed=5, large=False)  # partial sums stay in float16 range
        for i in range(len(LENGTHS)):
            buckets.reduce(i)
        plain = RTOL[dtype]
        rtol = plain + (nodes + 1) * UNIT[wire] if nodes > 1 else plain
        for i, (tensor, mine) in enumerate(zip(buckets.tensors, data, strict=True)):
            check_average(comm, tensor.clone(), mine, rtol,
                          f"{nodes} node(s), wire {wire}, bucket {i}")
        if nodes > 1 and dtype == "float32":  # the 16-bit wire shows: beyond float32's error
            err, scale = errors(comm, buckets.tensors[4].clone(), data[4])
            traced = bool(np.any(err > plain * scale))
            assert comm.allgather(traced) == [True] * size, "the float16 wire left no trace"


# -- GradSync on emulated nodes -----------------------------------------------------------------
class Net(nn.Module):
    """Odd widths, and a layer forward never uses (its gradients must average to zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(11, 29)
        self.outer = nn.Linear(29, 5)
        self.idle = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.relu(self.inner(x)))


def grad_or_zeros(p: nn.Parameter) -> torch.Tensor:
    """A parameter's gradient before the sync; one backward did not reach (None) is zeros."""
    return torch.zeros_like(p) if p.grad is None else p.grad


def backward(model: nn.Module, rank: int, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(5 + 2 * rank, 11, generator=gen) * (1 + rank)
    model(x).square().sum().backward()


@pytest.mark.parametrize("bucket_mb", [0.0001, 4.0])  # 4 buckets, 1
@pytest.mark.parametrize("overlap", [True, False])
def test_grad_sync_on_emulated_nodes_and_close_keeps_the_grads(overlap, bucket_mb):
    world = World()
    node = world.comm.Split(world.rank // 2, world.rank)  # nodes of two ranks
    try:
        torch.manual_seed(world.rank)  # different weights: GradSync broadcasts rank 0's
        model = Net()
        with GradSync(world, model, bucket_mb=bucket_mb, overlap=overlap, algorithm="auto",
                      node_comm=node) as sync:
            shared = bool(sync._shared)  # private, but nothing public tells which path runs
            assert shared == (world.size % 2 == 0), "shared buckets where nodes are equal"
            if bucket_mb < 0.01:
                assert len(sync.buckets) == 4
            for step in range(2):
                backward(model, world.rank, step)
                mine = {n: grad_or_zeros(p).double().numpy().copy()
                        for n, p in model.named_parameters()}
                sync.finish()
                for n, p in model.named_parameters():
                    check_average(world.comm, p.grad.detach().clone(), mine[n], RTOL["float32"],
                                  f"step {step}, {n}")
                assert not model.idle.weight.grad.any()
                if step == 0:
                    sync.zero_grad()
            before = {n: (p.grad.clone(), p.grad.data_ptr()) for n, p in model.named_parameters()}
        # The window is freed: every .grad must be a copy of what it held, in memory of its own.
        # (Addresses are compared first, as plain ints: reading, or letting pytest print, a
        # tensor left in the unmapped window would crash the rank instead of failing the test.)
        problems = []
        for n, p in model.named_parameters():
            grad, pointer = before[n]
            if p.grad is None:
                problems.append(f"{n}.grad is None")
            elif shared and p.grad.data_ptr() == pointer:
                problems.append(f"{n}.grad still points into the freed window")
            elif not torch.equal(p.grad, grad):
                problems.append(f"{n}.grad changed")
            else:
                p.grad.add_(1.0)  # and it is writable
        assert_everywhere(world.comm, not problems, "; ".join(problems))
    finally:
        node.Free()
        world.close()


def test_too_little_shared_memory_on_one_rank_falls_back_to_the_ring_everywhere(
        monkeypatch, capfd):
    """A small /dev/shm (docker's default is 64 MiB) would crash a rank with SIGBUS when it
    first touched the window. If any rank sees too little room, every rank keeps private
    buckets (the collective pattern must agree), rank 0 says why, and gradients still average."""
    world = World()
    try:
        if world.size == 1 or not usable(world.comm, world.node_comm):
            pytest.skip("needs ranks that share a node")
        if world.rank == world.size - 1:
            monkeypatch.setattr(shm, "shm_free_bytes", lambda path=shm.SHM_DIR: 0)
        torch.manual_seed(world.rank)
        model = Net()
        with GradSync(world, model, overlap=False, algorithm="auto") as sync:
            assert_everywhere(world.comm, not sync._shared, "shared buckets despite no room")
            backward(model, world.rank, 0)
            mine = {n: grad_or_zeros(p).double().numpy().copy()
                    for n, p in model.named_parameters()}
            sync.finish()
            for n, p in model.named_parameters():
                check_average(world.comm, p.grad.detach().clone(), mine[n], RTOL["float32"], n)
        warned = "too little free space" in capfd.readouterr().err
        assert_everywhere(world.comm, warned == world.is_root,
                          f"rank {world.rank}: warning printed = {warned}")
    finally:
        world.close()
