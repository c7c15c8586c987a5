"""Gradient buckets in node-shared memory: summed there within a node, by the ring across nodes.

Why: between two ranks on one node, MPI moves a message by copying it into a shared segment
and out again, and the ring does that 2(N-1) times per element with an add in between. When the
buckets themselves live in memory that every rank of the node can read (an MPI shared window,
`MPI_Win_allocate_shared`), each of the L local ranks instead sums its own 1/L *share* of a
bucket straight out of its peers' buffers and writes the result into every one of them:
about 2 bucket sizes of memory traffic per rank, against about 6 for the ring through MPI.

One bucket, L local ranks, K elements cut into L shares s0..s{L-1}::

    barrier                          every local rank has its gradients in the bucket
    rank r: s_r += s_r of every peer  (in its own buffer, read from theirs)
    across nodes: s_r allreduced by the ring among the ranks of local rank r on every node
    rank r: s_r /= N                  (averaged by its owner only)
    rank r: s_r of every peer = s_r   (on one node segment by segment, while in cache)
    barrier                          every bucket holds every average

The owner writes its average over the peers' values it has just read (cache lines it already
holds); until 2026-12-04 each rank instead copied the other shares from their owners after a
second barrier, and a third kept anyone from refilling a bucket a peer still read. Both ways
in one run (N = 2 on the 2-core machine, an experiment script, 120 interleaved repeats; time
over MPICH's Allreduce on a private buffer): 0.25, 0.17, 0.35, 0.41 and 0.21 at 256 KiB, 1, 4,
16 and 64 MiB against 0.77, 0.72, 0.72, 0.99 and 0.35; at N = 3, 0.27 and 0.28 at 1 and 16 MiB
against 0.46 and 0.51.

Same bits everywhere: each share's final value is computed by one rank per node (its owner;
across nodes the ring's result is bitwise identical on its ranks) and only copied by the others.

With `params=True` the buckets come with the parameters, laid out like them (`param_tensors`),
and `reduce(i, whole=False)` stops after the sum: each rank then updates the parameters of its
own share (`owned`) from the average it just computed, so the writes into the peers and the
second barrier go, and the optimizer's work per rank drops to 1/L. One `fence()` per step,
after the update, keeps the order (see `GradSync(shard=True)`). On one node, in the buckets'
own precision, that average is written over the first peer's part of the share, which the sum
has just read, instead of into this rank's own bucket (`_sum_into_peer`).

Where the parameters live follows from one fact about this machine (`scripts/probe_coherence.py`,
two ranks): writing a cache line costs up to ten times more when the other core's last access
to it was a read than when it was a write (3.8 MB: 1.2-1.6 ms against 0.1-0.2 when the caches
are in their slow state, which comes and goes within minutes; 0.18 against 0.09 otherwise).
So every line that carries data from one rank to another should be written back by the rank
that read it before its writer writes it again.

- Small shares (what a rank reads of its peers' buckets in a step under `HAND_BACK_BYTES`):
  each rank's parameters live in its own buckets (`holds_own_parameters`). Its own share
  holds the parameters it updates (lines no other rank touches); each peer's share holds that
  peer's parameters, which the peer writes there after its update (`hand_back`), this rank
  reads in forward and backward, and the hook's gradient copy overwrites once backward is done
  with them. Each line that crosses is written back by its reader: one copy per step (the
  publication), and no separate copy of the parameters at all.
  Against one node copy (below), the MLP of `scripts/bench_train.py` at N = 2 (2026-12-05,
  both as contenders in one run, both creation orders): in the caches' slow state the step
  was 1.6-2.2 ms shorter in four runs (11.5-11.6 ms down to 9.4-9.9; the update 1.0 ms of
  it, backward 0.5-1.1), in the fast state 0.24-0.32 ms longer in five runs of six (the
  publication), 0.12 shorter in one. Larger shares lose: 5 MB gained 0.2-0.3 ms in the slow
  state, 7 MB nothing, 11.6 MB lost 1.5-2 ms (publishing went to memory); the CNN (1 MB)
  the same within noise.
- Otherwise, and wherever the own share is not kept out of the buckets (16 bits, several
  nodes): one copy per node, in the first local rank's segment. The owner's update then
  writes lines every rank read in its forward, at the slow price when the caches are slow,
  but the wide MLP (50 MB shares) has nothing in the caches to lose.

Measured and dropped before that: private parameters per rank, each share published through
the peers' buckets and copied out after the fence (two copies: the MLP 0.07-0.83 ms longer in
nine runs, 0.26 shorter in one, 2026-12-05). The layout above was first measured by an
experiment script the same day, against the node copy as it was then: 1.08 ms shorter to 0.49
longer over seven runs, with 0.21 shorter and 0.35 longer in two runs that a probe just before
had found in the slow state. Later that day every run the probe found slow gained 1.6-2.2 ms
(eight runs, the script's and the library's); the state may change within a run, and the
first figures are otherwise unexplained.

Buckets under `SMALL_BUCKET_BYTES` skip all this: they are latency-bound, and one call of MPI's
own Allreduce (through an `Allreducer` on the whole communicator) beats two barriers.

Used by `GradSync` when every node holds the same number of ranks (so the per-local-rank
communicators line up) and more than one; `usable()` decides collectively. 16-bit buckets are
summed in float32 and rounded once; `wire` compression applies to the ring across nodes (on
one node no gradient travels, so there is nothing to compress).
"""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from mpiml.comm.allreduce import DTYPES, Allreducer, as_torch, storage_dtype
from mpiml.comm.ring import blocking_wait, polling_wait
from mpiml.comm.staged import ALIGN_BYTES, divide, first_peer, share_bounds, sum_share
from mpiml.comm.staged import SHM_DIR as SHM_DIR  # re-exported: where windows live
from mpiml.comm.staged import shm_free_bytes as shm_free_bytes
from mpiml.errors import CommError

# Below this a bucket goes through an `Allreducer` (MPI's latency path) on the whole
# communicator instead: the node barriers cost more than the data. At N = 2 on the 2-core
# machine the shared path (then with three barriers) won from 128 KiB (49 us against MPI's
# 49-51 us) and lost below (4 KiB: 32 us against 7 us).
SMALL_BUCKET_BYTES = 128 << 10

# Above this many bytes read from the peers' buckets per rank and step, nobody writes them
# back (`SharedBuckets.hand_back`) and the parameters stay in one copy per node: the lines are
# no longer in the caches, and the writing costs memory traffic (figures in the module
# docstring: 3.7 MB gained, 5 MB gained a little in the slow state only, 7 MB nothing).
HAND_BACK_BYTES = 4 << 20


def usable(comm: MPI.Comm, node_comm: MPI.Comm) -> bool:
    """True on every rank when the node layout allows shared buckets (collective on `comm`).

    Needs more than one rank per node and the same count on every node, so that the ranks of
    local rank r on all nodes can form one communicator of one rank per node.
    """
    counts = comm.allgather(node_comm.Get_size())
    return counts[0] > 1 and all(c == counts[0] for c in counts)


class SharedBuckets:
    """Flat buffers of one dtype in a node-shared window; `reduce(i)` averages bucket i over
    every rank of `comm`, in place, on every rank.

    A collective constructor on `comm` (every rank, the same `lengths`). `node_comm` groups the
    ranks that share memory: normally `comm.Split_type(COMM_TYPE_SHARED)`; tests pass a finer
    split to stand in for several nodes. `tensors[i]` is a torch view of this rank's bucket i
    (what the parameters' `.grad` views point into). `polling=True` for a communication thread
    that shares its core with backward (waits test and sleep, see `ring.polling_wait`).
    Buckets under `small_bytes` stay private and go through MPI's Allreduce.
    """

    def __init__(self, comm: MPI.Comm, node_comm: MPI.Comm, lengths: list[int], dtype: str,
                 *, wire: str | None = None, algorithm: str = "auto",
                 polling: bool = False, small_bytes: int = SMALL_BUCKET_BYTES,
                 params: bool = False) -> None:
        if dtype not in DTYPES:
            raise CommError(f"SharedBuckets dtype={dtype!r}: choose one of {DTYPES}")
        self.dtype = dtype
        self.size = comm.Get_size()
        self.node = node_comm.Dup()  # ours alone, like the ring's communicator
        self.local_size = self.node.Get_size()
        self.local_rank = self.node.Get_rank()
        self._wait = polling_wait if polling else blocking_wait
        itemsize = storage_dtype(dtype).itemsize
        align = ALIGN_BYTES // itemsize
        # Small buckets stay private: MPI is slower on window memory (16 us against 11 us
        # for a 4 KiB Allreduce here), and they never take the shared path anyway.
        self._shared_index = [n * itemsize >= small_bytes for n in lengths]
        starts, total = aligned_layout([n if shared else 0 for n, shared
                                        in zip(lengths, self._shared_index, strict=True)],
                                       align)
        self.win = MPI.Win.Allocate_shared(max(total, 1) * itemsize, itemsize, comm=self.node)
        self._peers = [self._window_array(q, max(total, 1)) for q in range(self.local_size)]
        # Bucket i of local rank q (None: a private bucket of another rank), and this rank's
        # share bounds of each bucket.
        self._buckets = [
            [peer[s : s + n] if shared else
             (_private(n, dtype) if q == self.local_rank else None)
             for s, n, shared in zip(starts, lengths, self._shared_index, strict=True)]
            for q, peer in enumerate(self._peers)]
        self._shares = [share_bounds(n, self.local_size, align) for n in lengths]
        self.tensors = [as_torch(b, dtype) for b in self._buckets[self.local_rank]]
        # Where `reduce(i, whole=False)` may leave this rank's average (see `average_of_share`).
        self._home_tensors = ([as_torch(b, dtype) if shared else None for b, shared in
                               zip(self._buckets[first_peer(self.local_rank)],
                                   self._shared_index, strict=True)]
                              if self.local_size > 1 else [])
        for t in self.tensors:
            t.zero_()
        longest_share = max((hi - lo for bounds, shared in zip(self._shares, self._shared_index,
                                                               strict=True)
                             if shared for lo, hi in bounds), default=0)
        half = dtype in ("float16", "bfloat16")
        # 16-bit shares are summed in float32 here, then rounded once.
        self._acc = torch.empty(longest_share if half else 0, dtype=torch.float32)
        small = [n for n, shared in zip(lengths, self._shared_index, strict=True) if not shared]
        self._small_reducer = (Allreducer(comm, max(small), dtype, average=True,
                                          polling=polling) if small else None)
        self.cross = comm.Split(self.local_rank, comm.Get_rank())  # one rank per node
        self._cross_reducer = None
        if self.cross.Get_size() > 1:
            kind = "float32" if half else dtype
            self._cross_reducer = Allreducer(
                self.cross, max(longest_share, 1), kind, algorithm=algorithm,
                wire=wire if wire != kind else None, polling=polling)
        # What this rank reads of its peers' buckets in a step, about (the same on every rank):
        # `hand_back` writes over it, and with `params`, it is what decides the layout.
        read = (self.local_size - 1) * sum(
            n for n, shared in zip(lengths, self._shared_index, strict=True) if shared
        ) * itemsize // self.local_size
        self._hand_back = read <= HAND_BACK_BYTES
        self._read_since_fence: list[int] = []
        # The parameters (see `holds_own_parameters`): in each rank's own buckets where every
        # shared bucket keeps the own share out and the shares are small, else one copy per
        # node, laid out like the buckets, in the first local rank's segment.
        self.params_in_buckets = (params and self.local_size > 1 and self._hand_back
                                  and any(self._shared_index)
                                  and all(self.keeps_own_share_private(i)
                                          for i, shared in enumerate(self._shared_index)
                                          if shared))
        self.param_win: MPI.Win | None = None
        self.param_tensors: list[torch.Tensor] = []
        if params:
            node_copy = [0 if self.holds_own_parameters(i) else n for i, n in enumerate(lengths)]
            pstarts, ptotal = aligned_layout(node_copy, align)
            first = self.local_rank == 0
            self.param_win = MPI.Win.Allocate_shared(max(ptotal, 1) * itemsize if first else 0,
                                                     itemsize, comm=self.node)
            memory, _ = self.param_win.Shared_query(0)
            flat = np.frombuffer(memory, dtype=storage_dtype(dtype), count=max(ptotal, 1))
            # Own buckets as tensors apart from `tensors`, with their own version counters:
            # the gradient copies into the slots must not count as changes to the parameters.
            self.param_tensors = [
                as_torch(self._buckets[self.local_rank][i], dtype)
                if self.holds_own_parameters(i) else as_torch(flat[s : s + n], dtype)
                for i, (s, n) in enumerate(zip(pstarts, lengths, strict=True))]

    @property
    def polling(self) -> bool:
        """Whether waits test and sleep (`ring.polling_wait`) rather than spin; settable."""
        return self._wait is polling_wait

    @polling.setter
    def polling(self, value: bool) -> None:
        self._wait = polling_wait if value else blocking_wait
        for reducer in (self._cross_reducer, self._small_reducer):
            if reducer is not None:
                reducer.polling = value

    def _window_array(self, rank: int, count: int) -> np.ndarray:
        memory, _ = self.win.Shared_query(rank)
        return np.frombuffer(memory, dtype=storage_dtype(self.dtype), count=count)

    # -- the reduction --------------------------------------------------------------------------
    def owned(self, index: int) -> tuple[int, int]:
        """(start, stop) of bucket `index` that this rank sums, and, with shared parameters,
        updates: the same bounds for the gradients and the parameters."""
        return self._shares[index][self.local_rank]

    def keeps_own_share_private(self, index: int) -> bool:
        """Whether `reduce(index, sources=...)` may take this rank's own share from elsewhere:
        a shared bucket, summed on this node alone, in its own precision. There
        `reduce(index, whole=False)` also leaves the average in a peer's bucket
        (`average_of_share`)."""
        return (self._shared_index[index] and self._cross_reducer is None
                and self.dtype not in ("float16", "bfloat16"))

    def holds_own_parameters(self, index: int) -> bool:
        """Whether `param_tensors[index]` is this rank's own bucket `index` (else it is the
        node's one copy): see the module docstring for why, `hand_back` for how the peers get
        this rank's share, and `GradSync` for what it asks of the caller."""
        return self.params_in_buckets and self._shared_index[index]

    def average_of_share(self, index: int) -> torch.Tensor:
        """This rank's average of bucket `index` after `reduce(index, whole=False)`: `owned`'s
        part of this rank's bucket, or, where `keeps_own_share_private(index)`, of its first
        peer's (see `_sum_into_peer`)."""
        lo, hi = self.owned(index)
        if self.keeps_own_share_private(index):
            return self._home_tensors[index][lo:hi]
        return self.tensors[index][lo:hi]

    def reduce(self, index: int, *, whole: bool = True,
               sources: list[tuple[int, int, np.ndarray]] = ()) -> None:
        """Average bucket `index` over every rank of `comm` (collective on it).

        `whole=False` leaves only the average of this rank's `owned` share, in
        `average_of_share(index)` (private buckets are still averaged whole): for parameters
        in shared memory, where each rank updates its share and nobody needs the rest. It
        skips the writes into the peers and the barrier after the sum, so the caller must
        `fence()` before anyone refills a bucket (zero_grad, the next backward) or reads a
        parameter a peer updates.

        `sources`, with `whole=False` where `keeps_own_share_private(index)`: (start, stop,
        values) pieces of this rank's own share, in ascending order, whose values are not in
        its bucket but in `values` (the gradients autograd made, so the caller copies only
        what its peers read); the sum reads them there, in the same order, so the bits do not
        change.
        """
        if sources and whole:
            raise ValueError("SharedBuckets.reduce: sources only with whole=False")
        if whole and self.holds_own_parameters(index):
            raise ValueError("SharedBuckets.reduce: bucket holds this rank's parameters "
                             "(params_in_buckets): only whole=False")
        mine = self._buckets[self.local_rank][index]
        if not self._shared_index[index]:
            self._small_reducer(mine)  # latency-bound: one MPI call beats two barriers
            return
        lo, hi = self._shares[index][self.local_rank]
        self._barrier()  # every local rank's gradients are in place
        if not whole and self._hand_back:
            self._read_since_fence.append(index)
        if self._acc.numel():
            self._sum_half(index, lo, hi)
            if whole:
                self._push(index, lo, hi)
        elif not whole and self.keeps_own_share_private(index):
            self._sum_into_peer(index, lo, hi, sources)
        else:
            self._sum(index, lo, hi, push=whole)
        if not whole:
            return
        self._barrier()  # every share's average is in every bucket

    def _sum(self, index: int, lo: int, hi: int, push: bool) -> None:
        """Own share += the peers' (then the ring across nodes), averaged, in own buffer; with
        `push`, also written into every peer's bucket.

        Why push rather than have each peer copy the share from us after another barrier: on
        one node each segment goes out while it is in cache, over the peers' values the sum
        has just read, and the copy phase and its closing barrier go (figures in the module
        docstring)."""
        share = self._buckets[self.local_rank][index]
        peers = self._peer_buckets(index)
        one_node = self._cross_reducer is None  # one node: average per segment, while in cache
        sum_share(share, peers, lo, hi, self.size if one_node else None,
                  publish=tuple(peers) if push and one_node else ())
        if not one_node:
            self._cross_reducer(share[lo:hi])
            divide(share[lo:hi], self.size)
            if push:
                self._push(index, lo, hi)

    def _push(self, index: int, lo: int, hi: int) -> None:
        """Copy this rank's share of bucket `index` into every peer's."""
        mine = self._buckets[self.local_rank][index]
        for peer in self._peer_buckets(index):
            np.copyto(peer[lo:hi], mine[lo:hi])

    def _peer_buckets(self, index: int) -> list[np.ndarray]:
        """Bucket `index` of every other local rank, in rank order (the first is
        `first_peer`'s)."""
        return [self._buckets[q][index] for q in range(self.local_size) if q != self.local_rank]

    def _sum_into_peer(self, index: int, lo: int, hi: int,
                       sources: list[tuple[int, int, np.ndarray]]) -> None:
        """The share's average, on one node, written over the first peer's part of it (which
        the sum reads first, segment by segment), not into this rank's own bucket.

        Why: each write then lands on a cache line the sum has just read, where a write into
        our own bucket first fetches a line untouched since the previous step; and the own
        share of our bucket is never touched, so the node's ranks keep a share size less in
        the caches. At N = 2 on the 2-core machine (`scripts/bench_train.py` with both ways
        as contenders, five runs of the MLP, two of the wide MLP), the last rank's exposed
        wait without overlap: MLP 0.60-0.76 ms against 0.84-0.91, wide MLP 6.3-6.6 against
        8.5-9.1; steps 1-2% shorter. The peer rewrites that part only in the next step's
        backward, after the fence that follows every rank's update.
        Operands in the order of `_sum`: own values (from `sources` where they are there,
        else from our bucket), then every peer's in rank order."""
        own = self._buckets[self.local_rank][index]
        peers = self._peer_buckets(index)
        target = peers[0]  # first_peer's: where `average_of_share` looks
        done = lo
        for start, stop, values in sources:
            if start > done:
                sum_share(target, peers, done, start, self.size, first=own[done:start])
            sum_share(target, peers, start, stop, self.size, first=values)
            done = stop
        if hi > done:
            sum_share(target, peers, done, hi, self.size, first=own[done:hi])

    def _sum_half(self, index: int, lo: int, hi: int) -> None:
        """16-bit: the share summed in float32, reduced across nodes, rounded once."""
        acc = self._acc[: hi - lo]
        views = [as_torch(self._buckets[q][index][lo:hi], self.dtype)
                 for q in range(self.local_size)]
        acc.copy_(views[0])
        for view in views[1:]:
            acc.add_(view)
        if self._cross_reducer is not None:
            self._cross_reducer(acc.numpy())
        acc.div_(self.size)
        views[self.local_rank].copy_(acc)

    def _barrier(self) -> None:
        self._wait(self.node.Ibarrier())

    def hand_back(self) -> None:
        """Write over this rank's share of its peers' buckets, read by each share-only
        reduction since the last call: with this rank's new parameters where it holds them in
        its buckets (`holds_own_parameters`: the peers' copy of its share), else with zeros.
        Call it on every rank once the update is done with the averages, before `fence()`
        (`GradSync.zero_grad` does both).

        Why write what is only read later, or not at all: each peer writes its next
        gradients over those lines in its backward, and that costs up to ten times more
        when this rank read them last (the module docstring). The average is written over a
        peer's part (`_sum_into_peer`), but the update reads it after that; the 16-bit path
        and the ring across nodes only read the peers' parts.
        With the parameters in the buckets the write is the publication of this rank's new
        share. Elsewhere it is zeros (the padding between slots must stay zero), measured
        with the MLP of `scripts/bench_train.py` at N = 2 in float32 with a node copy of the
        parameters (2026-12-05, the loop with and without as contenders, 14 runs, both
        creation orders): about 0.1 ms a step, and backward up to 0.9 ms shorter; the step
        0.11-0.81 ms shorter in nine runs (slow caches), 0.07-0.23 ms longer in five (fast),
        median 0.15 ms shorter. For the wide MLP the 50 MB of zeros cost 2.1 ms and saved
        nothing: hence `HAND_BACK_BYTES`, for both."""
        for index in self._read_since_fence:
            lo, hi = self._shares[index][self.local_rank]
            new = (self._buckets[self.local_rank][index][lo:hi]
                   if self.holds_own_parameters(index) else 0)
            for peer in self._peer_buckets(index):
                peer[lo:hi] = new
        self._read_since_fence = []

    def fetch_peer_shares(self, index: int) -> None:
        """Where this rank holds its parameters in bucket `index`, copy every peer's share of
        them from the peer's bucket: for a backward whose gradients were copied over them
        and that no reduction (so no `hand_back`) followed. Only after a `fence()`."""
        if self.holds_own_parameters(index):
            mine = self._buckets[self.local_rank][index]
            for q in range(self.local_size):
                if q != self.local_rank:
                    lo, hi = self._shares[index][q]
                    np.copyto(mine[lo:hi], self._buckets[q][index][lo:hi])

    def fence(self) -> None:
        """Node barrier: every share-only reduction and parameter update before it is done."""
        self._barrier()

    def node_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of `values` (float64) over the node's ranks, on every one of them."""
        out = np.empty_like(values, dtype=np.float64)
        self.node.Allreduce(np.ascontiguousarray(values, dtype=np.float64), out, op=MPI.SUM)
        return out

    def node_gather(self, obj: object) -> list | None:
        """Every local rank's `obj`, in local rank order, on the node's first rank (else None)."""
        return self.node.gather(obj, root=0)

    # -- life cycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Free the window (collective on the node): no view into it may be used afterwards."""
        for reducer in (self._cross_reducer, self._small_reducer):
            if reducer is not None:
                reducer.close()
        self.tensors, self._buckets, self._peers, self.param_tensors = [], [], [], []
        if not MPI.Is_finalized():
            self.win.Free()
            if self.param_win is not None:
                self.param_win.Free()
            self.cross.Free()
            self.node.Free()


def aligned_layout(lengths: list[int], align: int) -> tuple[list[int], int]:
    """Start of each of `lengths` laid end to end, each rounded up to `align`; and the total."""
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += -(-n // align) * align
    return starts, total


def _private(length: int, dtype: str) -> np.ndarray:
    """A zeroed array starting on a cache line, as the shared buckets do (numpy's own
    alignment is 16 bytes); sliced from a longer one, so that even an empty one has a unit
    stride (numpy gives `np.zeros(0)` a zero stride, which torch cannot view as bytes)."""
    kind = storage_dtype(dtype)
    spare = ALIGN_BYTES // kind.itemsize
    raw = np.zeros(length + spare + 1, dtype=kind)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // kind.itemsize
    return raw[skip : skip + length]
