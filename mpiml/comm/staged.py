"""Allreduce of private buffers staged through node-shared memory: mid-sized buffers, one node.

Why: between ranks of one node MPI moves every message through the kernel (MPICH's single-copy
path) or through shared cells, with a handshake per message; the ring pays that 2(N-1) times.
When every rank of the communicator shares one node, each rank can instead copy the parts of
its buffer that others own into a shared slot of its own, sum the share it owns straight out of
its peers' slots, publish that sum, and copy the other sums back: plain memory copies between
two barriers, and no kernel call. It moves more bytes than the ring (about 4.5 buffer sizes
per rank at N = 2 against 3.5), so it wins while the per-message cost of the kernel path
dominates and loses once the bytes do. At N = 2 on the 2-core machine
(`scripts/bench_allreduce.py --repeats 41 --no-gloo`, six runs, time over MPI's
`Allreduce`): 0.61-0.71 at 256 KiB and 0.60-0.76 at 512 KiB (the ring 1.03-1.30); at 1 and
2 MiB a tie, 0.91-1.22 and 0.84-1.15 (the ring 0.97-1.08 and 0.83-1.09 in the same runs); at
4 MiB 1.00-1.07 against the ring's 0.80-0.88. Hence `STAGED_MIN_BYTES` and
`STAGED_MAX_BYTES`; MPI's own call stays faster below (64 KiB: 1.12).

One call, L local ranks (here: all of them), a buffer cut into L shares s0..s{L-1}::

    rank r: slot_r[s_q] = buf[s_q]  for every q != r      (publish what the others own)
    barrier
    rank r: buf[s_r] += slot_q[s_r] for every q != r      (in rank order; / N if averaging)
            slot_r[s_r] = buf[s_r]                          (publish the sum)
    barrier
    rank r: buf[s_q] = slot_q[s_q]  for every q != r      (collect the other sums)

Each share's result is computed by its owner alone and only copied by the others, so every
rank ends with the same bits. Slots come in two sets used in turn, so a rank may start its next
call while a peer still copies out of the previous one: a rank reaches call k+1's second
barrier only once every peer has finished call k, and call k+2 (the same set as call k) starts
after it. That saves the third barrier a single set would need.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

# The range of buffer sizes (bytes, in the type that is summed) for which `Allreducer`'s
# "auto" stages through shared memory on one node; see the module docstring for the figures.
STAGED_MIN_BYTES = 256 << 10
STAGED_MAX_BYTES = 4 << 20
_ALIGN_BYTES = 64  # shares start on their own cache line
_SEGMENT_BYTES = 256 << 10  # the owner sums and publishes its share this much at a time (L2)
_BOUNDS_CACHE = 32  # buffer lengths whose share layout we remember
SHM_DIR = "/dev/shm"  # where MPICH and Open MPI back shared windows on Linux


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Free bytes where shared windows live, or None when that is not a known place."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def share_bounds(length: int, parts: int, align: int) -> list[tuple[int, int]]:
    """`parts` near-equal (start, stop) shares of `length`, cut on multiples of `align`."""
    cuts = [min(length, (length * j // parts) // align * align) for j in range(parts)] + [length]
    return [(cuts[j], cuts[j + 1]) for j in range(parts)]


class StagedSum:
    """Sum (or average) buffers of at most `capacity` elements of `dtype` over `comm`, in place.

    Build with `StagedSum.build`, which returns None unless every rank of `comm` shares one
    node and the slots fit in `/dev/shm`. Call `reducer(buf, wait)` on every rank with a
    contiguous 1-D array of the same length; `wait` completes the barriers' requests
    (`ring.blocking_wait` or `ring.polling_wait`). `close()` is collective on `comm`.
    """

    def __init__(self, node: MPI.Comm, capacity: int, dtype: np.dtype, average: bool) -> None:
        self.node = node
        self.size = node.Get_size()
        self.rank = node.Get_rank()
        self.capacity = capacity
        self.average = average
        self.win = MPI.Win.Allocate_shared(2 * capacity * dtype.itemsize, dtype.itemsize,
                                           comm=node)
        peers = [np.frombuffer(self.win.Shared_query(q)[0], dtype=dtype, count=2 * capacity)
                 for q in range(self.size)]
        self._sets = [[p[:capacity] for p in peers], [p[capacity:] for p in peers]]
        self._turn = 0
        self._align = max(1, _ALIGN_BYTES // dtype.itemsize)
        self._segment = max(1, _SEGMENT_BYTES // dtype.itemsize)
        self._bounds: dict[int, list[tuple[int, int]]] = {}

    @classmethod
    def build(cls, comm: MPI.Comm, capacity: int, dtype: np.dtype,
              average: bool = False) -> StagedSum | None:
        """A StagedSum on every rank, or None on every rank (collective on `comm`)."""
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        free = shm_free_bytes()
        need = 2 * capacity * dtype.itemsize * node.Get_size()  # the node's two slot sets
        ok = (node.Get_size() == comm.Get_size() > 1 and capacity > 0
              and (free is None or need < free // 2))
        if not comm.allreduce(ok, op=MPI.LAND):
            node.Free()
            return None
        return cls(node, capacity, dtype, average)

    def __call__(self, buf: np.ndarray, wait: Callable[[MPI.Request], None]) -> None:
        n = buf.size
        bounds = self._bounds.get(n)
        if bounds is None:
            if len(self._bounds) >= _BOUNDS_CACHE:
                self._bounds.clear()
            bounds = self._bounds[n] = share_bounds(n, self.size, self._align)
        slots = self._sets[self._turn]
        self._turn ^= 1
        r = self.rank
        mine = slots[r]
        for q, (a, b) in enumerate(bounds):
            if q != r:
                np.copyto(mine[a:b], buf[a:b])
        wait(self.node.Ibarrier())  # every rank has published its parts
        lo, hi = bounds[r]
        for start in range(lo, hi, self._segment):
            stop = min(start + self._segment, hi)
            target = buf[start:stop]
            for q in range(self.size):
                if q != r:
                    np.add(target, slots[q][start:stop], out=target)
            if self.average:
                np.divide(target, self.size, out=target)
            np.copyto(mine[start:stop], target)
        wait(self.node.Ibarrier())  # every share's sum is published
        for q, (a, b) in enumerate(bounds):
            if q != r:
                np.copyto(buf[a:b], slots[q][a:b])

    def close(self) -> None:
        """Free the window (collective on the node): no call may follow."""
        self._sets = []
        if not MPI.Is_finalized():
            self.win.Free()
            self.node.Free()
