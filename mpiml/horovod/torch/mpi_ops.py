"""`horovod.torch.mpi_ops` on mpiml: init, ranks, and the tensor collectives.

The module holds the one engine `init()` creates (Horovod's API is module-level); every
collective goes through it. Handles are integers, as in Horovod: `poll(handle)` tells whether
the op finished, `synchronize(handle)` waits and returns its output. Failures, including
calls that do not match across ranks, raise `HorovodInternalError` on every rank.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mpiml.comm import engine as eng
from mpiml.comm.ops import ADASUM, AVERAGE, MAX, MIN, PRODUCT, SUM
from mpiml.errors import CommError
from mpiml.horovod.common.exceptions import HorovodInternalError
from mpiml.horovod.torch.compression import Compression

Average, Sum, Adasum, Min, Max, Product = AVERAGE, SUM, ADASUM, MIN, MAX, PRODUCT

_engine: eng.Engine | None = None
_handles: dict[int, tuple[eng.Handle, Callable[[Any], Any]]] = {}
_handle_ids = itertools.count(1)
_init_lock = threading.Lock()
_atexit_registered = False


# -- process sets: only the global one ----------------------------------------------------------
class ProcessSet:
    """Horovod's process sets are not supported; `global_process_set` stands for all ranks."""

    def __init__(self, ranks: Sequence[int] | None = None) -> None:
        self.ranks = None if ranks is None else list(ranks)
        self.process_set_id = 0

    def size(self) -> int:
        return size() if self.ranks is None else len(self.ranks)

    def rank(self) -> int:
        return rank()

    def included(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "ProcessSet(global)" if self.ranks is None else f"ProcessSet({self.ranks})"


global_process_set = ProcessSet()


def add_process_set(process_set: Any) -> ProcessSet:
    raise NotImplementedError("process sets other than the global one are not supported by "
                              "mpiml.horovod; build a sub-communicator and pass it to init(comm=)")


def remove_process_set(process_set: Any) -> bool:
    raise NotImplementedError("process sets are not supported by mpiml.horovod")


def _check_process_set(process_set: Any) -> None:
    if process_set is not global_process_set:
        add_process_set(process_set)


# -- basics -------------------------------------------------------------------------------------
def init(comm: Any = None, process_sets: Any = None) -> None:
    """Start: `comm` is None (COMM_WORLD), an mpi4py communicator, or a list of world ranks.

    Collective: every rank of `comm` must call it. Calling it again is a no-op.
    """
    global _engine, _atexit_registered
    if process_sets not in (None, [], "dynamic"):
        raise NotImplementedError("init(process_sets=...) is not supported by mpiml.horovod")
    with _init_lock:
        if _engine is not None:
            return
        try:
            _engine = eng.Engine(comm)
        except CommError as err:
            raise ValueError(str(err)) from err
        _handles.clear()
        if not _atexit_registered:
            atexit.register(_shutdown_at_exit)
            _atexit_registered = True


def shutdown() -> None:
    """Finish pending collectives and release the communicator; `init()` may be called again."""
    global _engine
    with _init_lock:
        engine, _engine = _engine, None
        _handles.clear()
    if engine is not None:
        try:
            engine.close()
        except CommError as err:
            raise HorovodInternalError(str(err)) from err


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except Exception as err:  # noqa: BLE001 - at exit there is no one left to raise to
        warnings.warn(f"mpiml.horovod shutdown at exit: {err}", stacklevel=1)


def is_initialized() -> bool:
    return _engine is not None


def _get() -> eng.Engine:
    if _engine is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return _engine


def size() -> int:
    return _get().size


def rank() -> int:
    return _get().rank


def local_size() -> int:
    return _get().local_size


def local_rank() -> int:
    return _get().local_rank


def cross_size() -> int:
    return _get().cross_size


def cross_rank() -> int:
    return _get().cross_rank


def is_homogeneous() -> bool:
    return _get().is_homogeneous


def mpi_threads_supported() -> bool:
    return _get().thread_multiple


def mpi_enabled() -> bool:
    return True


def mpi_built() -> bool:
    return True


def gloo_enabled() -> bool:
    return False


def gloo_built() -> bool:
    return False


def nccl_built() -> bool:
    return False


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return False


def rocm_built() -> bool:
    return False


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    warnings.warn("mpiml.horovod has no timeline; start_timeline() does nothing", stacklevel=2)


def stop_timeline() -> None:
    return None


# -- running ops and handles --------------------------------------------------------------------
def _run(op: eng.Collective) -> Any:
    try:
        return _get().run(op)
    except CommError as err:
        raise HorovodInternalError(str(err)) from err


def _submit(op: eng.Collective, finish: Callable[[Any], Any]) -> int:
    handle = _get().submit(op)
    handle_id = next(_handle_ids)
    _handles[handle_id] = (handle, finish)
    return handle_id


def poll(handle: int) -> bool:
    """True once the asynchronous op behind `handle` has finished (synchronize won't block)."""
    entry = _handles.get(handle)
    if entry is None:
        raise ValueError(f"Handle {handle} was not created or has been cleared.")
    return entry[0].done()


def synchronize(handle: int) -> Any:
    """Wait for the op behind `handle`; return its output (None for an unknown handle)."""
    entry = _handles.pop(handle, None)
    if entry is None:
        return None
    waited, finish = entry
    try:
        return finish(waited.wait())
    except CommError as err:
        raise HorovodInternalError(str(err)) from err


def _resolve_op(op: int | None, average: bool | None) -> int:
    if op is not None:
        if average is not None:
            raise ValueError("The op parameter supersedes average. Please provide only one of "
                             "them.")
    elif average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed",
                      DeprecationWarning, stacklevel=3)
        op = Average if average else Sum
    else:
        op = Average
    if op == Adasum:
        raise NotImplementedError("Adasum is not supported by mpiml.horovod; use op=Average")
    return op


def _first(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[0]


def _identity(x: Any) -> Any:
    return x


# -- allreduce ----------------------------------------------------------------------------------
def _allreduce_op(tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], op: int,
                  prescale: float, postscale: float, name: str | None) -> eng.Allreduce:
    return eng.Allreduce(tensors, outputs, op, prescale, postscale, name)


class _AllreduceFn(torch.autograd.Function):
    """Differentiable allreduce: the gradient is the same reduction of the gradients."""

    @staticmethod
    def forward(ctx, tensor, op, name, prescale, postscale):  # noqa: ANN001 - autograd signature
        ctx.op, ctx.prescale, ctx.postscale = op, prescale, postscale
        out = torch.empty(tensor.shape, dtype=tensor.dtype)
        return _run(_allreduce_op([tensor], [out], op, prescale, postscale, name))[0]

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        _check_differentiable(ctx.op)
        return (allreduce(grad.contiguous(), op=ctx.op, prescale_factor=ctx.prescale,
                          postscale_factor=ctx.postscale), None, None, None, None)


def _check_differentiable(op: int) -> None:
    if op not in (Sum, Average):
        raise NotImplementedError("the gradient of an allreduce is defined here for op=Sum and "
                                  "op=Average only")


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: int | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce `tensor` over all ranks (Average by default); the input is not modified."""
    _check_process_set(process_set)
    op = _resolve_op(op, average)
    compressed, ctx = compression.compress(tensor)
    reduced = _AllreduceFn.apply(compressed, op, name, prescale_factor, postscale_factor)
    return compression.decompress(reduced, ctx)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start an allreduce into a new tensor; `synchronize(handle)` returns it."""
    _check_process_set(process_set)
    op = _resolve_op(op, average)
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    return _submit(_allreduce_op([tensor], [out], op, prescale_factor, postscale_factor, name),
                   _first)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0,
                     process_set: ProcessSet = global_process_set) -> int:
    """Start an in-place allreduce of `tensor`."""
    _check_process_set(process_set)
    op = _resolve_op(op, average)
    return _submit(_allreduce_op([tensor], [tensor], op, prescale_factor, postscale_factor,
                                 name), _first)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: int | None = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce `tensor` in place and return it."""
    _check_process_set(process_set)
    op = _resolve_op(op, average)
    return _run(_allreduce_op([tensor], [tensor], op, prescale_factor, postscale_factor,
                              name))[0]


class _GroupedAllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, name, prescale, postscale, *tensors):  # noqa: ANN001
        ctx.op, ctx.prescale, ctx.postscale = op, prescale, postscale
        outs = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
        return tuple(_run(_allreduce_op(tensors, outs, op, prescale, postscale, name)))

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001
        _check_differentiable(ctx.op)
        reduced = grouped_allreduce([g.contiguous() for g in grads], op=ctx.op,
                                    prescale_factor=ctx.prescale, postscale_factor=ctx.postscale)
        return (None, None, None, None, *reduced)


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: bool | None = None,
                      name: str | None = None, compression: Any = Compression.none,
                      op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0,
                      process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    """Reduce a list of tensors as one fused operation; returns new tensors."""
    _check_process_set(process_set)
    op = _resolve_op(op, average)
    pairs = [compression.compress(t) for t in tensors]
    reduced = _GroupedAllreduceFn.apply(op, name, prescale_factor, postscale_factor,
                                        *[c for c, _ in pairs])
    return [compression.decompress(r, ctx) for r, (_, ctx) in zip(reduced, pairs, strict=True)]


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: bool | None = None,
                            name: str | None = None, op: int | None = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: ProcessSet = global_process_set) -> int:
    _check_process_set(process_set)
    op = _resolve_op(op, average)
    outs = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
    return _submit(_allreduce_op(tensors, outs, op, prescale_factor, postscale_factor, name),
                   _identity)


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                             name: str | None = None, op: int | None = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: ProcessSet = global_process_set) -> int:
    _check_process_set(process_set)
    op = _resolve_op(op, average)
    return _submit(_allreduce_op(tensors, tensors, op, prescale_factor, postscale_factor, name),
                   _identity)


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: int | None = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    _check_process_set(process_set)
    op = _resolve_op(op, average)
    return _run(_allreduce_op(tensors, tensors, op, prescale_factor, postscale_factor, name))


# -- allgather ----------------------------------------------------------------------------------
class _AllgatherFn(torch.autograd.Function):
    """Differentiable allgather: each rank gets the average of the gradients for its rows."""

    @staticmethod
    def forward(ctx, tensor, name):  # noqa: ANN001
        ctx.rows = tensor.shape[0] if tensor.dim() else 0
        return _run(eng.Allgather([tensor], name))[0]

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        reduced = allreduce(grad.contiguous(), op=Average)
        rows = allgather(torch.tensor([ctx.rows], dtype=torch.int64))
        offset = int(rows[: rank()].sum())
        return reduced.narrow(0, offset, ctx.rows), None


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (the first dimension may differ)."""
    _check_process_set(process_set)
    return _AllgatherFn.apply(tensor, name)


def allgather_async(tensor: torch.Tensor, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    _check_process_set(process_set)
    return _submit(eng.Allgather([tensor], name), _first)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: str | None = None,
                      process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    _check_process_set(process_set)
    return _run(eng.Allgather(tensors, name))


def grouped_allgather_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                            process_set: ProcessSet = global_process_set) -> int:
    _check_process_set(process_set)
    return _submit(eng.Allgather(tensors, name), _identity)


# -- broadcast ----------------------------------------------------------------------------------
def _broadcast_op(tensor: torch.Tensor, output: torch.Tensor, root_rank: int,
                  name: str | None) -> eng.Broadcast:
    return eng.Broadcast(tensor, output, root_rank, name, size())


class _BroadcastFn(torch.autograd.Function):
    """Differentiable broadcast: root gets the average of all gradients, the others zero."""

    @staticmethod
    def forward(ctx, tensor, root_rank, name):  # noqa: ANN001
        ctx.root_rank = root_rank
        out = torch.empty(tensor.shape, dtype=tensor.dtype)
        return _run(_broadcast_op(tensor, out, root_rank, name))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        reduced = allreduce(grad.contiguous(), op=Average)
        if rank() != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Root's `tensor`, on every rank, in a new tensor."""
    _check_process_set(process_set)
    return _BroadcastFn.apply(tensor, root_rank, name)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    _check_process_set(process_set)
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    return _submit(_broadcast_op(tensor, out, root_rank, name), _identity)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> int:
    _check_process_set(process_set)
    return _submit(_broadcast_op(tensor, tensor, root_rank, name), _identity)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Overwrite `tensor` with root's values, in place; returns it."""
    _check_process_set(process_set)
    return _run(_broadcast_op(tensor, tensor, root_rank, name))


# -- alltoall -----------------------------------------------------------------------------------
def _splits_list(splits: Any) -> list[int] | None:
    if splits is None:
        return None
    if isinstance(splits, torch.Tensor):
        return [int(s) for s in splits.reshape(-1).tolist()]
    return [int(s) for s in splits]


def _alltoall_outputs(result: tuple[torch.Tensor, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    out, received = result
    return out, torch.tensor(received, dtype=torch.int32)


class _AlltoallFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name):  # noqa: ANN001
        out, received = _alltoall_outputs(
            _run(eng.Alltoall(tensor, _splits_list(splits), size(), name)))
        ctx.received = received
        if splits is None:
            return out
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, *unused):  # noqa: ANN001
        back, _ = alltoall(grad.contiguous(), splits=ctx.received)
        return back, None, None


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: ProcessSet = global_process_set) -> Any:
    """Send rows ``splits[r]`` of `tensor` to rank r (equal parts without splits).

    Returns the received rows, and when `splits` was given also the int32 tensor of how many
    rows came from each rank.
    """
    _check_process_set(process_set)
    return _AlltoallFn.apply(tensor, splits, name)


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: ProcessSet = global_process_set) -> int:
    """Start an alltoall; `synchronize(handle)` returns (output, received_splits)."""
    _check_process_set(process_set)
    return _submit(eng.Alltoall(tensor, _splits_list(splits), size(), name), _alltoall_outputs)


# -- reducescatter ------------------------------------------------------------------------------
class _ReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, prescale, postscale):  # noqa: ANN001
        ctx.op, ctx.scale = op, prescale * postscale / (size() if op == Average else 1)
        return _run(eng.Reducescatter([tensor], op, prescale, postscale, name))[0]

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        _check_differentiable(ctx.op)
        return allgather(grad.contiguous()) * ctx.scale, None, None, None, None


def _reducescatter_op(op: int | None) -> int:
    return _resolve_op(op, None) if op is not None else Average


def reducescatter(tensor: torch.Tensor, name: str | None = None,
                  compression: Any = Compression.none, op: int = Average,
                  process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce over ranks, then give rank r its block of rows: the first ``rows % size``
    ranks get one row more than the others."""
    _check_process_set(process_set)
    compressed, ctx = compression.compress(tensor)
    out = _ReducescatterFn.apply(compressed, _reducescatter_op(op), name, prescale_factor,
                                 postscale_factor)
    return compression.decompress(out, ctx)


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: int = Average,
                        process_set: ProcessSet = global_process_set,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> int:
    _check_process_set(process_set)
    return _submit(eng.Reducescatter([tensor], _reducescatter_op(op), prescale_factor,
                                     postscale_factor, name), _first)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: str | None = None,
                          compression: Any = Compression.none, op: int = Average,
                          process_set: ProcessSet = global_process_set,
                          prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
    _check_process_set(process_set)
    pairs = [compression.compress(t) for t in tensors]
    outs = _run(eng.Reducescatter([c for c, _ in pairs], _reducescatter_op(op), prescale_factor,
                                  postscale_factor, name))
    return [compression.decompress(o, ctx) for o, (_, ctx) in zip(outs, pairs, strict=True)]


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                                op: int = Average,
                                process_set: ProcessSet = global_process_set,
                                prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    _check_process_set(process_set)
    return _submit(eng.Reducescatter(tensors, _reducescatter_op(op), prescale_factor,
                                     postscale_factor, name), _identity)


# -- synchronisation points ---------------------------------------------------------------------
def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Return once every rank has called barrier()."""
    _check_process_set(process_set)
    _run(eng.Barrier())


def join(device: int = -1) -> int:
    """This rank has no more data: take part in the others' allreduces (contributing zeros)
    until every rank has joined. Returns the rank that joined last."""
    return _run(eng.Join())
