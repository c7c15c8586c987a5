"""Recursive doubling allreduce, segmented, for a power-of-two number of ranks.

At step k (k = 0 .. log2(N) - 1) rank r swaps its whole buffer with rank r XOR 2^k and adds what
it received, so after step k every group of 2^(k+1) ranks holds its group's sum::

    N = 4     step 0: 0 <-> 1, 2 <-> 3       step 1: 0 <-> 2, 1 <-> 3
              0: a0+a1   1: a0+a1            0, 1, 2, 3: (a0+a1) + (a2+a3)

log2(N) messages instead of the ring's 2(N-1), which is why it is the small-buffer path; each
rank sends K elements per step, log2(N)·K in all against the ring's 2(N-1)/N·K. At N = 2 the two
are equal (K) and doubling needs half the messages, but it adds K elements per rank against the
ring's K/2 and rewrites every page it has just sent; `Allreducer`'s "auto" keeps it for small
compressed buffers (see allreduce.py for what that cost measured).

Same bits on every rank: both partners compute (lower rank's value) + (higher rank's value),
with the operands in that order, so even two NaNs with different payloads give one answer.
After each step the partners hold identical values, so by induction all ranks do.

Large buffers go in segments with a window of receives into scratch, as in the pipelined ring:
the add of segment j overlaps the transfer of segment j+1, and scratch stays in cache. A
segment of `buf` is changed only after our own send of it has completed (MPI forbids touching
a buffer while it is being sent).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from mpiml.comm.ring import Wait, blocking_wait

#: combine(target, incoming, last, incoming_first): target <- incoming + target in that
#: operand order when `incoming_first`, else target + incoming; `last` on the final step.
PairCombine = Callable[[np.ndarray, np.ndarray, bool, bool], None]
_STEP_TAG = 0x200  # step k uses tag _STEP_TAG + k
DEFAULT_WINDOW = 2


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def add_pair(target: np.ndarray, incoming: np.ndarray, last: bool, incoming_first: bool) -> None:
    """Default combine: the sum in the buffer's own dtype, lower rank's operand first."""
    if incoming_first:
        np.add(incoming, target, out=target)
    else:
        np.add(target, incoming, out=target)


def doubling_scratch_length(length: int, segment: int, window: int = DEFAULT_WINDOW) -> int:
    """Elements of scratch `doubling_allreduce` needs for a buffer of `length`."""
    return length if length <= segment else window * segment


def doubling_allreduce(
    comm: MPI.Comm,
    buf: np.ndarray,
    scratch: np.ndarray,
    segment: int,
    combine: PairCombine = add_pair,
    window: int = DEFAULT_WINDOW,
    wait: Wait = blocking_wait,
) -> None:
    """Sum `buf` across `comm` (a power-of-two size) in place by recursive doubling.

    `segment` is in elements; `scratch` holds `doubling_scratch_length(buf.size, segment,
    window)` elements of `buf`'s dtype. `wait` completes one request (see `ring.polling_wait`).
    No argument checks: `Allreducer` validates once.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    n = buf.size
    distance, step = 1, 0
    while distance < size:
        partner = rank ^ distance
        incoming_first = partner < rank
        last = distance * 2 >= size
        tag = _STEP_TAG + step
        if n <= segment:  # one message each way: the latency path
            incoming = scratch[:n]
            if wait is blocking_wait:
                comm.Sendrecv(buf, partner, tag, incoming, partner, tag)
            else:
                recv = comm.Irecv(incoming, partner, tag)
                send = comm.Isend(buf, partner, tag)
                wait(recv)
                wait(send)
            combine(buf, incoming, last, incoming_first)
        else:
            _segmented_exchange(comm, buf, scratch, segment, partner, tag, window, wait,
                                lambda t, i, last=last, first=incoming_first:
                                combine(t, i, last, first))
        distance, step = distance * 2, step + 1


def _segmented_exchange(comm: MPI.Comm, buf: np.ndarray, scratch: np.ndarray, segment: int,
                        partner: int, tag: int, window: int, wait: Wait,
                        fold: Callable[[np.ndarray, np.ndarray], None]) -> None:
    """Swap `buf` with `partner` segment by segment, folding each received segment in."""
    n = buf.size
    starts = range(0, n, segment)
    sends = [comm.Isend(buf[a:a + segment], partner, tag) for a in starts]
    recvs: list[MPI.Request] = [MPI.REQUEST_NULL] * len(starts)

    def post(j: int) -> None:
        if j < len(starts):
            a = starts[j]
            o = (j % window) * segment
            recvs[j] = comm.Irecv(scratch[o:o + min(segment, n - a)], partner, tag)

    for j in range(window):
        post(j)
    for j, a in enumerate(starts):
        b = min(a + segment, n)
        o = (j % window) * segment
        wait(recvs[j])
        wait(sends[j])  # our copy of this segment may change only once it has left
        fold(buf[a:b], scratch[o:o + b - a])
        post(j + window)
