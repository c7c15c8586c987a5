"""Ring allreduce on flat buffers, written on mpi4py's buffer calls.

Why our own: MPI libraries allocate a fresh temporary per large `Allreduce` and pay thousands of
page faults per call; a ring over buffers allocated once takes none and runs near memory
bandwidth. Below ~128 KiB MPI's latency-tuned algorithms win, so callers choose (see `sync.py`).

The algorithm (N ranks, a buffer of K elements cut into N chunks c0..c{N-1} of near-equal
length; the first K mod N chunks are one element longer, so any K >= 0 works, even K < N)::

    reduce-scatter, N-1 steps. At step s rank r sends chunk (r - s) mod N to rank r+1 and
    receives chunk (r - s - 1) mod N from rank r-1, adding it into its own copy:

        step 0:  r0 --c0--> r1 --c1--> r2 --c2--> r0        (N = 3)
        step 1:  r0 --c2--> r1 --c0--> r2 --c1--> r0

    Afterwards rank r holds the complete sum of chunk (r + 1) mod N.

    allgather, N-1 steps. At step s rank r sends chunk (r + 1 - s) mod N (complete) and
    receives chunk (r - s) mod N straight into place: every rank ends with every sum.

Each finished chunk is summed by exactly one rank and then copied, so every rank holds the
same bits. Each rank sends and receives 2(N-1)/N * K elements in all, independent of N for
large N: bandwidth-optimal. Latency is 2(N-1) message steps, which is why small buffers go
to MPI's own Allreduce instead.

The only extra memory is a scratch buffer of one chunk (ceil(K/N) elements), owned by the
caller so the hot path allocates nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from mpi4py import MPI

from mpiml.errors import CommError

_TAG = 0x6D70  # "mp": keeps ring traffic apart from anything else on the communicator


def chunk_offsets(length: int, size: int) -> np.ndarray:
    """Offsets (size + 1 of them) cutting `length` elements into `size` near-equal chunks."""
    base, extra = divmod(length, size)
    counts = np.full(size, base, dtype=np.int64)
    counts[:extra] += 1
    return np.concatenate(([0], np.cumsum(counts)))


def scratch_length(length: int, size: int) -> int:
    """Elements of scratch that `ring_allreduce` needs for a buffer of `length`."""
    return -(-length // size) if size > 0 else 0


def check_same_length(comm: MPI.Comm, buf: np.ndarray) -> None:
    """Raise CommError on every rank unless all ranks pass buffers of one length and dtype.

    Costs one small allgather; used at setup and in tests, not on the hot path.
    """
    mine = (int(buf.size), buf.dtype.str)
    everyone = comm.allgather(mine)
    if any(other != everyone[0] for other in everyone):
        detail = ", ".join(f"rank {r}: {n} x {d}" for r, (n, d) in enumerate(everyone))
        raise CommError(
            f"ring allreduce buffers differ across ranks ({detail}); every rank must pass "
            "the same length and dtype"
        ).agreed()


def ring_allreduce(comm: MPI.Comm, buf: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """Sum `buf` across all ranks of `comm`, in place.

    `buf` must be a contiguous 1-D numpy array (a torch tensor's `.numpy()` view works);
    `scratch` at least `scratch_length(buf.size, comm.size)` elements of the same dtype.
    """
    size = comm.Get_size()
    if size == 1 or buf.size == 0:
        return
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise CommError("ring_allreduce needs a contiguous 1-D buffer")
    if scratch is None:
        scratch = np.empty(scratch_length(buf.size, size), dtype=buf.dtype)
    elif scratch.dtype != buf.dtype or scratch.size < scratch_length(buf.size, size):
        raise CommError(
            f"scratch of {scratch.size} x {scratch.dtype} is too small for a buffer of "
            f"{buf.size} x {buf.dtype} on {size} ranks"
        )
    rank = comm.Get_rank()
    right, left = (rank + 1) % size, (rank - 1) % size
    offsets = chunk_offsets(buf.size, size)

    def chunk(index: int) -> np.ndarray:
        index %= size
        return buf[offsets[index]:offsets[index + 1]]

    for step in range(size - 1):  # reduce-scatter
        send, target = chunk(rank - step), chunk(rank - step - 1)
        incoming = scratch[: target.size]
        comm.Sendrecv(send, right, _TAG, incoming, left, _TAG)
        np.add(target, incoming, out=target)
    for step in range(size - 1):  # allgather
        comm.Sendrecv(chunk(rank + 1 - step), right, _TAG, chunk(rank - step), left, _TAG)


# -- the pipelined ring ---------------------------------------------------------------------
#
# The same schedule as `ring_allreduce`, cut finer: every chunk is split into segments of at
# most `segment` elements, and each segment travels the 2(N-1) steps on its own. Step t (0-based;
# t < N-1 is reduce-scatter, the rest allgather) sends chunk (r - t) mod N and receives chunk
# (r - t - 1) mod N, the chunk the next step sends. So as soon as segment j of step t has
# arrived (and been added), segment j of step t+1 can leave, while segment j+1 of step t is
# still on its way:
#
#     time ->     seg 0            seg 1            seg 2
#     step 0   recv, add  ---->  recv, add  ---->  recv, add
#     step 1        send, recv(, add) -> send, recv(, add) -> ...
#
# Three things come of it. The add of a segment overlaps the transfer of the next one (the
# peer copies while we add); the allgather of early segments overlaps the reduce-scatter of
# late ones; and a segment that was just received and added is still in cache when it is sent
# on. For the cache to help, reduce-scatter receives go into a small ring of `window` scratch
# slots and at most `window` of them are posted at a time: posting all of them at once lets
# MPI land the whole chunk in scratch long before we add it, and scratch falls out of cache
# (measured at N=2, 64 MiB, in one run: 11.3 ms with every receive posted up front, 8.4 ms
# with a window of 2).
#
# Allgather data goes straight into `buf`; before posting that receive we wait for our own
# earlier send out of the same place (step t+2-N, same segment), as MPI requires. Each step
# has its own tag, and within a step both sides post segments in the same order with the same
# lengths, so messages match even though receives run ahead of sends by up to `window`.
#
# Every finished segment is combined by exactly one rank (its chunk's owner after the last
# reduce-scatter step) and then only copied, so all ranks hold the same bits.

Combine = Callable[[np.ndarray, np.ndarray, bool], None]
Wait = Callable[[MPI.Request], None]
_STEP_TAG = 0x100  # step t of the pipelined ring uses tag _STEP_TAG + t
DEFAULT_WINDOW = 2
_YIELD_S = 1e-3  # how long `polling_wait` yields before it sleeps


def blocking_wait(request: MPI.Request) -> None:
    """MPI's own wait: the fastest when this thread has a core to itself (it spins)."""
    request.Wait()


def polling_wait(request: MPI.Request) -> None:
    """Test and yield the core, then test and sleep, until `request` completes.

    Why: MPI's blocking wait spins. In a communication thread that shares its core with the
    compute thread (one core per rank, the usual HPC layout), a spinning wait for a peer that
    is still in its backward pass takes that core away from our own backward pass, and the
    peer's transfer in turn waits for a time slice: measured on the 2-core machine at N = 2,
    a 16 MiB ring allreduce next to a matmul loop took 48 ms with spinning waits against
    about 10 ms with this one (3.5 ms alone). Each test also drives MPI's progress.

    The first `_YIELD_S` of a wait only yield (`sched_yield` hands the core to a runnable
    thread and returns at once when there is none), because a sleep, however short it is
    asked to be, lasts 100-240 us here (the kernel's timer slack): a cost on every barrier
    of a shared-memory bucket whose peer arrives a few microseconds later.
    """
    if request.Test():
        return
    deadline = time.perf_counter() + _YIELD_S
    while time.perf_counter() < deadline:
        os.sched_yield()
        if request.Test():
            return
    delay = 5e-6
    while not request.Test():
        time.sleep(delay)
        delay = min(2 * delay, 1e-4)


def add_into(target: np.ndarray, incoming: np.ndarray, last: bool) -> None:
    """Default combine: target += incoming, in target's dtype."""
    np.add(target, incoming, out=target)


def segment_bounds(length: int, size: int, segment: int) -> list[list[tuple[int, int]]]:
    """For each of `size` chunks of a `length` buffer, its segments as (start, stop) pairs.

    An empty chunk (length < size) still gets one empty segment, so every step sends one
    message per segment on both sides.
    """
    offsets = chunk_offsets(length, size).tolist()
    bounds = []
    for c in range(size):
        lo, hi = offsets[c], offsets[c + 1]
        bounds.append([(a, min(a + segment, hi)) for a in range(lo, hi, segment)] or [(lo, hi)])
    return bounds


def pipelined_scratch_length(bounds: Sequence[Sequence[tuple[int, int]]],
                             window: int = DEFAULT_WINDOW) -> int:
    """Elements of scratch `pipelined_ring_allreduce` needs for this layout."""
    longest = max(b - a for chunk in bounds for a, b in chunk)
    return window * longest


def pipelined_ring_allreduce(
    comm: MPI.Comm,
    buf: np.ndarray,
    scratch: np.ndarray,
    bounds: Sequence[Sequence[tuple[int, int]]],
    combine: Combine = add_into,
    window: int = DEFAULT_WINDOW,
    wait: Wait = blocking_wait,
) -> None:
    """Sum `buf` across `comm` in place with the segmented, pipelined ring described above.

    `bounds` is `segment_bounds(buf.size, comm.size, segment)` (callers cache it per length);
    `scratch` holds `window` segments (`pipelined_scratch_length`) of `buf`'s dtype.
    `combine(target, incoming, last)` folds a received segment into ours; `last` is True on
    the final reduce-scatter step, where the caller may also scale (averaging) or round.
    `wait` completes one request (`blocking_wait`, or `polling_wait` in a thread that shares
    its core). No argument checks: this is the hot path, `Allreducer` validates once.
    """
    size = comm.Get_size()
    if size == 1:
        return
    rank = comm.Get_rank()
    right, left = (rank + 1) % size, (rank - 1) % size
    steps = 2 * (size - 1)
    last_rs = size - 2
    nseg = len(bounds[0])  # chunk 0 is the longest, so it has the most segments
    slot = max(b - a for a, b in bounds[0])
    isend, irecv = comm.Isend, comm.Irecv

    def recv_chunk(t: int) -> Sequence[tuple[int, int]]:
        return bounds[(rank - t - 1) % size]

    # Reduce-scatter receives, in the order we consume them: (step, segment, start, stop).
    rs_queue = [(t, j, a, b) for t in range(size - 1) for j, (a, b) in enumerate(recv_chunk(t))]
    rs_reqs: list[MPI.Request] = [MPI.REQUEST_NULL] * len(rs_queue)

    def post_rs(k: int) -> None:
        if k < len(rs_queue):
            t, _, a, b = rs_queue[k]
            o = (k % window) * slot
            rs_reqs[k] = irecv(scratch[o:o + b - a], left, _STEP_TAG + t)

    sends: list[list[MPI.Request]] = [[MPI.REQUEST_NULL] * nseg for _ in range(steps)]
    ag_reqs: list[MPI.Request] = [MPI.REQUEST_NULL] * nseg

    def post_send(t: int, j: int) -> None:
        chunk = bounds[(rank - t) % size]
        if j < len(chunk):
            a, b = chunk[j]
            sends[t][j] = isend(buf[a:b], right, _STEP_TAG + t)

    for k in range(window):
        post_rs(k)
    for j in range(nseg):
        post_send(0, j)
    k = 0  # next reduce-scatter receive to consume
    for t in range(steps):
        chunk = recv_chunk(t)
        for j in range(nseg):
            if j < len(chunk):
                if t <= last_rs:
                    wait(rs_reqs[k])
                    a, b = chunk[j]
                    o = (k % window) * slot
                    combine(buf[a:b], scratch[o:o + b - a], t == last_rs)
                    post_rs(k + window)
                    k += 1
                else:
                    wait(ag_reqs[j])
            if t + 1 < steps:
                if t + 1 > last_rs:  # allgather: receive in place, once our send left it
                    nxt = recv_chunk(t + 1)
                    if j < len(nxt):
                        wait(sends[t + 2 - size][j])
                        a, b = nxt[j]
                        ag_reqs[j] = irecv(buf[a:b], left, _STEP_TAG + t + 1)
                post_send(t + 1, j)
    if wait is blocking_wait:
        MPI.Request.Waitall([r for row in sends for r in row])
    else:
        for row in sends:
            for request in row:
                wait(request)
