"""The ring allreduce against numpy, with rank-dependent data and awkward lengths."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mpiml.comm.ring import check_same_length, chunk_offsets, ring_allreduce, scratch_length
from mpiml.errors import CommError

pytestmark = pytest.mark.mpi


def rank_data(rank: int, length: int, dtype) -> np.ndarray:
    """Distinct per rank and per position, so a chunk landing in the wrong place shows."""
    rng = np.random.default_rng([rank, length])
    return (rng.standard_normal(length) * (rank + 1) + rank).astype(dtype)


def lengths(size: int) -> list[int]:
    return sorted({0, 1, max(size - 1, 0), size, size + 1, 2 * size + 3, 1_000_003})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ring_matches_numpy_and_is_identical_everywhere(comm, dtype):
    size, rank = comm.Get_size(), comm.Get_rank()
    for length in lengths(size):
        buf = rank_data(rank, length, dtype)
        scratch = np.empty(scratch_length(length, size), dtype=dtype)
        ring_allreduce(comm, buf, scratch)
        expected = sum(rank_data(r, length, np.float64) for r in range(size))
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(buf, expected, rtol=tol, atol=tol * size * 4,
                                   err_msg=f"length {length}")
        digest = hashlib.sha256(buf.tobytes()).hexdigest()
        assert len(set(comm.allgather(digest))) == 1, f"ranks differ at length {length}"


def test_ring_allocates_scratch_when_none_given(comm):
    buf = rank_data(comm.Get_rank(), 37, np.float32)
    expected = sum(rank_data(r, 37, np.float64) for r in range(comm.Get_size()))
    ring_allreduce(comm, buf)
    np.testing.assert_allclose(buf, expected, rtol=1e-5, atol=1e-4)


def test_ring_rejects_small_scratch(comm):
    if comm.Get_size() == 1:
        pytest.skip("one rank never needs scratch")
    buf = np.ones(100, dtype=np.float32)
    with pytest.raises(CommError, match="too small"):
        ring_allreduce(comm, buf, np.empty(1, dtype=np.float32))


def test_length_mismatch_is_an_error_on_every_rank(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    check_same_length(comm, np.zeros(10, dtype=np.float32))  # equal: no error
    if size == 1:
        return
    with pytest.raises(CommError, match="differ across ranks"):
        check_same_length(comm, np.zeros(10 + rank, dtype=np.float32))


@pytest.mark.parametrize("length,size", [(0, 3), (2, 3), (10, 4), (11, 4), (7, 1)])
def test_chunks_cover_the_buffer(length, size):
    offsets = chunk_offsets(length, size)
    counts = np.diff(offsets)
    assert offsets[0] == 0 and offsets[-1] == length
    assert counts.max() - counts.min() <= 1
