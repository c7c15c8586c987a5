"""Calls that differ between ranks raise HorovodInternalError on every rank, naming what
differed; none hangs, and the next collective works."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpiml.horovod.torch as hvd

# A mismatch needs two ranks that disagree (the suite runs at N = 2 and 3).
needs_peers = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() < 2, reason="one rank cannot disagree")


def expect_error(fn, *fragments: str) -> str:
    with pytest.raises(hvd.HorovodInternalError) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    # The engine is still in step on every rank.
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == hvd.size()
    return message


@needs_peers
def test_shape_mismatch_names_the_shapes_and_ranks():
    r = hvd.rank()
    message = expect_error(lambda: hvd.allreduce(torch.ones(2, 3 + (r == 1))), "shape",
                           "rank 1", "[2, 4]", "[2, 3]")
    assert "allreduce" in message


@needs_peers
def test_dtype_mismatch():
    r = hvd.rank()
    dtype = torch.float64 if r == hvd.size() - 1 else torch.float32
    expect_error(lambda: hvd.allreduce(torch.ones(4, dtype=dtype)), "dtype", "float64",
                 "float32")


@needs_peers
def test_reduction_op_mismatch():
    r = hvd.rank()
    expect_error(lambda: hvd.allreduce(torch.ones(4), op=hvd.Max if r == 0 else hvd.Sum),
                 "reduction op", "Max", "Sum")


@needs_peers
def test_broadcast_root_mismatch():
    r = hvd.rank()
    expect_error(lambda: hvd.broadcast_(torch.ones(3), root_rank=min(r, 1)), "root rank")


@needs_peers
def test_different_collectives():
    r = hvd.rank()

    def call():
        if r == 0:
            hvd.allgather(torch.ones(2, 2))
        else:
            hvd.allreduce(torch.ones(2, 2))

    expect_error(call, "operation", "allgather", "allreduce")


@needs_peers
def test_allgather_trailing_dimension_mismatch():
    r = hvd.rank()
    expect_error(lambda: hvd.allgather(torch.ones(r + 1, 2 + (r > 0))), "shape")


@needs_peers
def test_scale_factor_and_name_mismatch():
    r = hvd.rank()
    expect_error(lambda: hvd.allreduce(torch.ones(2), postscale_factor=1.0 + r),
                 "postscale factor")
    expect_error(lambda: hvd.allreduce(torch.ones(2), name=f"grad.{r}"), "name", "grad.0",
                 "grad.1")


@needs_peers
def test_local_error_on_one_rank_is_raised_everywhere():
    n, r = hvd.size(), hvd.rank()
    splits = [1] * n if r != 1 else [5] * n  # wrong on rank 1 only: they don't add up
    expect_error(lambda: hvd.alltoall(torch.ones(n, 2), splits=splits), "rank 1",
                 "splits")
    expect_error(lambda: hvd.broadcast(torch.ones(1), root_rank=n + r), "root_rank")


def test_unsupported_dtype_is_an_error_on_every_rank():
    expect_error(lambda: hvd.allreduce(torch.ones(2, dtype=torch.bool)), "bool")
    expect_error(lambda: hvd.allreduce(torch.ones(2, dtype=torch.complex64)), "complex64")


@needs_peers
def test_async_mismatch_raises_at_synchronize():
    r = hvd.rank()
    handle = hvd.allreduce_async(torch.ones(3 + r))
    with pytest.raises(hvd.HorovodInternalError, match="shape"):
        hvd.synchronize(handle)
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == hvd.size()


def test_operations_before_init_raise_a_clear_error():
    hvd.shutdown()
    try:
        assert not hvd.is_initialized()
        with pytest.raises(ValueError, match=r"hvd\.init\(\)"):
            hvd.allreduce(torch.ones(1))
        with pytest.raises(ValueError, match="not been initialized"):
            hvd.rank()
    finally:
        hvd.init()
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == hvd.size()


def test_init_with_a_communicator_or_a_list_of_ranks():
    n, r = hvd.size(), hvd.rank()
    hvd.shutdown()
    halves = MPI.COMM_WORLD.Split(r % 2, r)
    try:
        hvd.init(comm=halves)
        members = [k for k in range(n) if k % 2 == r % 2]
        assert hvd.size() == len(members) and hvd.rank() == members.index(r)
        got = hvd.allreduce(torch.tensor([float(r)]), op=hvd.Sum).item()
        assert got == sum(members)
        hvd.shutdown()
        hvd.init(comm=list(range(n)))
        assert (hvd.size(), hvd.rank()) == (n, r)
    finally:
        hvd.shutdown()
        halves.Free()
        hvd.init()
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == n
