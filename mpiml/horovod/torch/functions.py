"""`horovod.torch.functions`: broadcasting parameters, optimizer state and Python objects."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mpiml.comm import engine as eng
from mpiml.horovod.common.exceptions import HorovodInternalError
from mpiml.horovod.torch import mpi_ops
from mpiml.horovod.torch.mpi_ops import ProcessSet, global_process_set


def broadcast_parameters(params: Any, root_rank: int) -> None:
    """Overwrite every rank's tensors with root's, in place.

    `params` is a dict such as ``model.state_dict()`` (broadcast in sorted-name order, as
    Horovod does), or a list or iterable of tensors or ``(name, tensor)`` pairs such as
    ``model.named_parameters()``.
    """
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, Iterable) and not isinstance(params, torch.Tensor):
        items = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(f"invalid params of type: {type(params)}")
    with torch.no_grad():
        for _, tensor in items:
            mpi_ops.broadcast_(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor,
                               root_rank)


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor stood in a state dict whose tensors travel separately."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _slots(obj: Any) -> list[_TensorSlot]:
    if isinstance(obj, _TensorSlot):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _slots(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _slots(v)]
    return []


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              model: Any = None) -> None:
    """Give every rank root's optimizer state and hyper-parameters (lr, momentum, ...).

    Works for the standard torch optimizers (LBFGS excepted, as in Horovod) and for a
    `DistributedOptimizer`. The structure travels pickled; each state tensor is broadcast as a
    tensor. Unlike Horovod, a freshly built optimizer is not stepped with zero gradients first
    (that would change parameters under weight decay): ranks simply end with root's state,
    empty or not.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    engine = mpi_ops._get()
    is_root = engine.rank == root_rank
    tensors: list[torch.Tensor] = []
    skeleton = _strip(optimizer.state_dict(), tensors)
    layout = [len(g["params"]) for g in skeleton["param_groups"]]
    everyone = mpi_ops._run(eng.AllgatherObject(layout, "optimizer.layout"))
    differ = [r for r, theirs in enumerate(everyone) if theirs != everyone[root_rank]]
    if differ:
        raise HorovodInternalError(
            f"broadcast_optimizer_state: the optimizer has parameter groups of sizes "
            f"{everyone[root_rank]} on root rank {root_rank} but {everyone[differ[0]]} on rank "
            f"{differ[0]}; every rank must build the same optimizer over the same model")
    root_skeleton = broadcast_object(skeleton if is_root else None, root_rank,
                                     name="optimizer.state")
    received = []  # slot i is the i-th tensor met in traversal order, on root as here
    with torch.no_grad():
        for slot in _slots(root_skeleton):
            tensor = tensors[slot.index] if is_root else torch.empty(slot.shape, dtype=slot.dtype)
            received.append(mpi_ops.broadcast_(tensor, root_rank))
    if not is_root:
        optimizer.load_state_dict(_fill(root_skeleton, received))


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """Root's `obj` (pickled) on every rank."""
    mpi_ops._check_process_set(process_set)
    return mpi_ops._run(eng.BroadcastObject(obj, root_rank, name, mpi_ops.size()))


def allgather_object(obj: Any, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list[Any]:
    """Every rank's `obj` (pickled), as a list in rank order."""
    mpi_ops._check_process_set(process_set)
    return mpi_ops._run(eng.AllgatherObject(obj, name))
