"""`Engine`: runs collectives in submission order, checked across ranks before any data moves.

One engine owns a duplicated communicator and one background thread. Asynchronous calls
(`submit`) go to the thread and return a `Handle`; blocking calls (`run`) execute on the caller's
thread when nothing is queued (a 16-byte allreduce then costs two small MPI calls, no thread
hand-off) and wait behind the queue otherwise. Either way ops execute one at a time in the order
they were submitted, and MPI matches them by that order: every rank must submit the same
collectives in the same order, as with MPI itself. Horovod matches ops by name instead; here a
name, when every rank gives one, is only checked.

Before each collective every rank contributes a signature of 12 integers (`Allgather`, a few
microseconds): the kind of op, dtype, reduction op, root, element count, shape hash, name hash,
scale factors and a flag for a local error. If they differ where they must agree, every rank
gathers a readable description of every rank's call and raises the same `CollectiveError`
naming what differed and on which ranks: a mismatch is an error everywhere, never a hang, and
the engine stays usable (every rank skipped the op).

Tiny allreduces and broadcasts (up to 256 bytes) travel inside that same exchange: the block
every rank contributes is the signature plus 256 bytes of payload, always the same size, so
the exchange matches whatever the op is. When the signatures agree, each rank reduces the
gathered payloads itself, in rank order (every rank gets the same bits): one MPI call
instead of two.

`join` follows Horovod: a rank that joined keeps answering the others' collectives until all
have joined, contributing the identity of the reduction (zeros for Sum and Average) to their
allreduces; other collectives while a rank has joined are an error on every rank.
"""

from __future__ import annotations

import math
import queue
import struct
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from mpiml.comm import ops
from mpiml.comm.ops import DTYPE_CODE, OP_NAMES, dtype_name
from mpiml.comm.ring import blocking_wait, polling_wait
from mpiml.errors import CommError

(ALLREDUCE, ALLGATHER, BROADCAST, ALLTOALL, REDUCESCATTER, BARRIER, JOIN, BCAST_OBJECT,
 ALLGATHER_OBJECT, SHUTDOWN) = range(1, 11)
KIND_NAMES = {ALLREDUCE: "allreduce", ALLGATHER: "allgather", BROADCAST: "broadcast",
              ALLTOALL: "alltoall", REDUCESCATTER: "reducescatter", BARRIER: "barrier",
              JOIN: "join", BCAST_OBJECT: "broadcast_object",
              ALLGATHER_OBJECT: "allgather_object", SHUTDOWN: "shutdown"}

# Signature fields.
SIG_LEN = 12
(F_KIND, F_DTYPE, F_OP, F_ROOT, F_NUMEL, F_DIM0, F_NDIM, F_SHAPE, F_NAME, F_PRE, F_POST,
 F_ERROR) = range(SIG_LEN)
_LABEL = {F_DTYPE: "dtype", F_OP: "reduction op", F_ROOT: "root rank", F_NUMEL: "shape",
          F_DIM0: "shape", F_NDIM: "shape", F_SHAPE: "shape",
          F_PRE: "prescale factor", F_POST: "postscale factor", F_NAME: "name"}
_REDUCE = (F_DTYPE, F_OP, F_NUMEL, F_NDIM, F_SHAPE, F_PRE, F_POST)
AGREE = {ALLREDUCE: _REDUCE, REDUCESCATTER: _REDUCE,
         ALLGATHER: (F_DTYPE, F_NDIM, F_SHAPE), ALLTOALL: (F_DTYPE, F_NDIM, F_SHAPE),
         BROADCAST: (F_DTYPE, F_ROOT, F_NUMEL, F_NDIM, F_SHAPE), BCAST_OBJECT: (F_ROOT,)}


class CollectiveError(CommError):
    """The ranks' calls do not match, or one rank could not start its part: raised on every rank."""


def _crc(value: object) -> int:
    return zlib.crc32(repr(value).encode())


def _bits(x: float) -> int:
    return _ONE_BITS if x == 1.0 else struct.unpack("<q", struct.pack("<d", x))[0]


_ONE_BITS = struct.unpack("<q", struct.pack("<d", 1.0))[0]
_ONE_DTYPE = {dtype: _crc([code]) for dtype, code in DTYPE_CODE.items()}  # one-tensor ops
_SIG_BYTES = SIG_LEN * 8
PAYLOAD_BYTES = 256  # data that rides along with the signature (tiny allreduces, broadcasts)
_BLOCK = SIG_LEN + PAYLOAD_BYTES // 8
_SHAPES: dict[tuple, int] = {}  # shape hashes of recent calls: the same shapes recur


def _shape_crc(shapes: tuple) -> int:
    crc = _SHAPES.get(shapes)
    if crc is None:
        if len(_SHAPES) > 4096:
            _SHAPES.clear()
        crc = _SHAPES[shapes] = _crc(shapes)
    return crc


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


# -- collectives --------------------------------------------------------------------------------
class Collective:
    """One collective call: its signature, its description, and how to run it."""

    kind = 0

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.error: str | None = None  # a local problem, reported on every rank

    def fields(self) -> dict[int, int]:
        return {}

    def signature(self) -> list[int]:
        sig = [self.kind, 0, 0, -1, 0, 0, 0, 0, 0 if self.name is None else _crc(self.name),
               0, 0, 0]
        if self.error is None:
            for field, value in self.fields().items():
                sig[field] = value
        else:
            sig[F_ERROR] = 1
        return sig

    def describe(self) -> dict[str, Any]:
        return {"op": KIND_NAMES[self.kind], "name": self.name, "error": self.error}

    def run(self, engine: Engine, sigs: np.ndarray) -> Any:
        raise NotImplementedError

    def payload(self) -> np.ndarray | None:
        """Bytes small enough to travel with the signature (then `run_small` finishes)."""
        return None

    def run_small(self, engine: Engine, payloads: np.ndarray) -> Any:
        raise NotImplementedError

    def join_plan(self) -> tuple | None:
        """What a rank that has joined must do to take part (None: not allowed)."""
        return None


class Allreduce(Collective):
    """Reduce `inputs` into `outputs` (the same tensors for in-place), fused by dtype."""

    kind = ALLREDUCE

    def __init__(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], op: int,
                 prescale: float = 1.0, postscale: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.op, self.prescale, self.postscale = op, float(prescale), float(postscale)
        # Read once: every torch attribute access from Python costs about a microsecond.
        self._shapes = tuple(tuple(t.shape) for t in self.inputs)
        self._dtypes = [t.dtype for t in self.inputs]
        self._numel = sum(math.prod(shape) for shape in self._shapes)
        try:
            if not self.inputs:
                raise CommError("no tensors to reduce")
            if op not in ops._MPI_OP:
                raise CommError(f"reduction op {OP_NAMES.get(op, op)} is not supported; use "
                                "Average, Sum, Min, Max or Product")
            for t in self.inputs:
                ops.check_dtype(t, reduce=True)
        except CommError as err:
            self.error = str(err)

    def fields(self) -> dict[int, int]:
        dtypes = (_ONE_DTYPE[self._dtypes[0]] if len(self._dtypes) == 1
                  else _crc([DTYPE_CODE[d] for d in self._dtypes]))
        return {F_DTYPE: dtypes, F_OP: self.op, F_NUMEL: self._numel,
                F_NDIM: len(self._shapes[0]), F_SHAPE: _shape_crc(self._shapes),
                F_PRE: _bits(self.prescale), F_POST: _bits(self.postscale)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dtype": [dtype_name(t.dtype) for t in self.inputs],
                "shape": [_shape(t) for t in self.inputs], "reduction op": OP_NAMES.get(self.op),
                "prescale factor": self.prescale, "postscale factor": self.postscale}

    def _groups(self) -> dict[torch.dtype, list[int]]:
        if len(self.inputs) == 1:
            return {self.inputs[0].dtype: [0]}
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(self.inputs):
            groups.setdefault(t.dtype, []).append(i)
        return groups

    def run(self, engine: Engine, sigs: np.ndarray) -> list[torch.Tensor]:
        for members in self._groups().values():
            src, dst = self.inputs[members[0]], self.outputs[members[0]]
            if len(members) == 1 and dst.is_contiguous():
                if dst is not src:
                    dst.detach().copy_(src.detach())
                ops.allreduce_flat_(engine.comm, dst.detach().view(-1), self.op, self.prescale,
                                    self.postscale, engine.reducers, engine.wait)
                continue
            flat = torch.cat([self.inputs[i].detach().reshape(-1) for i in members])
            ops.allreduce_flat_(engine.comm, flat, self.op, self.prescale, self.postscale,
                                engine.reducers, engine.wait)
            offset = 0
            for i in members:
                out = self.outputs[i].detach()
                out.copy_(flat[offset:offset + out.numel()].view_as(out))
                offset += out.numel()
        return self.outputs

    def payload(self) -> np.ndarray | None:
        if len(self.inputs) != 1 or self.error is not None:
            return None
        # Eligibility may depend only on what the signature compares (not on contiguity).
        if self._numel * ops.ITEMSIZE[self._dtypes[0]] > PAYLOAD_BYTES:
            return None
        return ops.as_bytes(self.inputs[0].contiguous())

    def run_small(self, engine: Engine, payloads: np.ndarray) -> list[torch.Tensor]:
        """Reduce every rank's gathered values here, in rank order: the same bits everywhere."""
        out = self.outputs[0].detach()
        result = ops.reduce_gathered(payloads, self._dtypes[0], self._numel, self.op,
                                     self.prescale, self.postscale)
        out.copy_(result.view(self._shapes[0]))
        return self.outputs

    def join_plan(self) -> tuple:
        buffers = [(dtype, sum(self.inputs[i].numel() for i in members))
                   for dtype, members in self._groups().items()]
        return ("allreduce", buffers, self.op, self.prescale, self.postscale)


class Broadcast(Collective):
    kind = BROADCAST

    def __init__(self, tensor: torch.Tensor, output: torch.Tensor, root: int,
                 name: str | None = None, size: int = 1) -> None:
        super().__init__(name)
        self.tensor, self.output, self.root = tensor, output, int(root)
        try:
            ops.check_dtype(tensor, reduce=False)
            if not 0 <= self.root < size:
                raise CommError(f"root_rank {root} is not a rank of this job (0..{size - 1})")
        except CommError as err:
            self.error = str(err)

    def fields(self) -> dict[int, int]:
        t = self.tensor
        return {F_DTYPE: DTYPE_CODE[t.dtype], F_ROOT: self.root, F_NUMEL: t.numel(),
                F_NDIM: t.dim(), F_SHAPE: _crc(tuple(t.shape))}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dtype": dtype_name(self.tensor.dtype),
                "shape": _shape(self.tensor), "root rank": self.root}

    def payload(self) -> np.ndarray | None:
        t = self.tensor
        if self.error is not None or t.numel() * t.element_size() > PAYLOAD_BYTES:
            return None
        return ops.as_bytes(t.contiguous())

    def run_small(self, engine: Engine, payloads: np.ndarray) -> torch.Tensor:
        t = self.tensor
        value = ops.from_bytes(payloads[self.root], t.dtype, t.numel())
        self.output.detach().copy_(value.view(self.output.shape))
        return self.output

    def run(self, engine: Engine, sigs: np.ndarray) -> torch.Tensor:
        out = self.output.detach()
        if engine.rank == self.root and out.data_ptr() != self.tensor.data_ptr():
            out.copy_(self.tensor.detach())
        work = out if out.is_contiguous() else out.contiguous()
        ops.broadcast_(engine.comm, work, self.root)
        if work is not out:
            out.copy_(work)
        return self.output


class Allgather(Collective):
    """Concatenate along dim 0; the first dimension may differ between ranks."""

    kind = ALLGATHER

    def __init__(self, tensors: Sequence[torch.Tensor], name: str | None = None) -> None:
        super().__init__(name)
        self.tensors = list(tensors)
        try:
            for t in self.tensors:
                ops.check_dtype(t, reduce=False)
                if t.dim() == 0:
                    raise CommError("allgather needs tensors with at least one dimension; "
                                    "got a 0-d tensor (use t.view(1))")
        except CommError as err:
            self.error = str(err)

    def fields(self) -> dict[int, int]:
        return {F_DTYPE: _crc([DTYPE_CODE[t.dtype] for t in self.tensors]),
                F_DIM0: self.tensors[0].shape[0], F_NDIM: self.tensors[0].dim(),
                F_SHAPE: _crc([tuple(t.shape[1:]) for t in self.tensors])}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dtype": [dtype_name(t.dtype) for t in self.tensors],
                "shape": [_shape(t) for t in self.tensors]}

    def run(self, engine: Engine, sigs: np.ndarray) -> list[torch.Tensor]:
        if len(self.tensors) == 1:
            rows_by_tensor = [sigs[:, F_DIM0].tolist()]
        else:
            everyone = engine.comm.allgather([t.shape[0] for t in self.tensors])
            rows_by_tensor = [[dims[i] for dims in everyone] for i in range(len(self.tensors))]
        return [ops.allgatherv(engine.comm, t.detach(), rows)
                for t, rows in zip(self.tensors, rows_by_tensor, strict=True)]


class Alltoall(Collective):
    kind = ALLTOALL

    def __init__(self, tensor: torch.Tensor, splits: Sequence[int] | None, size: int,
                 name: str | None = None) -> None:
        super().__init__(name)
        self.tensor = tensor
        self.splits: list[int] = []
        try:
            ops.check_dtype(tensor, reduce=False)
            if tensor.dim() == 0:
                raise CommError("alltoall needs a tensor with at least one dimension")
            rows = tensor.shape[0]
            if splits is None:
                if rows % size:
                    raise CommError(f"alltoall without splits needs the first dimension ({rows})"
                                    f" to be divisible by the number of ranks ({size})")
                self.splits = [rows // size] * size
            else:
                self.splits = [int(s) for s in splits]
                if len(self.splits) != size:
                    raise CommError(f"alltoall splits has {len(self.splits)} entries; it needs "
                                    f"one per rank ({size})")
                if min(self.splits) < 0 or sum(self.splits) != rows:
                    raise CommError(f"alltoall splits {self.splits} must be non-negative and add "
                                    f"up to the first dimension of the tensor ({rows})")
        except CommError as err:
            self.error = str(err)

    def fields(self) -> dict[int, int]:
        t = self.tensor
        return {F_DTYPE: DTYPE_CODE[t.dtype], F_DIM0: t.shape[0], F_NDIM: t.dim(),
                F_SHAPE: _crc(tuple(t.shape[1:]))}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dtype": dtype_name(self.tensor.dtype),
                "shape": _shape(self.tensor), "splits": self.splits}

    def run(self, engine: Engine, sigs: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        return ops.alltoallv(engine.comm, self.tensor.detach(), self.splits)


class Reducescatter(Collective):
    kind = REDUCESCATTER

    def __init__(self, tensors: Sequence[torch.Tensor], op: int, prescale: float = 1.0,
                 postscale: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        self.tensors = list(tensors)
        self.op, self.prescale, self.postscale = op, float(prescale), float(postscale)
        self._shapes = tuple(tuple(t.shape) for t in self.tensors)  # as in Allreduce
        self._dtypes = [t.dtype for t in self.tensors]
        self._numel = sum(math.prod(shape) for shape in self._shapes)
        try:
            if not self.tensors:
                raise CommError("no tensors to reduce")
            if op not in ops._MPI_OP:
                raise CommError(f"reduction op {OP_NAMES.get(op, op)} is not supported by "
                                "reducescatter; use Average, Sum, Min, Max or Product")
            for t in self.tensors:
                ops.check_dtype(t, reduce=True)
                if t.dim() == 0:
                    raise CommError("reducescatter needs tensors with at least one dimension")
        except CommError as err:
            self.error = str(err)

    fields = Allreduce.fields
    describe = Allreduce.describe

    @property
    def inputs(self) -> list[torch.Tensor]:
        return self.tensors

    def run(self, engine: Engine, sigs: np.ndarray) -> list[torch.Tensor]:
        return [ops.reducescatter(engine.comm, t.detach().contiguous(), self.op, self.prescale,
                                  self.postscale) for t in self.tensors]


class Barrier(Collective):
    kind = BARRIER

    def run(self, engine: Engine, sigs: np.ndarray) -> None:
        engine.comm.Barrier()


class Shutdown(Collective):
    kind = SHUTDOWN

    def run(self, engine: Engine, sigs: np.ndarray) -> None:
        return None

    def join_plan(self) -> tuple:
        return ("shutdown",)


class BroadcastObject(Collective):
    kind = BCAST_OBJECT

    def __init__(self, obj: Any, root: int, name: str | None = None, size: int = 1) -> None:
        super().__init__(name)
        self.obj, self.root = obj, int(root)
        if not 0 <= self.root < size:
            self.error = f"root_rank {root} is not a rank of this job (0..{size - 1})"

    def fields(self) -> dict[int, int]:
        return {F_ROOT: self.root}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root rank": self.root}

    def run(self, engine: Engine, sigs: np.ndarray) -> Any:
        return engine.comm.bcast(self.obj if engine.rank == self.root else None, root=self.root)


class AllgatherObject(Collective):
    kind = ALLGATHER_OBJECT

    def __init__(self, obj: Any, name: str | None = None) -> None:
        super().__init__(name)
        self.obj = obj

    def run(self, engine: Engine, sigs: np.ndarray) -> list[Any]:
        return engine.comm.allgather(self.obj)


class Join(Collective):
    kind = JOIN

    def run(self, engine: Engine, sigs: np.ndarray) -> int:  # handled by Engine._join
        raise AssertionError("Join is run by the engine itself")


# -- handles ------------------------------------------------------------------------------------
class Handle:
    """The outcome of a submitted collective: `done()`, `wait()` (returns or raises)."""

    __slots__ = ("_event", "result", "error")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> Any:
        self._event.wait()
        if self.error is not None:
            raise self.error
        return self.result

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self._event.set()


# -- the engine ---------------------------------------------------------------------------------
class Engine:
    """Rank, size, node-local and cross-node coordinates, and the ordered collective runner."""

    def __init__(self, comm: MPI.Comm | Sequence[int] | None = None) -> None:
        base, owned = _base_comm(comm)
        self.comm: MPI.Comm = base.Dup()  # ours alone: user traffic never matches our calls
        if owned:
            base.Free()
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        cross = self.comm.Split(self.local_rank, self.rank)
        self.cross_rank, self.cross_size = cross.Get_rank(), cross.Get_size()
        cross.Free()
        self.is_homogeneous = len(set(self.comm.allgather(self.local_size))) == 1
        self.thread_multiple = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        # MPI initialised below THREAD_SERIALIZED allows MPI calls from one thread only: then
        # asynchronous ops run at submission, on the caller's thread.
        self.background = MPI.Query_thread() >= MPI.THREAD_SERIALIZED
        self.reducers = ops.ReducerCache(self.comm)
        self.calls = 0  # collectives performed: named in error messages
        # How the running op waits for MPI: spinning on the caller's thread, sleeping between
        # tests on the background thread (which shares a core with backward).
        self.wait = blocking_wait
        # Both signature buffers live as long as the engine: MPI libraries register the
        # memory they send from, and a fresh array per call cost ~100 us here (MPICH/UCX).
        self._block = np.zeros(_BLOCK, dtype=np.int64)
        self._blocks = np.zeros((self.size, _BLOCK), dtype=np.int64)
        self._sig_bytes = self._block.view(np.uint8)[_SIG_BYTES:]
        self._payloads = self._blocks[:, SIG_LEN:].view(np.uint8)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()   # guards _pending
        self._exec = threading.Lock()   # one collective at a time, in submission order
        self._pending = 0               # submitted or running, not finished
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, op: Collective) -> Handle:
        """Queue `op` for the background thread; returns at once."""
        self._check_open()
        handle = Handle()
        if not self.background:
            try:
                handle._finish(self.run(op))
            except Exception as err:  # noqa: BLE001 - raised by handle.wait()
                handle._finish(error=err)
            return handle
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mpiml-hvd", daemon=True)
                self._thread.start()
            self._queue.put((op, handle))
        return handle

    def run(self, op: Collective) -> Any:
        """Perform `op` and return its result: inline when nothing is queued, else in turn."""
        self._check_open()
        with self._lock:
            inline = self._pending == 0
            if inline:
                self._pending += 1
        if not inline:
            return self.submit(op).wait()
        try:
            with self._exec:
                return self._perform(op)
        finally:
            with self._lock:
                self._pending -= 1

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            op, handle = item
            result, error = None, None
            with self._exec:
                self.wait = polling_wait
                try:
                    result = self._perform(op)
                except BaseException as err:  # noqa: BLE001 - handed to whoever waits
                    error = err
                finally:
                    self.wait = blocking_wait
            with self._lock:
                self._pending -= 1
            handle._finish(result, error)

    def _check_open(self) -> None:
        if self._closed:
            raise CommError("this communication engine was shut down")

    # -- performing ------------------------------------------------------------------------------
    def _exchange(self, sig: list[int], payload: np.ndarray | None = None) -> np.ndarray:
        """Every rank's signature, as a (size, 12) array; payloads land in `_payloads`."""
        self.calls += 1
        self._block[:SIG_LEN] = sig
        if payload is not None:
            self._sig_bytes[:payload.size] = payload
        if self.size == 1:  # nothing to compare with (a local error still shows in the flag)
            self._blocks[0] = self._block
        else:
            self.wait(self.comm.Iallgather(self._block, self._blocks))
        return self._blocks[:, :SIG_LEN]

    def _perform(self, op: Collective) -> Any:
        if op.kind == JOIN:
            return self._join()
        payload = op.payload()
        sigs = self._exchange(op.signature(), payload)
        raw = sigs.tobytes()  # the fast path: every rank sent the same 12 integers
        if sigs[0, F_ERROR] or raw != raw[:_SIG_BYTES] * self.size:
            if (sigs[:, F_KIND] == JOIN).any():
                return self._with_joined(op, sigs.copy())
            if _first_difference(sigs, op.kind) is not None or sigs[:, F_ERROR].any():
                self._raise_mismatch(op, sigs.copy())
        elif payload is not None:  # agreed, and the data came along: done in one call
            return op.run_small(self, self._payloads)
        return op.run(self, sigs.copy())

    def _raise_mismatch(self, op: Collective, sigs: np.ndarray,
                        ranks: Sequence[int] | None = None) -> None:
        """Every rank (joined ones too) exchanges descriptions; all raise the same error."""
        descs = self.comm.allgather(op.describe())
        raise CollectiveError(_mismatch_message(self.calls, sigs, descs, ranks)).agreed()

    def _with_joined(self, op: Collective, sigs: np.ndarray) -> Any:
        """Some ranks have joined: they take part in allreduces with the identity value."""
        active = [r for r in range(self.size) if sigs[r, F_KIND] != JOIN]
        lead = active[0]
        differs = (_first_difference(sigs[active], op.kind) is not None
                   or sigs[active, F_ERROR].any())
        plan = None
        if self.rank == lead:
            plan = ("mismatch",) if differs else (op.join_plan() or ("unsupported",))
        plan = self.comm.bcast(plan, root=lead)
        if plan[0] == "mismatch":
            self._raise_mismatch(op, sigs, active)
        if plan[0] == "unsupported":
            joined = [r for r in range(self.size) if r not in active]
            raise CollectiveError(
                f"{KIND_NAMES[op.kind]} was called while rank(s) {joined} had joined (hvd.join); "
                "only allreduce may run until every rank has joined").agreed()
        return op.run(self, sigs.copy())

    def _join(self) -> int:
        """Answer the other ranks' collectives until every rank has joined; the last to join."""
        waited = 0
        sig = Join().signature()
        while True:
            sig[F_ROOT] = waited
            sigs = self._exchange(sig)
            if (sigs[:, F_KIND] == JOIN).all():
                rounds = sigs[:, F_ROOT]
                return int(np.flatnonzero(rounds == rounds.min()).max())
            lead = int(np.flatnonzero(sigs[:, F_KIND] != JOIN)[0])
            plan = self.comm.bcast(None, root=lead)
            if plan[0] == "mismatch":
                self.comm.allgather(Join().describe())
            elif plan[0] == "shutdown":
                raise CollectiveError(f"rank {lead} shut down while this rank waited in join(); "
                                      "every rank must call join() before shutdown").agreed()
            elif plan[0] == "allreduce":
                _, buffers, op, prescale, postscale = plan
                for dtype, n in buffers:
                    zeros = ops.identity_like(torch.empty(n, dtype=dtype), op)
                    ops.allreduce_flat_(self.comm, zeros, op, prescale, postscale, self.reducers,
                                        self.wait)
            waited += 1

    # -- life cycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish queued work, agree with every rank that the job is shutting down, free all."""
        if self._closed:
            return
        agreed = False
        try:
            self.run(Shutdown())
            agreed = True
        finally:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None
            if agreed:  # freeing shared slots is collective: only once every rank is here
                self.reducers.close()
            if not MPI.Is_finalized():
                self.comm.Free()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _base_comm(comm: MPI.Comm | Sequence[int] | None) -> tuple[MPI.Comm, bool]:
    """COMM_WORLD, the given communicator, or a new one of the listed COMM_WORLD ranks."""
    if comm is None:
        return MPI.COMM_WORLD, False
    if isinstance(comm, MPI.Comm):
        return comm, False
    ranks = sorted({int(r) for r in comm})
    world = MPI.COMM_WORLD
    if not ranks or ranks[0] < 0 or ranks[-1] >= world.Get_size():
        raise CommError(f"init(comm={list(comm)}): ranks must lie in 0..{world.Get_size() - 1}")
    sub = world.Create(world.Get_group().Incl(ranks))
    if sub == MPI.COMM_NULL:
        raise CommError(f"init(comm={ranks}): this process (COMM_WORLD rank {world.Get_rank()}) "
                        "is not one of the listed ranks")
    return sub, True


def _first_difference(sigs: np.ndarray, kind: int) -> str | None:
    if (sigs[:, F_KIND] != sigs[0, F_KIND]).any():
        return "operation"
    for field in AGREE.get(kind, ()):
        if (sigs[:, field] != sigs[0, field]).any():
            return _LABEL[field]
    names = sigs[:, F_NAME]
    if (names != 0).all() and (names != names[0]).any():
        return "name"
    return None


def _call_text(desc: dict[str, Any]) -> str:
    parts = [f"{k}={v!r}" if k == "name" else f"{k}={v}" for k, v in desc.items()
             if k not in ("op", "error") and v is not None]
    return f"{desc['op']}({', '.join(parts)})"


def _mismatch_message(call: int, sigs: np.ndarray, descs: list[dict[str, Any]],
                      ranks: Sequence[int] | None) -> str:
    ranks = list(range(len(descs))) if ranks is None else list(ranks)
    errors = [(r, descs[r]["error"]) for r in ranks if descs[r].get("error")]
    if errors:
        lines = [f"rank {r} could not start {descs[r]['op']}: {e}" for r, e in errors]
        return f"collective #{call} failed on every rank because " + "; ".join(lines)
    kind = int(sigs[ranks[0], F_KIND])
    what = _first_difference(sigs[ranks], kind) or "arguments"
    by_call: dict[str, list[int]] = {}
    for r in ranks:
        by_call.setdefault(_call_text(descs[r]), []).append(r)
    calls = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {text}"
                      for text, rs in by_call.items())
    return (f"mismatched collective #{call}: the ranks disagree on the {what}. {calls}. "
            "Every rank must make the same collective calls in the same order, with the same "
            "shapes, dtypes, reduction ops and root ranks")
