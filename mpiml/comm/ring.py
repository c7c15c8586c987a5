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
