"""Gradient synchronisation: fused buckets, allreduced in an order every rank agrees on.

Why buckets: one allreduce per parameter pays the per-call latency hundreds of times; one per
model waits for the whole backward. Parameters are grouped, in reverse registration order
(roughly the order backward produces their gradients), into flat buffers of about
`bucket_mb`. After `zero_grad()` every `.grad` is None; a post-accumulate-grad hook copies
the gradient autograd hands over into the parameter's slot in its bucket and makes `.grad` a
view of that slot, so further micro-batches add straight into the buffer that goes on the
wire and the optimizer reads the average from it: one copy in, no copy out.

Why a fixed order: MPI matches collectives by call order. A bucket is launched only after every
bucket before it, so ranks whose backward finishes parameters in a different order still make
the same calls in the same order. Parameters that got no gradient this step have their slot
zeroed and are reduced as zeros when `finish()` flushes, so the number of calls never diverges.

With `overlap`, the same hook counts each bucket's ready parameters; the moment a
bucket is complete it goes to a single communication thread with a communicator of its own,
while backward carries on with earlier layers. The optimizer waits only in `finish()`.

Why `overlap="auto"` (the default) measures instead of assuming: overlap pays only where the
communication has something to run on while backward computes (a spare core, a network that
moves data by itself). With one core per rank and buckets summed by that core, the thread
takes its time from backward: at N = 2 on the 2-core machine, overlap made the wide MLP's
step 8% shorter in one run and 10% longer in another, and the small MLP's 4-20% longer. So
the first steps run the two ways in alternating blocks, timing whole steps (finish to finish),
and every rank keeps overlap only if its median step, on the slowest rank, is at least 5%
shorter. Overlap has to win clearly because a wrong "on" costs more than a wrong "off": on
the 2-core machine (2026-12-03, `scripts/bench_train.py`) the overlapped step was longer
than the synchronous one in seven of eight runs of the wide MLP and in both runs of the CNN,
by up to 10%, yet 12 timed steps per mode with a 2% margin chose overlap in one of each (the
CNN then fell 1% behind DDP).

Why a thread, and not the hook that completes a bucket reducing it on the spot (overlap with
no thread, the sum while the gradients are still in cache): as a contender against the
synchronous path (the MLP of `scripts/bench_train.py` at N = 2, 2026-12-05, five runs, both
creation orders) its steps were 0.31-0.53 ms longer in four runs and 0.08 ms shorter in one:
a rank that completes a bucket first waits in the middle of its backward for the others.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from mpiml.comm import shm
from mpiml.comm.allreduce import Allreducer
from mpiml.comm.shm import SharedBuckets
from mpiml.comm.staged import ALIGN_BYTES
from mpiml.comm.world import World
from mpiml.errors import CommError, unwinding_alone

_KIND = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
         torch.bfloat16: "bfloat16"}
_WIRE = {"none": None, "fp16": "float16", "bf16": "bfloat16"}


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array sharing `tensor`'s memory; bfloat16 travels as its int16 bits."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def broadcast_module(world: World, module: torch.nn.Module, root: int = 0) -> None:
    """Make every rank's parameters and buffers equal to `root`'s, in place."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if not tensor.is_contiguous():
                raise CommError("cannot broadcast a non-contiguous parameter or buffer")
            world.comm.Bcast(numpy_view(tensor.detach()), root=root)


def check_layout(world: World, module: torch.nn.Module) -> None:
    """Raise CommError on every rank unless all ranks hold the same parameters, in order."""
    mine = [(n, tuple(p.shape), str(p.dtype), p.requires_grad)
            for n, p in module.named_parameters()]
    everyone = world.allgather_object(mine)
    for rank, theirs in enumerate(everyone):
        if theirs == everyone[0]:
            continue
        for i in range(max(len(theirs), len(everyone[0]))):
            a = everyone[0][i] if i < len(everyone[0]) else None
            b = theirs[i] if i < len(theirs) else None
            if a != b:
                raise CommError(
                    f"model layout differs: parameter #{i} is {_describe(a)} on rank 0 but "
                    f"{_describe(b)} on rank {rank}. Every rank must build the same model "
                    "(same model.name, model.kwargs and code)"
                ).agreed()
    return None


def _slot_starts(params: list[torch.nn.Parameter]) -> tuple[list[int], int]:
    """Where each parameter's slot starts in its bucket (in elements), and the bucket's length:
    laid out as the buckets are in their shared window (`shm.aligned_layout`).

    Why each slot starts on a cache line: buckets begin on one, but laid end to end a
    10-element bias first (the last layer's, first in reverse order) shifted every later
    weight by 40 bytes, and the matrix products that read those weights (and, sharded, the
    parameters in shared memory laid out the same way) ran on misaligned rows. The MLP of
    `scripts/bench_train.py` at N = 2, GradSync with these slots against slots end to end
    (four runs, contenders interleaved, two in each creation order): steps 0.16-0.48 ms
    shorter (1.6-4.6% of 10-11 ms), backward 0.2-0.3 ms of that; the CNN's the same within
    noise (two runs). The padding between slots is zeros everywhere and stays zero: no
    gradient lands there, and the optimizers mpiml shards leave a parameter with zero
    gradient and zero state at zero.
    """
    line = max(1, ALIGN_BYTES // params[0].element_size())  # a bucket holds one dtype
    starts, _ = shm.aligned_layout([p.numel() for p in params], line)
    return starts, starts[-1] + params[-1].numel()


def _views(flat: torch.Tensor, params: list[torch.nn.Parameter],
           starts: list[int]) -> list[torch.Tensor]:
    """Each parameter's slot in a flat buffer (from `_slot_starts`), shaped like it."""
    return [flat[start : start + p.numel()].view_as(p)
            for start, p in zip(starts, params, strict=True)]


def _into_slot(param: torch.nn.Parameter, view: torch.Tensor) -> None:
    """Point `param.grad` at `view`, its slot in a bucket, holding the gradient it had (zeros
    if it had none); nothing to do when it already points there."""
    grad = param.grad
    if grad is not None and grad.data_ptr() == view.data_ptr():
        return
    if grad is None:
        view.zero_()
    else:
        view.copy_(grad)
    param.grad = view


def _zeros(n: int, dtype: torch.dtype) -> np.ndarray:
    return numpy_view(torch.zeros(n, dtype=dtype))


def _describe(entry: tuple | None) -> str:
    if entry is None:
        return "missing"
    name, shape, dtype, trainable = entry
    return f"'{name}' {list(shape)} {dtype}" + ("" if trainable else " (frozen)")


def _check_dtypes(dtypes: set[torch.dtype], compression: str) -> None:
    for dtype in dtypes:
        if dtype not in _KIND:
            raise CommError(f"gradients of dtype {dtype} cannot be synchronised; use "
                            f"one of {', '.join(map(str, _KIND))}").agreed()
        if dtype == torch.float64 and _WIRE[compression] is not None:
            raise CommError(f"comm.compression = {compression!r} does not apply to float64 "
                            "gradients; use comm.compression: none").agreed()


@dataclass
class _Bucket:
    index: int
    buffer: torch.Tensor  # flat, one dtype
    params: list[torch.nn.Parameter]
    views: list[torch.Tensor]
    starts: list[int]  # each view's first element in `buffer` (see `_slot_starts`)
    pending: int = 0
    slot: int = 0  # index among the buckets of its dtype (its place in a SharedBuckets)
    future: Future | None = None
    # Where the bucket keeps this rank's own share out of the bucket until the sum (see
    # `GradSync._copy_for_peers`): per parameter, the (start, stop) of its own part in its
    # own coordinates; the gradient each hook copied for the peers, and its version; and the
    # own parts the sum will read from those gradients.
    own: list[tuple[int, int]] | None = None
    copied: list[tuple[torch.Tensor, int] | None] = field(default_factory=list)
    sources: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    # Gradients copied over the peers' parts since the last launch: where those parts hold
    # the peers' parameters (`SharedBuckets.holds_own_parameters`), a zero_grad that comes
    # without a reduction must fetch them again.
    unreduced: bool = False


@dataclass
class _OverlapTuner:
    """Which of overlap on/off makes the shorter step: blocks of `block` steps, alternating.

    Why blocks, and why the first step of each is not timed: steps are timed finish to
    finish, and the wait for the slower rank of one step lands in the next step's time (at
    its first barrier), so a step right after a switch pays for the other mode. Alternating
    every step charged each mode with the other's stragglers (at N = 2 it timed the MLP's
    synchronous step at 16.0 ms where it runs 12.6).
    """

    warmup: int = 3  # steps not timed (allocator, caches, first touches of shared memory)
    block: int = 4  # steps per block; the first of each is not timed
    # per mode: (block - 1) * blocks timed steps of each. Fewer misjudged steps by 5-10% in
    # benchmark runs (see the module docstring); tuning costs 51 steps of a long run.
    blocks: int = 6
    # Overlap must be this much faster to be kept: it costs a thread beside backward, and on a
    # shared machine medians of a few steps differ by a few percent from noise alone.
    margin: float = 0.05
    seen: int = 0
    last: float | None = None
    times: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})

    @property
    def schedule(self) -> list[bool]:
        """The mode of every tuning step: warm-up with overlap, then off, on, off, on..."""
        return [True] * self.warmup + [
            bool(i // self.block % 2) for i in range(2 * self.blocks * self.block)]

    def record(self, now: float, mode: bool) -> bool | None:
        """The mode for the next step, or None when both have had their trials."""
        schedule = self.schedule
        trial = self.seen - self.warmup  # index of the step that just ended among the trials
        if trial >= 0 and trial % self.block and self.last is not None:
            self.times[mode].append(now - self.last)
        self.last = now
        self.seen += 1
        return schedule[self.seen] if self.seen < len(schedule) else None


@dataclass
class SyncStats:
    """Seconds spent since the last `reset`: on the wire, and waited for by the caller."""

    comm_s: float = 0.0
    exposed_s: float = 0.0
    calls: int = 0
    _t: list[float] = field(default_factory=list, repr=False)


class GradSync:
    """Averages gradients across the world; `finish()` after backward, before the step.

    `shard=True` (what the trainer uses, where the buckets are in node-shared memory, see
    `sharded`): the parameters move into shared memory (each rank's own buckets, or one copy
    per node: `SharedBuckets.holds_own_parameters`) and `finish()` leaves each rank the
    average of its own share of every bucket only (`share(i)`, not `.grad`), for
    `optim.shard_optimizer` to step; `zero_grad()` is then the point where the node's ranks
    hand their new shares to each other and wait for each other's updates. Where a rank
    holds the parameters in its buckets, the peers' shares of a parameter are overwritten by
    its gradient once backward is done with it, until `zero_grad()`: do not read the model
    between backward and `zero_grad()` (the trainer does not); a second gradient for a
    parameter before `finish()` (two backward passes without `no_sync`, reentrant
    checkpointing around shared weights) raises CommError.
    """

    def __init__(self, world: World, module: torch.nn.Module, bucket_mb: float = 4.0,
                 overlap: bool | str = "auto", algorithm: str = "auto",
                 compression: str = "none", node_comm: MPI.Comm | None = None,
                 shard: bool = False) -> None:
        if overlap not in (True, False, "auto"):
            raise CommError(f"GradSync overlap={overlap!r}: choose True, False or 'auto'")
        self.world = world
        self.size = world.size
        # Whether hooks may launch buckets on the thread: fixed, or changing while tuning.
        self.overlap = bool(overlap) and world.size > 1
        self._tuner = _OverlapTuner() if overlap == "auto" and self.overlap else None
        self.decision: str | None = None  # what the tuner chose and why, once it has
        self.algorithm = algorithm
        self.stats = SyncStats()
        self._accumulating = False
        self._hooks: list = []
        check_layout(world, module)
        broadcast_module(world, module)
        self.comm: MPI.Comm = world.comm.Dup()  # ours alone: the thread's traffic never mixes
        groups = self._group(module, int(bucket_mb * 2**20))
        _check_dtypes({g[0].dtype for g in groups}, compression)
        # `auto` keeps buckets in node-shared memory where the layout allows (see shm.py);
        # `ring`, `doubling` and `mpi` reduce private buffers over the whole communicator.
        self._shared = self._build_shared(groups, algorithm, compression,
                                          world.node_comm if node_comm is None else node_comm,
                                          shard)
        # Sharded: see `share`. Only where the buckets are shared (else there is no node copy).
        self.sharded = bool(shard and self._shared)
        self.buckets = self._build_buckets(groups)
        if self.sharded:
            self._share_parameters()
        self._next = 0  # index of the next bucket to launch: launches go strictly in order
        self._reducers = {} if self._shared else self._build_reducers(algorithm, compression)
        self._executor = ThreadPoolExecutor(1, "mpiml-comm") if self.overlap else None
        names = {id(p): n for n, p in module.named_parameters()}
        for bucket in self.buckets:  # always: they also move each new gradient in
            self._keep_own_share_out(bucket)
            for i, (param, view) in enumerate(zip(bucket.params, bucket.views, strict=True)):
                self._hooks.append(param.register_post_accumulate_grad_hook(
                    self._make_hook(bucket, view, i, names[id(param)])))
        self.zero_grad()

    # -- layout -------------------------------------------------------------------------------
    @staticmethod
    def _group(module: torch.nn.Module, bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
        """Trainable parameters in reverse order, cut into runs of one dtype, ~bucket_bytes."""
        params = [p for p in module.parameters() if p.requires_grad]
        groups: list[list[torch.nn.Parameter]] = []
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in reversed(params):
            current = by_dtype.setdefault(p.dtype, [])
            current.append(p)
            if sum(q.numel() * q.element_size() for q in current) >= bucket_bytes:
                groups.append(current)
                by_dtype[p.dtype] = []
        return groups + [g for g in by_dtype.values() if g]

    def _build_shared(self, groups: list[list[torch.nn.Parameter]], algorithm: str,
                      compression: str, node_comm: MPI.Comm,
                      params: bool) -> dict[torch.dtype, SharedBuckets]:
        """Shared-memory buckets per dtype, or {} to reduce private ones (decided collectively)."""
        if algorithm != "auto" or self.size == 1 or not shm.usable(self.comm, node_comm):
            return {}
        lengths = [_slot_starts(g)[1] for g in groups]  # padding between slots included
        need = (node_comm.Get_size() + params) * sum(
            n * g[0].element_size() + 64 for n, g in zip(lengths, groups, strict=True))
        free = shm.shm_free_bytes()
        enough = free is None or free >= need * 1.1
        if not all(self.comm.allgather(enough)):
            if self.world.is_root:
                sys.stderr.write(
                    f"mpiml: warning: {shm.SHM_DIR} has too little free space for the gradient "
                    f"buckets in shared memory ({need / 2**20:.0f} MiB per node): reducing by the "
                    "ring instead, which is slower on one node. Enlarge it (docker: --shm-size) "
                    "or set comm.algorithm: ring to silence this\n")
            return {}
        shared = {}
        for dtype in sorted({g[0].dtype for g in groups}, key=str):
            mine = [n for n, g in zip(lengths, groups, strict=True) if g[0].dtype == dtype]
            shared[dtype] = SharedBuckets(self.comm, node_comm, mine, _KIND[dtype],
                                          wire=_WIRE[compression], polling=self.overlap,
                                          params=params)
        return shared

    def _share_parameters(self) -> None:
        """Move every bucketed parameter into its place in shared memory: this rank's own
        bucket, or the node's single copy (`SharedBuckets.holds_own_parameters`). They are
        already broadcast, so the first local rank's values are everyone's."""
        views = [_views(self._shared[b.buffer.dtype].param_tensors[b.slot], b.params, b.starts)
                 for b in self.buckets]
        with torch.no_grad():
            for bucket, bucket_views in zip(self.buckets, views, strict=True):
                shared = self._shared[bucket.buffer.dtype]
                if shared.holds_own_parameters(bucket.slot) or self._node.local_rank == 0:
                    shared.param_tensors[bucket.slot].zero_()  # the padding between slots too
                    for p, view in zip(bucket.params, bucket_views, strict=True):
                        view.copy_(p)
        self._node.fence()  # the copy is complete before any rank points at it
        for bucket, bucket_views in zip(self.buckets, views, strict=True):
            for p, view in zip(bucket.params, bucket_views, strict=True):
                p.data = view

    @property
    def _node(self) -> SharedBuckets:
        """Any of the shared buckets: all span the same node, for its fence and collectives."""
        return next(iter(self._shared.values()))

    # -- sharded update -------------------------------------------------------------------------
    def share(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(parameters, averaged gradients) of the share of bucket `index` this rank updates.

        Why: with `shard=True` the parameters live in shared memory, and each of the node's
        L ranks updates only its 1/L of every bucket, the part whose average it
        computed itself. Nobody copies the other averages in, and the optimizer's work and
        state per rank drop to 1/L. Both are flat views, valid after `finish()` until
        `zero_grad()`. The parameters' `.grad` hold no average: the rest of a bucket is not
        averaged, and on one node the average of the share is left in a peer's bucket
        (`SharedBuckets.average_of_share`).
        """
        bucket = self.buckets[index]
        lo, hi = self.owned(index)
        shared = self._shared[bucket.buffer.dtype]
        return shared.param_tensors[bucket.slot][lo:hi], shared.average_of_share(bucket.slot)

    def owned(self, index: int) -> tuple[int, int]:
        """(start, stop) within bucket `index` of this rank's share (see `share`)."""
        bucket = self.buckets[index]
        return self._shared[bucket.buffer.dtype].owned(bucket.slot)

    def node_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum over the node's ranks (sharded: a sum over shares is a sum over the model)."""
        with self.world.watch("sum over the node"):
            return self._node.node_sum(values)

    def node_gather(self, obj: object) -> list | None:
        """Every local rank's `obj` on the node's first rank, None on the others."""
        with self.world.watch("gather over the node"):
            return self._node.node_gather(obj)

    def _build_buckets(self, groups: list[list[torch.nn.Parameter]]) -> list[_Bucket]:
        buckets = []
        slot: dict[torch.dtype, int] = {}  # a bucket's index among its dtype's shared buffers
        for index, group in enumerate(groups):
            dtype = group[0].dtype
            starts, total = _slot_starts(group)
            slot[dtype] = position = slot.get(dtype, -1) + 1
            if dtype in self._shared:
                buffer = self._shared[dtype].tensors[position]
            else:
                buffer = torch.zeros(total, dtype=dtype)
            views = _views(buffer, group, starts)
            buckets.append(_Bucket(index, buffer, group, views, starts, pending=len(group),
                                   slot=position))
        layout = [(b.buffer.numel(), str(b.buffer.dtype)) for b in buckets]
        self.world.check_same("gradient bucket layout", layout)
        return buckets

    def _keep_own_share_out(self, bucket: _Bucket) -> None:
        """Where its SharedBuckets allows it and the update is sharded, each parameter's part
        in this rank's own share (in the parameter's coordinates) for `_copy_for_peers`.

        Why sharded only: a gradient with an own part lives until its bucket is summed, which
        costs peak memory (`scripts/bench_memory.py`, wide MLP: +1.12-1.91 gradient sizes
        over plain PyTorch in five runs, against +0.96-1.19 before); the unsharded update,
        which holds a whole optimizer state per rank, went from about +2 to +2.36-2.71,
        past the issue's budget."""
        shared = self._shared.get(bucket.buffer.dtype)
        if (not self.sharded or shared is None
                or not shared.keeps_own_share_private(bucket.slot)):
            return
        lo, hi = shared.owned(bucket.slot)
        bucket.own = []
        for view, start in zip(bucket.views, bucket.starts, strict=True):
            n = view.numel()
            ka = min(max(lo - start, 0), n)
            kb = max(min(hi - start, n), ka)
            bucket.own.append((ka, kb))

    def _build_reducers(self, algorithm: str, compression: str) -> dict[torch.dtype, Allreducer]:
        """One Allreducer per gradient dtype, sized for its largest bucket, built once."""
        reducers = {}
        for dtype in sorted({b.buffer.dtype for b in self.buckets}, key=str):
            longest = max(b.buffer.numel() for b in self.buckets if b.buffer.dtype == dtype)
            wire = _WIRE[compression]
            reducers[dtype] = Allreducer(self.comm, longest, _KIND[dtype], algorithm=algorithm,
                                         wire=wire, average=True, polling=self.overlap)
        return reducers

    def zero_grad(self) -> None:
        """Forget every gradient: the next backward's land in their buckets.

        Why `.grad = None` and not zeroed buckets (PyTorch's `zero_grad(set_to_none=False)`):
        zeroing writes every bucket once and autograd then reads it back to add the new
        gradient (two reads and two writes of the model's gradients per step); with `.grad`
        None autograd hands over the gradient it just computed and the hook copies it into
        the bucket (one read, one write) and points `.grad` at its slot, so later micro-batches
        add straight into the bucket. In node-shared buckets the hook copies only what the
        node's peers sum, and this rank's own share stays in autograd's tensor (where later
        micro-batches add) until the sum reads it (`_copy_for_peers`). A parameter that gets
        no gradient is zeroed at launch.
        Measured at N = 2 on the 2-core machine, the same loop both ways, interleaved: the
        MLP's step 3-4% shorter (three runs), the wide MLP's 1% and 8% (two runs).

        Sharded, this is also where the node's ranks wait for each other (collective on the
        node): every share must be updated before anyone reads the parameters again, and
        every peer done reading this rank's gradients before they are overwritten. So call it
        after the optimizer step, once per step, on every rank (the trainer does).
        """
        if self.sharded:
            start = time.perf_counter()
            with self.world.watch("parameter update"):  # a dead peer stalls us here too
                for shared in self._shared.values():
                    shared.hand_back()
                self._node.fence()
            self.stats.exposed_s += time.perf_counter() - start
            for bucket in self.buckets:  # a backward that no finish() followed
                if bucket.unreduced:
                    self._shared[bucket.buffer.dtype].fetch_peer_shares(bucket.slot)
                    bucket.unreduced = False
        for bucket in self.buckets:
            for param in bucket.params:
                param.grad = None
            bucket.pending = len(bucket.params)
            bucket.future = None
            if bucket.own is not None:  # drop what a step that never launched left behind
                bucket.sources = []
                bucket.copied = [None] * len(bucket.params)
        self._next = 0

    # -- accumulation ---------------------------------------------------------------------------
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally, without communication."""
        self._accumulating = True
        try:
            yield
        finally:
            self._accumulating = False

    # -- launching ----------------------------------------------------------------------------
    def _make_hook(self, bucket: _Bucket, view: torch.Tensor, i: int, name: str):
        shared = self._shared.get(bucket.buffer.dtype)
        holds_parameters = shared is not None and shared.holds_own_parameters(bucket.slot)

        def hook(param: torch.nn.Parameter) -> None:
            if bucket.own is None:
                _into_slot(param, view)  # the first gradient since zero_grad: into its bucket
            elif not self._accumulating:
                if holds_parameters and (bucket.copied[i] is not None
                                         or param.grad.data_ptr() == view.data_ptr()):
                    raise CommError(
                        f"parameter {name!r} got a second gradient before finish(): its "
                        "peers' shares were overwritten by the first one (the parameters live "
                        "in the gradient buckets, comm.shard_optimizer with small shares), so "
                        "the forward or backward since read gradients as weights. Accumulate "
                        "micro-batches under GradSync.no_sync() (the trainer does), avoid "
                        "reentrant activation checkpointing around shared weights, or set "
                        "comm.shard_optimizer: false")
                self._copy_for_peers(bucket, i)
            if self._accumulating or not self.overlap:
                return
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_ready()
        return hook

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending <= 0:
            self._launch(self.buckets[self._next])

    def _launch(self, bucket: _Bucket) -> None:
        self._adopt_foreign_grads(bucket)
        self._next = bucket.index + 1
        if self.overlap:
            bucket.future = self._executor.submit(self._reduce, bucket)
        else:
            self._reduce(bucket)

    def _copy_for_peers(self, bucket: _Bucket, i: int) -> None:
        """Copy the parts of parameter i's new gradient that the node's peers sum into its
        slot, and leave this rank's own part where autograd put it (the sum reads it there).

        Why: the whole gradient would be copied into the bucket and the own part read back
        by the sum; this way the own part (1/L of the gradients) is never copied, one read and
        one write of it less per step. Measured at N = 2 (bench_train with contenders both
        ways in the same run, two runs): the wide MLP's step 2-5% shorter, with and without
        overlap; the MLP's the same within noise. The cost is memory: each gradient with an
        own part lives until its bucket is summed (see `_keep_own_share_out`). While
        accumulating (`no_sync`) nothing is copied: autograd keeps adding into the same
        `.grad`, and the last backward copies the total.

        Why a copy at all, rather than the matrix product writing the weight gradient into its
        slot (as Megatron-LM's gradient-accumulation fusion does on GPUs): an experiment gave
        each `nn.Linear` a backward computing it with `torch.mm(..., out=slot)`, and the MLP of
        `scripts/bench_train.py` at N = 2 (2026-12-05, four runs, both creation orders) took
        0.41-0.70 ms longer per step, backward 0.01-0.41 ms of it: the product's stores then
        land on lines the peer wrote last, and the own part goes through the shared bucket.
        """
        param, view = bucket.params[i], bucket.views[i]
        grad = param.grad
        if grad is None or grad.data_ptr() == view.data_ptr() or not grad.is_contiguous():
            return  # `_adopt_foreign_grads` moves it whole
        ka, kb = bucket.own[i]
        flat, slot = grad.view(-1), view.view(-1)
        slot[:ka].copy_(flat[:ka])
        slot[kb:].copy_(flat[kb:])
        bucket.unreduced = True
        if ka == kb:  # nothing of ours: the gradient can go
            param.grad = view
            bucket.copied[i] = None
        else:
            bucket.copied[i] = (grad, grad._version)

    def _adopt_foreign_grads(self, bucket: _Bucket) -> None:
        """Every `.grad` of the bucket in its slot: zeros where backward gave none, a copy where
        something replaced it after the hook (e.g. `optimizer.zero_grad()`). Where the bucket
        keeps the own share out, the own parts are listed for the sum and only the rest is
        copied (if the hook has not already copied it, for this very gradient)."""
        if bucket.own is None:
            for param, view in zip(bucket.params, bucket.views, strict=True):
                _into_slot(param, view)
            return
        sources = []
        for i, (param, view, offset) in enumerate(zip(bucket.params, bucket.views, bucket.starts,
                                                     strict=True)):
            grad, (ka, kb) = param.grad, bucket.own[i]
            if ka < kb and grad is None:  # no gradient: zeros, and the own part is not read
                slot = view.view(-1)  # from the slot (it may hold this rank's parameters)
                slot[:ka].zero_()
                slot[kb:].zero_()
                sources.append((offset + ka, offset + kb, _zeros(kb - ka, view.dtype)))
                param.grad = view
            elif ka < kb and grad.data_ptr() != view.data_ptr():
                if not grad.is_contiguous():
                    grad = param.grad = grad.contiguous()
                if bucket.copied[i] is None or bucket.copied[i][0] is not grad \
                        or bucket.copied[i][1] != grad._version:
                    self._copy_for_peers(bucket, i)
                sources.append((offset + ka, offset + kb, numpy_view(grad.view(-1)[ka:kb])))
                param.grad = view
            else:
                _into_slot(param, view)
            bucket.copied[i] = None
        bucket.sources = sources
        bucket.unreduced = False  # the reduction that follows hands the parameters back

    def _reduce(self, bucket: _Bucket) -> None:
        start = time.perf_counter()
        shared = self._shared.get(bucket.buffer.dtype)
        if shared is not None:
            shared.reduce(bucket.slot, whole=not self.sharded, sources=bucket.sources)
            bucket.sources = []  # the gradients autograd made can go
        else:
            self._reducers[bucket.buffer.dtype](numpy_view(bucket.buffer))  # averages in place
        self.stats.comm_s += time.perf_counter() - start
        self.stats.calls += 1

    # -- completion ---------------------------------------------------------------------------
    def finish(self, bucket_done: Callable[[int], None] | None = None) -> None:
        """Launch what backward left (unused parameters), wait for all, leave averages in .grad
        (sharded: in `share(i)` instead).

        `bucket_done(i)`, if given, is called for each bucket in order as soon as its average
        is there (the parameters are `self.buckets[i].params`), while later buckets may
        still be on the wire: the trainer steps the optimizer there, bucket by bucket.
        Only the time spent waiting counts as exposed communication.
        """
        start = time.perf_counter()
        busy = 0.0
        with self.world.watch("gradient allreduce"):  # a dead peer stalls us here
            for bucket in self.buckets[self._next :]:
                self._launch(bucket)
            for bucket in self.buckets:
                if bucket.future is not None:
                    bucket.future.result()  # re-raises a failure of the communication thread
                    bucket.future = None
                if bucket_done is not None:
                    begin = time.perf_counter()
                    bucket_done(bucket.index)
                    busy += time.perf_counter() - begin
        end = time.perf_counter()
        self.stats.exposed_s += end - start - busy
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
        self._next = 0
        if self._tuner is not None:
            self._tune(end)

    @property
    def tuning(self) -> bool:
        """True while `overlap="auto"` is still timing the two modes (never on one rank)."""
        return self._tuner is not None

    def _tune(self, now: float) -> None:
        """Record the step that just ended under the current mode; switch, or decide."""
        tuner = self._tuner
        mode = tuner.record(now, self.overlap)
        if mode is not None:
            self._set_overlap(mode)
            return
        # Every rank has made the same number of steps: decide on the slowest rank's medians.
        on, off = (statistics.median(tuner.times[m]) for m in (True, False))
        slowest = np.array([on, off])
        self.comm.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
        on, off = slowest.tolist()
        self._tuner = None
        keep = on < off * (1 - tuner.margin)
        self._set_overlap(keep)
        self.decision = (f"comm.overlap auto: {'on' if keep else 'off'} (median step "
                         f"{on * 1e3:.1f} ms with overlap, {off * 1e3:.1f} ms without, "
                         f"{len(tuner.times[True])} steps each)")

    def _set_overlap(self, on: bool) -> None:
        """Between steps only: the thread is idle and no bucket is in flight."""
        self.overlap = on
        for reducer in [*self._reducers.values(), *self._shared.values()]:
            reducer.polling = on  # a thread beside backward yields; the caller alone spins

    def reset_stats(self) -> SyncStats:
        stats, self.stats = self.stats, SyncStats()
        return stats

    # -- life cycle -----------------------------------------------------------------------------
    def close(self, wait: bool = True) -> None:
        """Stop the communication thread. `wait=False` when this rank fails alone: an
        allreduce in flight would wait for the other ranks for ever, so it is left behind."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=not wait)
            self._executor = None
        if not wait:
            return
        for reducer in self._reducers.values():
            reducer.close()
        if self._shared:  # .grad (and sharded parameters) must not outlive their window
            for bucket in self.buckets:
                if self.sharded:
                    for param in bucket.params:
                        param.data = param.data.clone()
                for param, view in zip(bucket.params, bucket.views, strict=True):
                    if param.grad is not None and param.grad.data_ptr() == view.data_ptr():
                        param.grad = view.clone()
                bucket.buffer = torch.empty(0, dtype=bucket.buffer.dtype)
                bucket.views = []
            for shared in self._shared.values():
                shared.close()
            self._shared = {}
        if self.comm != MPI.COMM_NULL and not MPI.Is_finalized():
            self.comm.Free()
        self.comm = MPI.COMM_NULL

    def __enter__(self) -> GradSync:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(wait=not unwinding_alone(exc))
