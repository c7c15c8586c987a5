"""Allreduce of private buffers staged through node-shared memory: mid-sized buffers, one node.

Why: between ranks of one node MPI moves every message through the kernel (MPICH's single-copy
path) or through shared cells, with a handshake per message; the ring pays that 2(N-1) times.
When every rank of the communicator shares one node, each rank can instead copy the parts of
its buffer that others own into a shared slot of its own, sum the share it owns straight out of
its peers' slots, publish that sum, and copy the other sums back: plain memory copies between
two barriers, and no kernel call. It moves more bytes than the ring (about 4.5 buffer sizes per
rank at N = 2 against 3.5), so it wins while the per-message cost of the kernel path dominates
and loses once the bytes do. At N = 2 on the 2-core machine (`scripts/bench_allreduce.py
--repeats 41 --no-gloo`, ten runs, 2026-12-04, time over MPI's `Allreduce`): 0.53-0.86 at
128 KiB, 0.44-0.68 at 256-512 KiB, 0.47-0.79 at 1 MiB, 0.58-0.82 at 2-8 MiB, 0.70-1.02 at
16 MiB, where the ring took 0.96-1.05 at 1 MiB and 0.68-1.20 at 16 MiB: staged was the fastest
of our algorithms at 1-4 MiB in all ten runs, at 8 MiB in eight and at 16 MiB in four. Below
128 KiB MPI's own call is the safer choice: at 64 KiB staged took 0.65-0.99 at N = 2 but 1.27
at N = 3 (one run; at 128 KiB 0.83, and 0.94 at N = 4). So `Allreducer`'s "auto" stages from
`STAGED_MIN_BYTES` and, from `TUNED_MIN_BYTES` to `STAGED_MAX_BYTES`, times staged against
the ring (and doubling at 1 MiB) and keeps the fastest (`allreduce._Tuner`).

One call, L local ranks (here: all of them), a buffer cut into L shares s0..s{L-1}::

    rank r: slot_r[s_q] = buf[s_q]  for every q != r      (publish what the others own)
    barrier
    rank r: buf[s_r] += slot_q[s_r] for every q != r      (in rank order; / N if averaging)
            slot_h(r)[s_r] = buf[s_r]                      (publish the sum)
    barrier
    rank r: buf[s_q] = slot_h(q)[s_q] for every q != r    (collect the other sums)

where h(r), the rank whose slot holds r's sum, is r's first peer in rank order: the sum goes
over the values it has just read there, segment by segment, on cache lines already fetched,
where a write into r's own slot first fetches lines a peer last read. At N = 2 on the 2-core
machine, both ways interleaved in one run (an experiment script, 2026-12-04, a slow state of
the machine): 0.46-0.56 of MPI's time at 1-8 MiB against 0.49-0.69, 16 MiB 0.61 against 0.77;
at N = 3, 1 and 4 MiB 0.34 and 0.36 against 0.39 and 0.44. In a fast state
(`scripts/bench_allreduce.py --repeats 41 --no-gloo`, MPI's 1 MiB call at 142 us): 0.63,
0.64 and 0.69 at 1, 2 and 4 MiB, where before this staged took 0.91-1.12 at 1 MiB and fell
behind the ring from 4 MiB.
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

# The buffer sizes (bytes, in the type that is summed) for which `Allreducer`'s "auto" stages
# through shared memory on one node: always from STAGED_MIN_BYTES, and from TUNED_MIN_BYTES up
# to STAGED_MAX_BYTES only where `allreduce._Tuner` times it faster than the ring. See the module
# docstring for the figures.
STAGED_MIN_BYTES = 128 << 10
TUNED_MIN_BYTES = 1 << 20
STAGED_MAX_BYTES = 16 << 20
NODE_BUDGET_BYTES = 256 << 20  # at most this much /dev/shm per node for "auto"'s slots
ALIGN_BYTES = 64  # shares (and shared buckets) start on their own cache line
SEGMENT_BYTES = 256 << 10  # an owner sums its share this much at a time, while it is in L2
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


def first_peer(rank: int) -> int:
    """The local rank whose slot or bucket holds `rank`'s sum: its first peer in rank order
    (the one the sum reads first, so the result goes over values it has just read)."""
    return 1 if rank == 0 else 0


def divide(values: np.ndarray, divisor: int) -> None:
    """values /= divisor, in place.

    Why not `np.divide` alone: by a power of two, multiplying by its inverse gives the same
    bits (both round the same real number, subnormals included) and costs less, as a float
    division is slower than a multiplication even in a loop bound by memory. Summing and
    averaging a 3.7 MiB share of two float32 buffers in 256 KiB segments (`sum_share`, one
    process, caches warm, 400 interleaved repeats): 0.23 ms against 0.28 (0.16 without the
    average). Other divisors keep the division."""
    if divisor & (divisor - 1) == 0:
        np.multiply(values, 1.0 / divisor, out=values)
    else:
        np.divide(values, divisor, out=values)


def sum_share(target: np.ndarray, peers: list[np.ndarray], lo: int, hi: int,
              divisor: int | None = None, publish: tuple[np.ndarray, ...] = (),
              first: np.ndarray | None = None) -> None:
    """target[lo:hi] += every peer's [lo:hi] (in the order given), `SEGMENT_BYTES` at a time;
    while a segment is in cache, divide it by `divisor` and copy it into each of `publish`. With
    `first` (hi - lo values), target[lo:hi] = first + the peers' instead: the same sum, without
    first copying `first` into the target."""
    step = max(1, SEGMENT_BYTES // target.itemsize)
    for start in range(lo, hi, step):
        stop = min(start + step, hi)
        segment = target[start:stop]
        peer_list = iter(peers)
        if first is not None:
            np.add(first[start - lo : stop - lo], next(peer_list)[start:stop], out=segment)
        for peer in peer_list:
            np.add(segment, peer[start:stop], out=segment)
        if divisor is not None:
            divide(segment, divisor)
        for out in publish:
            np.copyto(out[start:stop], segment)


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
        self._others = [[s for q, s in enumerate(slots) if q != self.rank] for slots in self._sets]
        self._homes = [[slots[first_peer(q)] for q in range(self.size)]  # where sums go
                       for slots in self._sets]
        # Fault every page in now, not in the first calls (which a tuner times): one write per
        # page of our slots, then one read per page of every peer's.
        page = max(1, 4096 // dtype.itemsize)
        peers[self.rank][::page] = 0
        node.Barrier()
        for q, peer in enumerate(peers):
            if q != self.rank:
                peer[::page].sum()
        self._turn = 0
        self._align = max(1, ALIGN_BYTES // dtype.itemsize)
        self._bounds: dict[int, list[tuple[int, int]]] = {}

    @classmethod
    def build(cls, comm: MPI.Comm, capacity: int, dtype: np.dtype, average: bool = False,
              budget: int | None = None, min_capacity: int = 1) -> StagedSum | None:
        """A StagedSum on every rank, or None on every rank (collective on `comm`).

        `budget` caps the bytes of the node's slots, so `capacity` shrinks as the ranks per
        node grow; below `min_capacity` elements staging is not worth its window."""
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        if budget is not None:
            capacity = min(capacity, budget // (2 * dtype.itemsize * node.Get_size()))
        free = shm_free_bytes()
        need = 2 * capacity * dtype.itemsize * node.Get_size()  # the node's two slot sets
        ok = (node.Get_size() == comm.Get_size() > 1 and capacity >= max(min_capacity, 1)
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
        slots, others = self._sets[self._turn], self._others[self._turn]
        homes = self._homes[self._turn]
        self._turn ^= 1
        r = self.rank
        mine = slots[r]
        for q, (a, b) in enumerate(bounds):
            if q != r:
                np.copyto(mine[a:b], buf[a:b])
        wait(self.node.Ibarrier())  # every rank has published its parts
        lo, hi = bounds[r]
        # The sum lands in our first peer's slot (others[0], our home), then in `buf`.
        sum_share(others[0], others, lo, hi, self.size if self.average else None,
                  publish=(buf,), first=buf[lo:hi])
        wait(self.node.Ibarrier())  # every share's sum is published
        for q, (a, b) in enumerate(bounds):
            if q != r:
                np.copyto(buf[a:b], homes[q][a:b])

    def close(self) -> None:
        """Free the window (collective on the node): no call may follow."""
        self._sets = self._others = []
        if not MPI.Is_finalized():
            self.win.Free()
            self.node.Free()
