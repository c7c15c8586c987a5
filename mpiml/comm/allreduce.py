"""`Allreducer`: the one entry point for summing flat gradient buffers across ranks.

Build one per dtype, once, with the largest buffer it will see; then call it on buffers of
any length up to that. It owns all its scratch memory, so a call allocates no array (only a
few small Python objects for MPI requests).

Algorithms:

* ``"ring"``: the segmented, pipelined ring of `ring.pipelined_ring_allreduce`, on buffers
  allocated once. Bandwidth-optimal, and on one node faster than MPI's own `Allreduce` for
  large buffers (MPICH allocates a fresh temporary per large call): at N = 2, 16-64 MiB,
  0.25-0.75x MPICH's time.
* ``"mpi"``: MPI's own `Allreduce(IN_PLACE, buf)`. Latency-tuned (one C call instead of
  2(N-1) Python-driven steps), so it wins for small buffers. Kept as a choice for
  comparison and as a fallback.
* ``"doubling"``: recursive doubling (`doubling.py`), power-of-two N only: log2(N) swaps of
  the whole buffer. At N = 2 it is one Sendrecv and one add per segment.
* ``"staged"``: every rank of the communicator on one node only: the buffer is summed
  through two sets of node-shared slots (`staged.py`), plain copies between two barriers, no
  message at all. At N = 2 on the 2-core machine 0.44-0.86x MPI's time at 128-512 KiB and
  0.47-0.82x at 1-8 MiB, ahead of the ring there; at 16 MiB ahead of it or behind it
  depending on the machine's state (see `staged.py` and `_Tuner`).
* ``"auto"`` (the default): where every rank shares one node, ``"staged"`` from
  `staged.STAGED_MIN_BYTES` (128 KiB), and from 1 MiB up to `staged.STAGED_MAX_BYTES` (16 MiB,
  less with many ranks per node) whichever of ``"staged"`` and ``"ring"`` (and at 1 MiB, at
  power-of-two N, ``"doubling"``) the `_Tuner` times fastest on this machine, now. Otherwise
  ``"mpi"`` for buffers under `small_threshold_bytes` (1 MiB, measured at N = 2 on the 2-core
  machine with `scripts/bench_allreduce.py`), ``"ring"`` from there up. With a compressed wire
  (which MPI cannot add in float32): ``"doubling"`` below the threshold at power-of-two N, else
  ``"ring"``. Doubling is no fixed choice for large float32 buffers even at N = 2 (the tuner
  times it at 1 MiB only), where it sends as much as the ring: it adds the whole buffer where
  the ring adds half, and it rewrites every page it has just sent. Where the MPI moves large
  messages by a single copy out of the sender's pages (MPICH's CMA), touching a page again
  after a peer read it can cost a page fault: on the 2-core machine, in about one run in three,
  a 1 MiB doubling took 2.2-2.5x MPI's Allreduce while the ring stayed at 1.0-1.2x (and at
  0.8-0.97x, like doubling, in the other runs).

Precision: float32 and float64 are summed in their own type. float16 and bfloat16 buffers
are summed in float32. A torch bfloat16 tensor has no numpy dtype: pass its bits,
``t.view(torch.int16).numpy()`` (int16 or uint16 both accepted), with ``dtype="bfloat16"``.
What travels between ranks is the *wire* type:

* ``wire="float32"`` (the default for half buffers): the buffer is widened into a float32
  work buffer, reduced as float32, and rounded back once at the end. Most accurate.
* ``wire=<the half type>`` (compression; also allowed for float32 buffers): the buffer
  (rounded to the half type if it was float32) travels as 16-bit values; each rank that
  receives a partial sum widens it and its own values to float32, adds in float32, and
  rounds the partial sum back to 16 bits before passing it on. Half the traffic; the result
  carries up to N-1 extra roundings in the half type (N = ranks). MPI cannot add 16-bit
  values in float32, so compression runs on "ring" or "doubling" only.

Every rank ends with the same bits, for every algorithm and dtype:

* ring: each element's final value is computed by exactly one rank (its chunk's owner after
  the reduce-scatter) and then only copied; rounding back to a half type and averaging happen
  on that owner, before the copy, or on identical bits on every rank.
* doubling: partners add in one operand order (lower rank's value first), so they hold the
  same bits after every step (see `doubling.py`).
* staged: as the ring, each share is summed by its owner alone and then only copied.
* mpi: MPI itself does not promise identical results on all ranks. MPICH's allreduce
  algorithms combine each element once in a fixed tree, or in pairs where a + b == b + a holds
  bitwise (barring two different NaN payloads); `tests/mpi/test_allreduce_mpi.py` checks it
  for every length it tries. With another MPI, run those tests before trusting "mpi"/"auto".

Every rank must pass a buffer of the same length and dtype on every call, in the same order,
as with any MPI collective; the constructor checks that all ranks configured the same
reducer (one small allgather), calls do not (that would cost a collective each).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from mpiml.comm.doubling import doubling_allreduce, doubling_scratch_length, is_power_of_two
from mpiml.comm.ring import (
    DEFAULT_WINDOW,
    blocking_wait,
    pipelined_ring_allreduce,
    polling_wait,
    scratch_length,
    segment_bounds,
)
from mpiml.comm.staged import (
    NODE_BUDGET_BYTES,
    STAGED_MAX_BYTES,
    STAGED_MIN_BYTES,
    TUNED_MIN_BYTES,
    StagedSum,
    divide,
)
from mpiml.errors import CommError

ALGORITHMS = ("auto", "ring", "doubling", "mpi", "staged")
DTYPES = ("float32", "float64", "float16", "bfloat16")

# Measured with scripts/bench_allreduce.py at N=2 on the 2-core machine: MPICH's Allreduce
# wins below ~768 KiB (one C call against Python-driven steps), the pipelined ring from 1 MiB
# up (doubling ties with it at 1 MiB in most runs and loses 2x in some: see "auto" above).
# 1 MiB segments beat 256 KiB and 512 KiB ones from 2 MiB up (fewer Python steps), and a
# window of two still fits in L2.
DEFAULT_SMALL_THRESHOLD_BYTES = 1 << 20
DEFAULT_SEGMENT_BYTES = 1 << 20

_NUMPY = {"float32": np.float32, "float64": np.float64, "float16": np.float16}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HALF = ("float16", "bfloat16")
_BOUNDS_CACHE = 32  # buffer lengths whose segment layout we remember


def storage_dtype(kind: str) -> np.dtype:
    """numpy dtype that holds `kind`'s bits (bfloat16 travels as int16)."""
    return np.dtype(np.int16) if kind == "bfloat16" else np.dtype(_NUMPY[kind])


def as_torch(array: np.ndarray, kind: str) -> torch.Tensor:
    """A torch view (shared memory) of `array`, read as `kind`."""
    tensor = torch.from_numpy(array)
    return tensor.view(_TORCH[kind]) if kind == "bfloat16" else tensor


@dataclass(frozen=True)
class AllreduceConfig:
    """What every rank must agree on; validated on construction, naming the bad field."""

    max_elements: int
    dtype: str = "float32"
    algorithm: str = "auto"
    wire: str | None = None
    average: bool = False
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    small_threshold_bytes: int = DEFAULT_SMALL_THRESHOLD_BYTES
    polling: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CommError(f"Allreducer dtype={self.dtype!r}: choose one of {DTYPES}")
        if self.algorithm not in ALGORITHMS:
            raise CommError(f"Allreducer algorithm={self.algorithm!r}: choose one of {ALGORITHMS}")
        if self.max_elements < 0:
            raise CommError(f"Allreducer max_elements={self.max_elements}: must be >= 0")
        if self.segment_bytes < 64:
            raise CommError(f"Allreducer segment_bytes={self.segment_bytes}: must be >= 64")
        if self.small_threshold_bytes < 0:
            raise CommError(
                f"Allreducer small_threshold_bytes={self.small_threshold_bytes}: must be >= 0"
            )
        allowed = {
            "float32": ("float32", "float16", "bfloat16"),
            "float64": ("float64",),
            "float16": ("float32", "float16"),
            "bfloat16": ("float32", "bfloat16"),
        }[self.dtype]
        if self.wire_dtype not in allowed:
            raise CommError(
                f"Allreducer wire={self.wire!r} for dtype={self.dtype!r}: choose one of {allowed}"
            )
        if self.compressed and self.algorithm in ("mpi", "staged"):
            why = ("MPI's Allreduce cannot add 16-bit values in float32" if self.algorithm == "mpi"
                   else "'staged' sends nothing between ranks that compression could shrink")
            raise CommError(
                f"Allreducer wire={self.wire!r} (compression) needs algorithm 'ring' or 'auto': "
                + why
            )

    @property
    def wire_dtype(self) -> str:
        """The type that travels between ranks."""
        if self.wire is not None:
            return self.wire
        return "float32" if self.dtype in _HALF else self.dtype

    @property
    def compressed(self) -> bool:
        """True when 16-bit values travel and are added in float32 on arrival."""
        return self.wire_dtype in _HALF


@dataclass
class _Tuner:
    """Which of our algorithms sums a size class fastest, timed where it runs.

    Why not a fixed threshold: on one node they trade places with the machine's state. At
    N = 2 on the 2-core machine (ten runs of `scripts/bench_allreduce.py`, 2026-12-04, time
    over MPI's), staged led at 1-4 MiB in every run (0.47-0.79 at 1 MiB), but the ring led at
    8 MiB in two runs and at 16 MiB in six (0.68-1.20 there, staged 0.70-1.02). At 1 MiB
    recursive doubling (one message each way instead of two) took 0.91 in the fastest run
    and up to 2.4 in slow ones. Before staged published its sums into its peers' slots
    (`staged.py`), the ring led from 4 MiB and doubling at 1 MiB in the machine's fast
    states, and staged in its slow ones. So per power-of-two size class, the first `trials`
    calls of each candidate run in turn; every rank's median per candidate (the first call of
    each left out: it pays for what the others left in the caches) is combined, the slowest
    rank's counting (one small allreduce, which every rank reaches at the same call, as calls
    come in the same order everywhere); the fastest runs until `every` calls later the class
    is timed again. Doubling is a candidate (power-of-two N only) below `doubling_below` bytes.

    Why 9 calls each: with 5 (4 counted) the tuner kept an algorithm slower than another in
    5 of 40 size-runs at 1-16 MiB, by up to 26%, and with 9 in none of 40 (eight runs each,
    interleaved, 2026-12-04). A round every 512 calls costs about what 5 every 256 did.
    """

    doubling_below: int = 0
    trials: int = 9  # calls of each candidate per round; the first of each is not counted
    every: int = 512  # calls between rounds
    classes: dict[int, _SizeClass] = field(default_factory=dict)  # by nbytes.bit_length()

    def candidates(self, nbytes: int) -> tuple[str, ...]:
        if nbytes < self.doubling_below:
            return ("staged", "ring", "doubling")
        return ("staged", "ring")

    def _class(self, nbytes: int) -> _SizeClass:
        key = nbytes.bit_length()
        if key not in self.classes:
            self.classes[key] = _SizeClass({name: [] for name in self.candidates(nbytes)})
        return self.classes[key]

    def _timing(self, size_class: _SizeClass) -> bool:
        """Whether the class's next call belongs to a round."""
        return (size_class.choice is None
                or size_class.calls % self.every < len(size_class.times) * self.trials)

    def choice(self, nbytes: int) -> str:
        """What this class runs once timed ("staged" until then)."""
        size_class = self.classes.get(nbytes.bit_length())
        return (size_class.choice if size_class else None) or "staged"

    def next(self, nbytes: int) -> str:
        """The algorithm of this call: candidates in turn during a round, else the choice."""
        size_class = self._class(nbytes)
        if self._timing(size_class):
            names = list(size_class.times)
            return names[size_class.calls % len(names)]
        return size_class.choice

    def record(self, nbytes: int, algorithm: str, seconds: float,
               agree: Callable[[np.ndarray], None]) -> None:
        """Count the call; at the end of a round agree with every rank on the fastest."""
        size_class = self._class(nbytes)
        timing = self._timing(size_class)
        position = size_class.calls % self.every
        size_class.calls += 1
        if not timing:
            return
        times = size_class.times
        times[algorithm].append(seconds)
        if position == len(times) * self.trials - 1:
            medians = np.array([statistics.median(t[1:]) for t in times.values()])
            agree(medians)
            size_class.choice = list(times)[int(np.argmin(medians))]
            for t in times.values():
                t.clear()


@dataclass
class _SizeClass:
    """The tuner's record of one power-of-two class of buffer sizes."""

    times: dict[str, list[float]]  # seconds per candidate in the current round
    calls: int = 0
    choice: str | None = None


class Allreducer:
    """Sum (or average) flat buffers across all ranks of `comm`, in place.

    `Allreducer(comm, max_elements, dtype="float32", *, algorithm="auto", wire=None,
    average=False, segment_bytes=1 MiB, small_threshold_bytes=1 MiB, polling=False)`; a collective
    constructor (every rank, same arguments). Then `reducer(buf)` on every rank, where `buf` is
    a contiguous 1-D numpy array of at most `max_elements` elements of `dtype` (int16/uint16
    bits for bfloat16), the same length on every rank. See the module docstring for the
    algorithms, wire types and why every rank ends with the same bits.

    `polling=True` is for a communication thread that shares a core with computation (the
    gradient sync during backward): waits test and sleep instead of spinning
    (`ring.polling_wait`), and the MPI path is a nonblocking `Iallreduce` waited on the same
    way, so a rank waiting for a slower peer leaves its core to its own backward pass.
    """

    def __init__(
        self,
        comm: MPI.Comm,
        max_elements: int,
        dtype: str = "float32",
        *,
        algorithm: str = "auto",
        wire: str | None = None,
        average: bool = False,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        small_threshold_bytes: int = DEFAULT_SMALL_THRESHOLD_BYTES,
        polling: bool = False,
    ) -> None:
        self.config = config = AllreduceConfig(
            int(max_elements), dtype, algorithm, wire, bool(average), int(segment_bytes),
            int(small_threshold_bytes), bool(polling),
        )
        self.comm = comm
        self.size: int = comm.Get_size()
        everyone = comm.allgather(config)
        differ = [r for r, c in enumerate(everyone) if c != everyone[0]]
        if differ:
            raise CommError(
                f"Allreducer built differently on rank(s) {differ} than on rank 0 "
                f"({everyone[0]} there, {config} here); every rank must pass the same arguments"
            )
        self._storage = storage_dtype(dtype)
        wire_kind = config.wire_dtype
        wire_np = storage_dtype(wire_kind)
        self._segment = max(1, config.segment_bytes // wire_np.itemsize)
        # A work buffer in the wire type when the buffer itself cannot travel as it is.
        self._work = (
            np.empty(config.max_elements, dtype=wire_np) if wire_kind != dtype else None
        )
        self._work_t = as_torch(self._work, wire_kind) if self._work is not None else None
        if config.algorithm == "doubling" and not is_power_of_two(self.size):
            raise CommError(
                f"Allreducer algorithm='doubling' needs a power-of-two number of ranks, not "
                f"{self.size}; use 'auto' or 'ring'"
            )
        # Scratch for whichever of ring and doubling may run: a window of segments at most.
        slot = min(self._segment, scratch_length(config.max_elements, self.size))
        need = DEFAULT_WINDOW * slot
        if is_power_of_two(self.size):
            need = max(need, doubling_scratch_length(config.max_elements, self._segment))
        self._scratch = np.empty(need, dtype=wire_np)
        if config.compressed:  # float32 staging for one segment's add
            self._acc = torch.empty(2 * self._segment, dtype=torch.float32)
        self._bounds: dict[int, list[list[tuple[int, int]]]] = {}
        self._combine = self._build_combine()
        # Plain float buffers under the threshold with no averaging go straight to MPI.
        self._mpi_fast_ok = (config.algorithm in ("auto", "mpi") and self._work is None
                             and not config.compressed and not config.average
                             and self.size > 1)
        self.polling = config.polling  # sets the wait and whether the fast path may block
        self._small = (config.small_threshold_bytes if config.algorithm == "auto"
                       else float("inf"))
        self._max = config.max_elements
        self._staged = self._build_staged(wire_np)
        self._staged_bytes = 0  # "auto" stages buffers from STAGED_MIN_BYTES up to this
        self._tuner: _Tuner | None = None
        if self._staged is not None and config.algorithm == "auto":
            self._small = min(self._small, STAGED_MIN_BYTES)  # staged beats MPI from there
            self._staged_bytes = self._staged.capacity * wire_np.itemsize
            # Doubling ties with the ring at 1 MiB or beats it, and loses from 2 MiB.
            self._tuner = _Tuner(TUNED_MIN_BYTES * 2 if is_power_of_two(self.size) else 0)

    # -- the call -----------------------------------------------------------------------------
    def __call__(self, buf: np.ndarray) -> None:
        """Sum `buf` over all ranks in place (divided by the number of ranks if `average`)."""
        if (self._mpi_fast and buf.dtype == self._storage and buf.nbytes < self._small
                and buf.ndim == 1 and buf.flags.c_contiguous and buf.size <= self._max):
            # The latency path, kept short: every microsecond shows at 4 KiB.
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return
        if buf.dtype != self._storage or buf.ndim != 1 or not buf.flags.c_contiguous:
            if not (self.config.dtype == "bfloat16" and buf.dtype == np.uint16):
                raise CommError(
                    f"Allreducer({self.config.dtype}) got a {buf.dtype} array of shape "
                    f"{buf.shape}; pass a contiguous 1-D {self._storage} array"
                )
            buf = buf.view(np.int16)
        n = buf.size
        if n > self.config.max_elements:
            raise CommError(
                f"buffer of {n} elements exceeds this Allreducer's max_elements="
                f"{self.config.max_elements}; build it with the largest bucket size"
            )
        if n == 0:
            return
        if self.size == 1:
            return  # the sum over one rank is the buffer itself; averaging divides by 1
        if self._work is None:
            self._reduce(buf)
            return
        # Widen or narrow into the wire type, reduce there, bring the result back.
        kind = self.config.dtype
        work_t = self._work_t[:n]
        work_t.copy_(as_torch(buf, kind))
        self._reduce(self._work[:n])
        as_torch(buf, kind).copy_(work_t)

    @property
    def polling(self) -> bool:
        """Whether waits test and sleep (`ring.polling_wait`) rather than spin; settable
        between calls, so one reducer can serve a communication thread and a plain caller."""
        return self._wait is polling_wait

    @polling.setter
    def polling(self, value: bool) -> None:
        self._wait = polling_wait if value else blocking_wait
        self._mpi_fast = self._mpi_fast_ok and not value

    def algorithm_for(self, nbytes: int) -> str:
        """Which algorithm a buffer of `nbytes` (on the wire) takes: "ring", "doubling" or "mpi"."""
        algorithm = self.config.algorithm
        if algorithm != "auto":
            return algorithm
        if self.config.compressed:  # MPI cannot add 16-bit values in float32
            small = nbytes < self.config.small_threshold_bytes and is_power_of_two(self.size)
            return "doubling" if small else "ring"
        if self._tuned(nbytes):
            return self._tuner.choice(nbytes)
        if STAGED_MIN_BYTES <= nbytes <= self._staged_bytes:
            return "staged"
        if nbytes < self.config.small_threshold_bytes:
            return "mpi"
        return "ring"

    # -- internals ------------------------------------------------------------------------------
    def _reduce(self, wire: np.ndarray) -> None:
        """Reduce `wire` (already in the wire type) in place with the chosen algorithm."""
        nbytes = wire.nbytes
        if not self._tuned(nbytes):
            self._run(self.algorithm_for(nbytes), wire)
            return
        algorithm = self._tuner.next(nbytes)
        start = time.perf_counter()
        self._run(algorithm, wire)
        self._tuner.record(nbytes, algorithm, time.perf_counter() - start,
                           lambda times: self._mpi_allreduce(times, MPI.MAX))

    def _tuned(self, nbytes: int) -> bool:
        """Whether "auto" times its algorithms against each other at this size."""
        return self._tuner is not None and TUNED_MIN_BYTES <= nbytes <= self._staged_bytes

    def _mpi_allreduce(self, buf: np.ndarray, op: MPI.Op) -> None:
        """MPI's own allreduce in place, waited on as this reducer waits (see `polling`)."""
        if self._wait is polling_wait:
            self._wait(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=op))
        else:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=op)

    def _run(self, algorithm: str, wire: np.ndarray) -> None:
        if algorithm == "mpi":
            self._mpi_allreduce(wire, MPI.SUM)
            if self.config.average:
                divide(wire, self.size)
            return
        if algorithm == "staged":
            self._staged(wire, self._wait)
            return
        if algorithm == "doubling":
            doubling_allreduce(self.comm, wire, self._scratch, self._segment, self._combine,
                               wait=self._wait)
            return
        bounds = self._bounds.get(wire.size)
        if bounds is None:
            if len(self._bounds) >= _BOUNDS_CACHE:
                self._bounds.clear()
            bounds = self._bounds[wire.size] = segment_bounds(wire.size, self.size, self._segment)
        pipelined_ring_allreduce(self.comm, wire, self._scratch, bounds, self._combine,
                                 wait=self._wait)

    def _build_staged(self, wire: np.dtype) -> StagedSum | None:
        """Shared slots for "staged", and for "auto" up to `STAGED_MAX_BYTES`, when every rank
        shares one node (collective; None on every rank otherwise)."""
        config = self.config
        if config.algorithm not in ("auto", "staged") or config.compressed or self.size == 1:
            return None
        capacity, budget, least = config.max_elements, None, 1
        if config.algorithm == "auto":
            capacity = min(capacity, STAGED_MAX_BYTES // wire.itemsize)
            budget, least = NODE_BUDGET_BYTES, STAGED_MIN_BYTES // wire.itemsize
            if capacity < least:
                return None
        staged = StagedSum.build(self.comm, capacity, wire, config.average, budget, least)
        if staged is None and config.algorithm == "staged":
            raise CommError(
                "Allreducer algorithm='staged' needs every rank of the communicator on one node "
                f"and room in /dev/shm for two slots of {capacity} x {wire} per rank; use "
                "'auto' (which stages only where it can) or 'ring'"
            ).agreed()
        return staged

    def _build_combine(self):
        """The per-segment fold for the ring: add (and on the owner's last step, average)."""
        size, average = self.size, self.config.average
        if not self.config.compressed:

            def combine(target: np.ndarray, incoming: np.ndarray, last: bool,
                        incoming_first: bool = False) -> None:
                if incoming_first:  # operand order fixed by rank: see doubling.py
                    np.add(incoming, target, out=target)
                else:
                    np.add(target, incoming, out=target)
                if last and average:
                    divide(target, size)

            return combine

        kind = self.config.wire_dtype
        acc = self._acc

        def combine_half(target: np.ndarray, incoming: np.ndarray, last: bool,
                         incoming_first: bool = False) -> None:
            n = target.size
            mine, theirs = acc[:n], acc[n:2 * n]
            mine.copy_(as_torch(target, kind))
            theirs.copy_(as_torch(incoming, kind))
            first, second = (theirs, mine) if incoming_first else (mine, theirs)
            first.add_(second)
            if last and average:
                first.div_(size)
            as_torch(target, kind).copy_(first)

        return combine_half

    # -- life cycle: `with` works too -------------------------------------------------------------
    def close(self) -> None:
        """Release the buffers; collective on `comm` when shared slots were built."""
        if self._staged is not None:
            self._staged.close()
            self._staged = None
        self._work = self._work_t = None
        self._scratch = np.empty(0, dtype=self._scratch.dtype)
        self._bounds.clear()

    def __enter__(self) -> Allreducer:  # noqa: PYI034 - Self needs 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
