"""Typed collectives on torch tensors: the data movement behind `mpiml.horovod`.

Every function takes the communicator (and, for large float sums, a `ReducerCache`) as an
argument and works on CPU tensors. They assume the ranks already agree on what is being done
(`engine.py` checks that with a signature exchange before calling any of them).

Numerics, chosen to give the results Horovod's CPU path gives:

* Sum, Min, Max, Product map to MPI's SUM, MIN, MAX, PROD in the tensor's own type; float16 and
  bfloat16 are widened to float32 for the reduction and rounded back once.
* Average is a Sum followed by a multiplication by ``postscale / size``; ``prescale`` multiplies
  every rank's input before the reduction. As in Horovod, float32 and float16 are scaled by the
  factor rounded to float32, float64 by the double, and integers by computing
  ``int(factor * value)`` in double precision, which truncates toward zero: the integer Average
  of 1 and 2 is 1, of -1 and -2 is -1.
* Large float32/float64 sums (1 MiB and up) go through the project's `Allreducer` (pipelined
  ring on preallocated buffers); smaller ones through MPI's Allreduce.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from mpiml.comm.allreduce import Allreducer
from mpiml.comm.ring import blocking_wait
from mpiml.comm.staged import STAGED_MIN_BYTES
from mpiml.errors import CommError

# Reduction operators, numbered as Horovod numbers them (ReduceOp in horovod/common).
AVERAGE, SUM, ADASUM, MIN, MAX, PRODUCT = 0, 1, 2, 3, 4, 5
OP_NAMES = {AVERAGE: "Average", SUM: "Sum", ADASUM: "Adasum", MIN: "Min", MAX: "Max",
            PRODUCT: "Product"}
_MPI_OP = {AVERAGE: MPI.SUM, SUM: MPI.SUM, MIN: MPI.MIN, MAX: MPI.MAX, PRODUCT: MPI.PROD}

# Every dtype the collectives move; all but bool can be reduced.
DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64, torch.bool)
DTYPE_CODE = {dtype: i + 1 for i, dtype in enumerate(DTYPES)}
REDUCIBLE = frozenset(DTYPES[:-1])
_HALF = (torch.float16, torch.bfloat16)
_RING_KIND = {torch.float32: "float32", torch.float64: "float64"}
ITEMSIZE = {dtype: torch.empty(0, dtype=dtype).element_size() for dtype in DTYPES}
# From here float sums go to an `Allreducer` (on one node it stages them through shared slots,
# faster than MPI's own call from 128 KiB; elsewhere it calls MPI itself below 1 MiB).
REDUCER_THRESHOLD_BYTES = STAGED_MIN_BYTES


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_dtype(tensor: torch.Tensor, reduce: bool) -> None:
    """Raise CommError unless `tensor` is a CPU tensor of a type the collective supports."""
    if tensor.is_cpu and not tensor.is_sparse and tensor.dtype in (REDUCIBLE if reduce
                                                                   else DTYPE_CODE):
        return
    if not tensor.is_cpu:
        raise CommError(f"tensor on device {tensor.device}: mpiml.horovod runs on CPU tensors "
                        "only; move it with .cpu() first")
    if tensor.is_sparse:
        raise CommError("sparse tensors are not supported; convert with .to_dense()")
    allowed = REDUCIBLE if reduce else DTYPES
    if tensor.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in DTYPES if d in allowed)
        raise CommError(f"tensor type {dtype_name(tensor.dtype)} is not supported here; "
                        f"use one of {names}")


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of a contiguous tensor as a uint8 numpy view (shared memory)."""
    flat = tensor.detach()
    if flat.dtype == torch.bfloat16:  # no numpy type: its bits as int16
        flat = flat.view(torch.int16)
    return flat.numpy().reshape(-1).view(np.uint8)


def from_bytes(raw: np.ndarray, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A new flat tensor of `dtype` from the first bytes of `raw` (a uint8 array)."""
    data = torch.from_numpy(raw[:numel * ITEMSIZE[dtype]].copy())
    return data.view(dtype) if numel else torch.empty(0, dtype=dtype)


_NUMPY_TYPES = {torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
                torch.int32: np.int32, torch.int64: np.int64, torch.float16: np.float16,
                torch.float32: np.float32, torch.float64: np.float64}
_NP_REDUCE = {SUM: np.add, AVERAGE: np.add, MIN: np.minimum, MAX: np.maximum,
              PRODUCT: np.multiply}


def _np_scale(a: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return a
    if a.dtype == np.float64:
        return a * factor
    if a.dtype.kind == "f":
        return a * np.float32(factor)
    return (a * factor).astype(a.dtype)  # double, then truncation toward zero


def reduce_gathered(block: np.ndarray, dtype: torch.dtype, numel: int, op: int,
                    prescale: float, postscale: float) -> torch.Tensor:
    """Reduce the rows of `block` (rank r's raw bytes in row r) in rank order, as
    `allreduce_flat_` would across ranks: same op, scaling and working type."""
    size = block.shape[0]
    np_type = _NUMPY_TYPES.get(dtype)
    if np_type is None:  # bfloat16: no numpy type, reduce with torch
        rows = [from_bytes(block[r], dtype, numel) for r in range(size)]
        return _reduce_rows_torch(rows, op, prescale, postscale, size)
    values = block[:, :numel * ITEMSIZE[dtype]].view(np_type)
    if np_type == np.float16:
        values = values.astype(np.float32)
    with np.errstate(all="ignore"):  # overflow wraps or gives inf silently, as in MPI
        values = _np_scale(values, prescale)
        reduced = _NP_REDUCE[op].reduce(values, axis=0, dtype=values.dtype)
        reduced = _np_scale(reduced, postscale / size if op == AVERAGE else postscale)
    return torch.from_numpy(reduced.astype(np_type, copy=False))


def _reduce_rows_torch(rows: list[torch.Tensor], op: int, prescale: float, postscale: float,
                       size: int) -> torch.Tensor:
    """Reduce every rank's values (one flat tensor per rank) in rank order, as
    `allreduce_flat_` would across ranks: same op, same scaling, same working type."""
    work = [r.float() if r.dtype in _HALF else r for r in rows]
    for w in work:
        scale_(w, prescale)
    acc = work[0]
    for w in work[1:]:
        if op in (SUM, AVERAGE):
            acc.add_(w)
        elif op == MIN:
            torch.minimum(acc, w, out=acc)
        elif op == MAX:
            torch.maximum(acc, w, out=acc)
        else:
            acc.mul_(w)
    scale_(acc, postscale / size if op == AVERAGE else postscale)
    return acc.to(rows[0].dtype)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous tensor; bfloat16 is not allowed (no numpy type)."""
    return tensor.detach().reshape(-1).numpy()


# -- scaling ------------------------------------------------------------------------------------
def scale_(flat: torch.Tensor, factor: float) -> None:
    """Multiply in place as Horovod's ScaleBuffer does (see the module docstring)."""
    if factor == 1.0:
        return
    if flat.dtype == torch.float64:
        flat.mul_(factor)
    elif flat.dtype.is_floating_point:
        # A Python float is rounded to the tensor's type by torch; Horovod rounds to float32.
        flat.mul_(float(np.float32(factor)))
    else:
        flat.copy_(flat.double().mul_(factor).to(flat.dtype))  # double -> int truncates


# -- reductions ---------------------------------------------------------------------------------
class ReducerCache:
    """One `Allreducer` per float type, rebuilt (collectively) when a larger buffer comes."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self._reducers: dict[torch.dtype, Allreducer] = {}

    def get(self, dtype: torch.dtype, n: int) -> Allreducer:
        reducer = self._reducers.get(dtype)
        if reducer is None or reducer.config.max_elements < n:
            capacity = n if reducer is None else max(n, 2 * reducer.config.max_elements)
            if reducer is not None:
                reducer.close()
            # Polling waits: most large buffers are gradient buckets reduced on the engine's
            # thread while backward runs on the same core (see ring.polling_wait).
            reducer = self._reducers[dtype] = Allreducer(self.comm, capacity, _RING_KIND[dtype],
                                                         polling=True)
        return reducer

    def close(self) -> None:
        for reducer in self._reducers.values():
            reducer.close()
        self._reducers.clear()


def _sum_or_reduce(comm: MPI.Comm, flat: torch.Tensor, op: int,
                   reducers: ReducerCache | None, wait: Callable[[MPI.Request], None]) -> None:
    """Reduce a flat float32/float64/integer tensor in place across `comm`.

    Below `REDUCER_THRESHOLD_BYTES` this is MPI's nonblocking Iallreduce, finished by `wait`: a
    communication thread that shares its core with backward passes a polling wait that
    sleeps instead of spinning (`ring.polling_wait`). Nonblocking on every rank either way,
    since MPI never matches a blocking collective with a nonblocking one.
    """
    if comm.Get_size() == 1:
        return
    nbytes = flat.numel() * flat.element_size()
    if (op in (SUM, AVERAGE) and flat.dtype in _RING_KIND and reducers is not None
            and nbytes >= REDUCER_THRESHOLD_BYTES):
        reducers.get(flat.dtype, flat.numel())(as_numpy(flat))
        return
    wait(comm.Iallreduce(MPI.IN_PLACE, as_numpy(flat), op=_MPI_OP[op]))


def allreduce_flat_(comm: MPI.Comm, flat: torch.Tensor, op: int, prescale: float = 1.0,
                    postscale: float = 1.0, reducers: ReducerCache | None = None,
                    wait: Callable[[MPI.Request], None] = blocking_wait) -> None:
    """Reduce the contiguous 1-D tensor `flat` in place with Horovod's op and scaling."""
    if op == AVERAGE:
        postscale = postscale / comm.Get_size()
    if flat.dtype in _HALF:
        work = flat.float()
        scale_(work, prescale)
        _sum_or_reduce(comm, work, op, reducers, wait)
        scale_(work, postscale)
        flat.copy_(work)
        return
    scale_(flat, prescale)
    _sum_or_reduce(comm, flat, op, reducers, wait)
    scale_(flat, postscale)


def identity_like(flat: torch.Tensor, op: int) -> torch.Tensor:
    """What a rank that has joined contributes: the identity of `op` (0 for Sum/Average)."""
    if op in (SUM, AVERAGE):
        return flat.zero_()
    if op == PRODUCT:
        return flat.fill_(1)
    info = torch.finfo(flat.dtype) if flat.dtype.is_floating_point else torch.iinfo(flat.dtype)
    return flat.fill_(info.max if op == MIN else info.min)


def reducescatter_counts(rows: int, size: int) -> list[int]:
    """Rows per rank: the first ``rows % size`` ranks get one more (Horovod's split)."""
    return [rows // size + (1 if r < rows % size else 0) for r in range(size)]


def reducescatter(comm: MPI.Comm, tensor: torch.Tensor, op: int, prescale: float = 1.0,
                  postscale: float = 1.0) -> torch.Tensor:
    """Reduce `tensor` over ranks and give rank r its block of rows (see `reducescatter_counts`)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    rows = reducescatter_counts(tensor.shape[0], size)
    row_elems = int(np.prod(tensor.shape[1:], dtype=np.int64))
    work_dtype = torch.float32 if tensor.dtype in _HALF else tensor.dtype
    send = tensor.detach().reshape(-1).to(work_dtype, copy=True)
    scale_(send, prescale)
    out = torch.empty(rows[rank] * row_elems, dtype=work_dtype)
    if size == 1:
        out.copy_(send)
    else:
        comm.Reduce_scatter(as_numpy(send), as_numpy(out), [r * row_elems for r in rows],
                            op=_MPI_OP[op])
    scale_(out, postscale / size if op == AVERAGE else postscale)
    return out.to(tensor.dtype).view(rows[rank], *tensor.shape[1:])


# -- data movement ------------------------------------------------------------------------------
def broadcast_(comm: MPI.Comm, tensor: torch.Tensor, root: int) -> None:
    """Overwrite the contiguous `tensor` with root's values."""
    if comm.Get_size() > 1 and tensor.numel():
        comm.Bcast(as_bytes(tensor), root=root)


def allgatherv(comm: MPI.Comm, tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0; `rows[r]` is rank r's first dimension."""
    rest = tuple(tensor.shape[1:])
    out = torch.empty((sum(rows), *rest), dtype=tensor.dtype)
    if comm.Get_size() == 1:
        out.copy_(tensor)
        return out
    row_bytes = int(np.prod(rest, dtype=np.int64)) * tensor.element_size()
    counts = [r * row_bytes for r in rows]
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    send = as_bytes(tensor.contiguous())
    comm.Allgatherv(send, [as_bytes(out), counts, displs, MPI.BYTE])
    return out


def alltoallv(comm: MPI.Comm, tensor: torch.Tensor,
              splits: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Send rows ``splits[r]`` of `tensor` (in rank order) to rank r; return what arrived."""
    size = comm.Get_size()
    send_splits = np.asarray(splits, dtype=np.int64)
    recv_splits = np.empty(size, dtype=np.int64)
    comm.Alltoall(send_splits, recv_splits)
    rest = tuple(tensor.shape[1:])
    out = torch.empty((int(recv_splits.sum()), *rest), dtype=tensor.dtype)
    row_bytes = int(np.prod(rest, dtype=np.int64)) * tensor.element_size()

    def layout(counts: np.ndarray) -> tuple[list[int], list[int]]:
        sizes = (counts * row_bytes).tolist()
        return sizes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist()

    scounts, sdispls = layout(send_splits)
    rcounts, rdispls = layout(recv_splits)
    comm.Alltoallv([as_bytes(tensor.contiguous()), scounts, sdispls, MPI.BYTE],
                   [as_bytes(out), rcounts, rdispls, MPI.BYTE])
    return out, recv_splits.tolist()
