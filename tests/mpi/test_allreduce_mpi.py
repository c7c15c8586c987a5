"""`Allreducer` against a float64 numpy oracle, on every algorithm, dtype and wire type.

Each rank fills its buffer from a seed of (rank, length); every rank regenerates all ranks'
inputs to build the float64 reference sum. Results must also be bitwise identical on all ranks.

Tolerances, elementwise, with S = sum over ranks of |x_r| and eps the unit roundoff (half an
ulp at 1.0) of the type named:
  float64, float32        (N + 1) * eps(type) * S     N-1 additions, then no rounding
  half, float32 wire      eps(half) * S + (N + 1) * eps(float32) * S   one final rounding
  half wire (compressed)  (N + 1) * eps(half) * S     a rounding after each of N-1 hops
                                                      (+ the inputs' own rounding from float32)
"""

from __future__ import annotations

import functools
import hashlib
import time
import tracemalloc

import numpy as np
import pytest
import torch

from mpiml.comm import staged
from mpiml.comm.allreduce import Allreducer
from mpiml.comm.ring import (
    pipelined_ring_allreduce,
    pipelined_scratch_length,
    segment_bounds,
)
from mpiml.errors import CommError

pytestmark = pytest.mark.mpi

EPS = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
TINY_SEGMENT = 64  # bytes: a few hundred elements span many segments


def lengths(size: int) -> list[int]:
    """Empty, shorter than the world, around it, several tiny segments, and large and odd."""
    return sorted({0, 1, max(size - 1, 0), size, size + 1, 37 * size + 5, 1_000_003})


@functools.lru_cache(maxsize=64)
def inputs(rank: int, length: int, dtype: str) -> np.ndarray:
    """Rank `rank`'s input as float64 values exactly representable in `dtype` (read-only)."""
    rng = np.random.default_rng([rank, length])
    x = rng.standard_normal(length) * (rank + 1) + rank
    if dtype == "float16":
        x = x.astype(np.float16).astype(np.float64)
    elif dtype == "bfloat16":
        x = torch.from_numpy(x).to(torch.bfloat16).double().numpy()
    else:
        x = x.astype(dtype).astype(np.float64)
    x.flags.writeable = False
    return x


@functools.lru_cache(maxsize=32)
def oracle(size: int, length: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 sum of every rank's input, and the sum of their magnitudes."""
    everyone = [inputs(r, length, dtype) for r in range(size)]
    if not length:
        return np.zeros(0), np.zeros(0)
    return np.sum(everyone, axis=0), np.sum(np.abs(everyone), axis=0)


def to_buffer(values: np.ndarray, dtype: str) -> np.ndarray:
    """The buffer a caller would pass: numpy array, or bfloat16 bits as int16."""
    if dtype == "bfloat16":
        return torch.tensor(values).to(torch.bfloat16).view(torch.int16).numpy()
    return values.astype(dtype)


def from_buffer(buf: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(buf).view(torch.bfloat16).double().numpy()
    return buf.astype(np.float64)


def tolerance(dtype: str, wire: str | None, size: int, sum_abs: np.ndarray) -> np.ndarray:
    wire_kind = wire or ("float32" if dtype in ("float16", "bfloat16") else dtype)
    if wire_kind in ("float16", "bfloat16"):
        return (size + 1) * EPS[wire_kind] * sum_abs
    tol = (size + 1) * EPS[wire_kind] * sum_abs
    if dtype != wire_kind:  # one final rounding to the half type
        tol = tol + EPS[dtype] * sum_abs
    return tol


def check(comm, reducer: Allreducer, dtype: str, wire: str | None, length: int,
          average: bool = False) -> None:
    size, rank = comm.Get_size(), comm.Get_rank()
    buf = to_buffer(inputs(rank, length, dtype), dtype)
    reducer(buf)
    expected, sum_abs = oracle(size, length, dtype)
    if average:
        expected, sum_abs = expected / size, sum_abs / size
    got = from_buffer(buf, dtype)
    err = np.abs(got - expected)
    tol = tolerance(dtype, wire, size, sum_abs)
    where = (f"{reducer.config.algorithm}/{dtype}/wire={wire}/seg={reducer.config.segment_bytes}"
             f" length {length}")
    assert np.all(err <= tol), f"{where}: worst error {np.max(err - tol)} over tolerance"
    # The bytes themselves for short buffers, a SHA-256 of them for long ones.
    mine = buf.tobytes() if buf.nbytes <= 4096 else hashlib.sha256(buf.tobytes()).digest()
    everyone_bytes = comm.allgather(mine)
    assert all(b == everyone_bytes[0] for b in everyone_bytes), f"{where}: ranks differ"


_made: list[Allreducer] = []


def build(comm, *args, **kwargs) -> Allreducer:
    """An Allreducer that `close_reducers` frees after the test (shared slots are a window,
    and freeing a window is collective)."""
    made = Allreducer(comm, *args, **kwargs)
    _made.append(made)
    return made


@pytest.fixture(autouse=True)
def close_reducers():
    yield
    while _made:  # newest first, the same order on every rank
        _made.pop().close()


CASES = [  # (algorithm, dtype, wire)
    *[(alg, dt, None) for alg in ("ring", "doubling", "mpi", "auto", "staged")
      for dt in ("float32", "float64", "float16", "bfloat16")],
    *[(alg, dt, dt) for alg in ("ring", "doubling", "auto") for dt in ("float16", "bfloat16")],
    *[(alg, "float32", w) for alg in ("ring", "doubling", "auto") for w in ("float16", "bfloat16")],
]


@pytest.mark.parametrize("algorithm,dtype,wire", CASES)
def test_matches_float64_sum_and_is_identical_everywhere(comm, algorithm, dtype, wire):
    size = comm.Get_size()
    if algorithm == "doubling" and size & (size - 1):
        with pytest.raises(CommError, match="power-of-two"):
            Allreducer(comm, 10, dtype, algorithm=algorithm, wire=wire)
        return
    big = build(comm, 1_000_003, dtype, algorithm=algorithm, wire=wire)
    tiny = build(comm, 1_000_003, dtype, algorithm=algorithm, wire=wire,
                      segment_bytes=TINY_SEGMENT, small_threshold_bytes=0)
    for length in lengths(size):
        check(comm, big, dtype, wire, length)
        if length < 1000:  # many segments per chunk, and "auto" forced onto the ring
            check(comm, tiny, dtype, wire, length)


@pytest.mark.parametrize("algorithm", ["auto", "ring", "mpi", "staged"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_average(comm, algorithm, dtype):
    reducer = build(comm, 5000, dtype, algorithm=algorithm, average=True,
                         segment_bytes=TINY_SEGMENT * 16)
    for length in (1, comm.Get_size() + 1, 4099):
        check(comm, reducer, dtype, None, length, average=True)


@pytest.mark.parametrize("algorithm", ["auto", "ring", "doubling", "mpi", "staged"])
@pytest.mark.parametrize("dtype,wire", [("float32", None), ("float64", None),
                                        ("bfloat16", None), ("float32", "float16")])
def test_polling_waits_give_the_same_result(comm, algorithm, dtype, wire):
    """The communication thread's mode: test-and-sleep waits, Iallreduce on the MPI path."""
    size = comm.Get_size()
    if (algorithm == "doubling" and size & (size - 1)) or (algorithm in ("mpi", "staged")
                                                          and wire):
        pytest.skip("combination rejected at construction (tested above)")
    reducer = build(comm, 1_000_003, dtype, algorithm=algorithm, wire=wire, polling=True)
    tiny = build(comm, 5000, dtype, algorithm=algorithm, wire=wire, polling=True,
                      segment_bytes=TINY_SEGMENT, small_threshold_bytes=0, average=True)
    for length in lengths(size):
        check(comm, reducer, dtype, wire, length)
        if length < 5000:
            check(comm, tiny, dtype, wire, length, average=True)


def test_bfloat16_bits_may_be_uint16(comm):
    reducer = build(comm, 100, "bfloat16", algorithm="ring")
    buf = to_buffer(inputs(comm.Get_rank(), 100, "bfloat16"), "bfloat16").view(np.uint16)
    reducer(buf)
    expected = sum(inputs(r, 100, "bfloat16") for r in range(comm.Get_size()))
    np.testing.assert_allclose(from_buffer(buf.view(np.int16), "bfloat16"), expected,
                               rtol=2 * EPS["bfloat16"], atol=1e-6)


@pytest.mark.parametrize("window", [1, 3])
def test_pipelined_ring_other_windows(comm, window):
    size, rank = comm.Get_size(), comm.Get_rank()
    for length in (size + 1, 1001):
        bounds = segment_bounds(length, size, 7)
        scratch = np.empty(pipelined_scratch_length(bounds, window), dtype=np.float64)
        buf = inputs(rank, length, "float64").copy()
        pipelined_ring_allreduce(comm, buf, scratch, bounds, window=window)
        expected = sum(inputs(r, length, "float64") for r in range(size))
        np.testing.assert_allclose(buf, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["auto", "ring", "staged"])
@pytest.mark.parametrize("dtype,wire", [("float32", None), ("bfloat16", None),
                                        ("float16", "float16"), ("float32", "bfloat16")])
def test_hot_path_allocates_no_array(comm, algorithm, dtype, wire):
    """After a first call, a call on a 4 MB buffer allocates under 64 KiB in Python/numpy."""
    if algorithm == "staged" and wire:
        pytest.skip("compression is rejected for 'staged' (tested below)")
    n = 1_000_003
    reducer = build(comm, n, dtype, algorithm=algorithm, wire=wire)
    buf = to_buffer(inputs(comm.Get_rank(), n, dtype), dtype)
    reducer(buf)  # first call caches the segment layout for this length
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        reducer(buf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 64 * 1024, f"a call allocated {peak - before} bytes"


def test_misuse_is_an_error(comm):
    reducer = build(comm, 10, "float32")
    with pytest.raises(CommError, match="max_elements"):
        reducer(np.zeros(11, dtype=np.float32))
    with pytest.raises(CommError, match="float64"):
        reducer(np.zeros(5, dtype=np.float64))
    with pytest.raises(CommError, match="algorithm"):
        Allreducer(comm, 10, algorithm="tree")
    with pytest.raises(CommError, match="wire"):
        Allreducer(comm, 10, "float64", wire="float16")
    with pytest.raises(CommError, match="compression"):
        Allreducer(comm, 10, "float16", algorithm="mpi", wire="float16")
    with pytest.raises(CommError, match="compression.*'staged' sends nothing"):
        Allreducer(comm, 10, "float32", algorithm="staged", wire="bfloat16")


def test_ranks_configured_differently_fail_together(comm):
    if comm.Get_size() == 1:
        pytest.skip("needs two ranks to disagree")
    with pytest.raises(CommError, match="rank 0"):
        Allreducer(comm, 10 + comm.Get_rank(), "float32")


def test_auto_stages_mid_sizes_on_one_node(comm):
    """On one node "auto" stages from 128 KiB, times staged against the ring (and doubling at
    1 MiB) from 1 MiB to 16 MiB and keeps the fastest, the same choice on every rank; MPI
    below, the ring above.
    Every call matches the oracle and is identical on every rank, whichever algorithm ran."""
    size = comm.Get_size()
    reducer = build(comm, (16 << 20) // 4 + 1, "float32")
    low, tuned, high = staged.STAGED_MIN_BYTES, staged.TUNED_MIN_BYTES, staged.STAGED_MAX_BYTES
    if size == 1:
        assert reducer._staged is None
        return
    got = [reducer.algorithm_for(n) for n in (low - 4, low, tuned - 4, high + 4)]
    assert got == ["mpi", "staged", "staged", "ring"]
    tuner = reducer._tuner
    for call in range(3 * tuner.trials + 2):  # one round, then two calls of the choice
        check(comm, reducer, "float32", None, tuned // 4 + 1 + call % 3)
    choices = comm.allgather(reducer.algorithm_for(tuned))
    assert choices[0] in tuner.candidates(tuned) and choices == [choices[0]] * size, choices
    assert ("doubling" in tuner.candidates(tuned)) == (size & (size - 1) == 0)


def test_tuner_alternates_then_keeps_the_faster_and_times_again():
    """No MPI needed: the schedule, the agreement hook and the choice it makes."""
    from mpiml.comm.allreduce import _Tuner

    tuner = _Tuner(trials=3, every=10)
    agreed = []
    seconds = {"staged": 2.0, "ring": 1.0}  # the ring is faster at first

    def agree(times):
        agreed.append(times.copy())

    ran = []
    for call in range(16):
        algorithm = tuner.next(1 << 20)
        ran.append(algorithm)
        if call == 10:
            seconds = {"staged": 0.5, "ring": 1.0}  # the machine changes
        # the first call of each algorithm in a round is slow, and not counted
        slow = 100.0 if call % 10 in (0, 1) else 1.0
        tuner.record(1 << 20, algorithm, seconds[algorithm] * slow, agree)
    assert ran[:6] == ["staged", "ring"] * 3  # round 1
    assert ran[6:10] == ["ring"] * 4  # the faster
    assert ran[10:16] == ["staged", "ring"] * 3  # round 2, `every` calls after the first
    assert [list(a) for a in agreed] == [[2.0, 1.0], [0.5, 1.0]]
    assert tuner.choice(1 << 20) == "staged"
    assert tuner.choice(4 << 20) == "staged"  # another size class, not timed yet

    three = _Tuner(doubling_below=2 << 20, trials=2, every=100)
    seconds = {"staged": 3.0, "ring": 2.0, "doubling": 1.0}
    ran = []
    for _ in range(8):
        algorithm = three.next(1 << 20)
        ran.append(algorithm)
        three.record(1 << 20, algorithm, seconds[algorithm], agree)
    assert ran == ["staged", "ring", "doubling"] * 2 + ["doubling"] * 2
    assert list(agreed[-1]) == [3.0, 2.0, 1.0]
    assert three.next(2 << 20) == "staged" and three.candidates(2 << 20) == ("staged", "ring")


def test_staged_calls_back_to_back_with_uneven_ranks(comm):
    """The two slot sets let a rank start its next call while a peer still copies out of the
    last: with one rank late in turn, every call's sum is still right on every rank."""
    rank, size = comm.Get_rank(), comm.Get_size()
    reducer = build(comm, 300_012, "float64", algorithm="staged", average=True)
    for call in range(12):
        if rank == call % size:
            time.sleep(0.01)
        check(comm, reducer, "float64", None, (1000, 300_001, 77)[call % 3] + call,
              average=True)


def test_staged_without_room_in_dev_shm(comm, monkeypatch):
    """No room for the slots: "auto" keeps MPI and the ring, "staged" is an error on every rank
    that says what to use instead."""
    monkeypatch.setattr(staged, "shm_free_bytes", lambda path=staged.SHM_DIR: 0)
    reducer = build(comm, 1 << 20, "float32")
    assert reducer.algorithm_for(1 << 20) == "ring"
    check(comm, reducer, "float32", None, 1 << 18)
    if comm.Get_size() > 1:
        with pytest.raises(CommError, match="one node.*/dev/shm.*'auto'"):
            Allreducer(comm, 1 << 20, "float32", algorithm="staged")
