"""`DistributedOptimizer`: averages gradients across ranks before the wrapped optimizer steps.

Horovod's semantics (hooks per parameter, `backward_passes_per_step`, `synchronize()`,
`skip_synchronize()`, its misuse errors), with mpiml's way of moving the data: gradients are
fused into buckets in a fixed order that every rank shares, and each bucket's allreduce starts
on the engine's thread as soon as backward has produced all of its gradients, overlapping the
rest of backward. A bucket is launched only after every bucket before it, so ranks whose
backward finishes parameters in another order still submit the same collectives in the same
order; parameters that got no gradient are reduced as zeros at `synchronize()`.

Without compression each `.grad` becomes a view into its bucket once it has been reduced, so
with ``zero_grad(set_to_none=False)`` autograd accumulates straight into the buffer that
travels. The wrapper is a `torch.optim.Optimizer` that shares the wrapped optimizer's
`param_groups` and `state` (LR schedulers and `state_dict()` work on it) rather than a
dynamically built subclass of the wrapped optimizer's class.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mpiml.comm import engine as eng
from mpiml.errors import CommError
from mpiml.horovod.common.exceptions import HorovodInternalError
from mpiml.horovod.torch import mpi_ops
from mpiml.horovod.torch.compression import Compression, NoneCompressor
from mpiml.horovod.torch.mpi_ops import Adasum, Average, global_process_set

DEFAULT_BUCKET_BYTES = 4 << 20  # as mpiml's trainer; HOROVOD_FUSION_THRESHOLD overrides it


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    name: str
    buffer: torch.Tensor | None = None  # flat, allocated at first launch (compressed dtype)
    views: list[torch.Tensor] = field(default_factory=list)
    ctxs: list[Any] = field(default_factory=list)  # compression contexts of the last launch
    sparse: list[bool] = field(default_factory=list)
    ready: int = 0
    handle: eng.Handle | None = None
    deferred: eng.Allreduce | None = None  # the last bucket runs in synchronize(), inline


def _split_list(items: list, n: int) -> list[list]:
    """Horovod's split_list: `n` contiguous chunks of near-equal length."""
    d, r = divmod(len(items), n)
    return [items[i * d + min(i, r):(i + 1) * d + min(i + 1, r)] for i in range(n)]


class _DistributedOptimizer(torch.optim.Optimizer):
    """A wrapper around a torch optimizer; build it with `DistributedOptimizer(...)`."""

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Any,
                 compression: Any, backward_passes_per_step: int, op: int,
                 gradient_predivide_factor: float, groups: Any, sparse_as_dense: bool) -> None:
        # torch.optim.Optimizer.__init__ is not called: param_groups, state and defaults are
        # the wrapped optimizer's own (see the properties below).
        self.__dict__["_opt"] = optimizer
        self._engine = mpi_ops._get()
        self._compression = compression
        self._direct = compression is Compression.none or compression is NoneCompressor
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.op = op
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.sparse_as_dense = sparse_as_dense
        self._synchronized = False
        self._should_synchronize = True
        self._hooks: list[Any] = []
        params = self._trainable()
        self._names = self._check_names(named_parameters, params)
        self._delay = {p: self.backward_passes_per_step for p in params}
        self._touched: set[torch.nn.Parameter] = set()  # hooked since the last synchronize
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[torch.nn.Parameter, _Bucket] = {}
        self._next = 0
        if self._engine.size > 1:
            self._check_layout(params)
            self._buckets = self._build_buckets(params, groups)
            for bucket in self._buckets:
                for p in bucket.params:
                    self._bucket_of[p] = bucket
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    # -- sharing the wrapped optimizer -----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        opt = self.__dict__.get("_opt")
        if opt is None:
            raise AttributeError(name)
        return getattr(opt, name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._opt.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._opt.param_groups = value

    @property
    def state(self) -> Any:
        return self._opt.state

    @state.setter
    def state(self, value: Any) -> None:
        self._opt.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self._opt.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._opt.defaults = value

    def state_dict(self) -> dict[str, Any]:
        return self._opt.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reset()
        self._synchronized = False
        self._should_synchronize = True
        self._opt.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        warnings.warn("parameters added to a DistributedOptimizer after it was built are not "
                      "averaged across ranks (as in Horovod)", stacklevel=2)
        self._opt.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self._opt!r})"

    # -- construction ----------------------------------------------------------------------------
    def _trainable(self) -> list[torch.nn.Parameter]:
        seen: dict[int, torch.nn.Parameter] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def _check_names(self, named_parameters: Any,
                     params: list[torch.nn.Parameter]) -> dict[torch.nn.Parameter, str]:
        if named_parameters is None:
            return {v: f"allreduce.noname.{i}.{j}" for i, group in enumerate(self.param_groups)
                    for j, v in enumerate(group["params"])}
        named = list(named_parameters)
        if any(not isinstance(p, tuple) for p in named):
            raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                             "usually produced by model.named_parameters().")
        seen, dups = set(), set()
        for name, _ in named:
            (dups if name in seen else seen).add(name)
        if dups:
            raise ValueError("Parameter names in named_parameters must be unique. "
                             f"Found duplicates: {', '.join(sorted(dups))}")
        all_ids = {id(v) for group in self.param_groups for v in group["params"]}
        unnamed = all_ids - {id(v) for _, v in named}
        if unnamed:
            raise ValueError("named_parameters was specified, but one or more model parameters "
                             "were not named. Python object ids: "
                             f"{', '.join(str(i) for i in sorted(unnamed))}")
        return {v: k for k, v in named}

    def _check_layout(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank must average the same parameters: a mismatch is an error on all ranks."""
        mine = [(self._names.get(p), tuple(p.shape), str(p.dtype)) for p in params]
        everyone = mpi_ops._run(eng.AllgatherObject(mine, "DistributedOptimizer.layout"))
        for rank, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                pairs = zip(everyone[0], theirs, strict=False)
                first = next((i for i, (a, b) in enumerate(pairs) if a != b),
                             min(len(theirs), len(everyone[0])))
                a = everyone[0][first] if first < len(everyone[0]) else "nothing"
                b = theirs[first] if first < len(theirs) else "nothing"
                raise HorovodInternalError(
                    f"DistributedOptimizer: trainable parameter #{first} is {a} on rank 0 but {b} "
                    f"on rank {rank} ({len(everyone[0])} against {len(theirs)} parameters); "
                    "every rank must wrap the same model's parameters")

    def _build_buckets(self, params: list[torch.nn.Parameter], groups: Any) -> list[_Bucket]:
        if groups is None:
            limit = int(os.environ.get("HOROVOD_FUSION_THRESHOLD", DEFAULT_BUCKET_BYTES))
            chunks, current, nbytes = [], [], 0
            for p in reversed(params):  # roughly the order backward produces gradients
                if current and (p.dtype != current[0].dtype or nbytes >= limit):
                    chunks.append(current)
                    current, nbytes = [], 0
                current.append(p)
                nbytes += p.numel() * p.element_size()
            chunks += [current] if current else []
        elif isinstance(groups, list):
            listed = {id(p) for group in groups for p in group}
            chunks = [[p for p in group if p in self._delay] for group in groups]
            chunks += [[p] for p in params if id(p) not in listed]
        else:
            chunks = _split_list(params, int(groups))
        buckets = []
        for chunk in chunks:  # one dtype per fused buffer
            by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
            for p in chunk:
                by_dtype.setdefault(p.dtype, []).append(p)
            buckets += [_Bucket(ps, self._names.get(ps[0], "grad")) for ps in by_dtype.values()]
        return buckets

    # -- gradients arrive ------------------------------------------------------------------------
    def _hook(self, p: torch.nn.Parameter) -> None:
        if self._delay[p] <= 0:
            raise AssertionError("Gradients were computed more than backward_passes_per_step "
                                 "times before call to step(). Increase backward_passes_per_step "
                                 "to accumulate gradients locally.")
        self._delay[p] -= 1
        self._touched.add(p)
        if self._delay[p] == 0:
            bucket = self._bucket_of[p]
            bucket.ready += 1
            while (self._next < len(self._buckets)
                   and self._buckets[self._next].ready == len(self._buckets[self._next].params)):
                self._launch(self._buckets[self._next])

    def _scales(self) -> tuple[float, float]:
        if self.op == Average:
            return 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
        return 1.0, 1.0

    def _launch(self, bucket: _Bucket) -> None:
        """Gather the bucket's gradients into its buffer and start its allreduce."""
        self._next += 1
        grads, bucket.sparse = [], []
        for p in bucket.params:
            g = p.grad
            if g is not None and g.is_sparse:
                if not self.sparse_as_dense:
                    raise NotImplementedError("sparse gradients need "
                                              "DistributedOptimizer(sparse_as_dense=True)")
                g = g.to_dense()
            bucket.sparse.append(p.grad is not None and p.grad.is_sparse)
            grads.append(g)
        if self._direct:
            self._fill_direct(bucket, grads)
        else:
            self._fill_compressed(bucket, grads)
        pre, post = self._scales()
        op = eng.Allreduce([bucket.buffer], [bucket.buffer], self.op, pre, post, bucket.name)
        if bucket is self._buckets[-1]:
            # Nothing is left to overlap with: run it on this thread in synchronize(), which
            # saves a thread hand-off (all of the cost for a small model on a busy machine).
            bucket.deferred = op
        else:
            bucket.handle = self._engine.submit(op)

    def _fill_direct(self, bucket: _Bucket, grads: list[torch.Tensor | None]) -> None:
        if bucket.buffer is None:
            bucket.buffer = torch.empty(sum(p.numel() for p in bucket.params),
                                        dtype=bucket.params[0].dtype)
            offsets = [0]
            for p in bucket.params:
                offsets.append(offsets[-1] + p.numel())
            bucket.views = [bucket.buffer[a:b].view_as(p)
                            for p, a, b in zip(bucket.params, offsets, offsets[1:], strict=False)]
        with torch.no_grad():
            for p, g, view, sparse in zip(bucket.params, grads, bucket.views, bucket.sparse,
                                          strict=True):
                if g is None:
                    view.zero_()
                elif g.data_ptr() != view.data_ptr():
                    view.copy_(g)
                if not sparse:
                    p.grad = view  # autograd accumulates here from now on

    def _fill_compressed(self, bucket: _Bucket, grads: list[torch.Tensor | None]) -> None:
        pieces, bucket.ctxs = [], []
        for p, g in zip(bucket.params, grads, strict=True):
            compressed, ctx = self._compression.compress(
                torch.zeros_like(p) if g is None else g.detach())
            pieces.append(compressed.reshape(-1))
            bucket.ctxs.append(ctx)
        bucket.buffer = torch.cat(pieces)
        offsets = [0]
        for piece in pieces:
            offsets.append(offsets[-1] + piece.numel())
        bucket.views = [bucket.buffer[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]

    def _finish(self, bucket: _Bucket) -> None:
        """Put the bucket's averaged values where the optimizer reads them."""
        with torch.no_grad():
            for i, p in enumerate(bucket.params):
                view = bucket.views[i]
                if not self._direct:
                    value = self._compression.decompress(view, bucket.ctxs[i]).view_as(p)
                    if p.grad is None or p.grad.is_sparse:
                        p.grad = value.to(p.dtype).clone()
                    else:
                        p.grad.copy_(value)
                if bucket.sparse[i]:
                    p.grad = (view.view_as(p) if self._direct else p.grad).to_sparse()

    # -- synchronisation -------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Finish every gradient allreduce (starting those backward did not start)."""
        try:
            while self._next < len(self._buckets):
                self._launch(self._buckets[self._next])
            failure: BaseException | None = None
            for bucket in self._buckets:
                try:
                    if bucket.handle is not None:
                        bucket.handle.wait()
                        self._finish(bucket)
                    elif bucket.deferred is not None:
                        op, bucket.deferred = bucket.deferred, None
                        self._engine.run(op)
                        self._finish(bucket)
                except CommError as err:
                    failure = failure or HorovodInternalError(str(err))
            if failure is not None:
                raise failure
        finally:
            self._reset()
        self._synchronized = True

    def _reset(self) -> None:
        for bucket in self._buckets:
            if bucket.handle is not None:
                try:  # never leave an op running on a buffer we may reuse
                    bucket.handle.wait()
                except CommError:
                    pass
            bucket.ready, bucket.handle, bucket.deferred = 0, None, None
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step
        self._touched.clear()
        self._next = 0

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = int(passes)
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """`step()` inside does not synchronize: call `synchronize()` yourself first."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Any = None) -> Any:
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.", stacklevel=2)
            self.synchronize()
        self._synchronized = False
        return self._opt.step() if closure is None else self._opt.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._touched:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(). This is "
                                 "prohibited as it can cause a race condition.")
        self._opt.zero_grad(set_to_none=set_to_none)

    def close(self) -> None:
        """Remove the gradient hooks (the wrapped optimizer keeps working on its own)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def DistributedOptimizer(optimizer: torch.optim.Optimizer,  # noqa: N802 - Horovod's name
                         named_parameters: Any = None, compression: Any = Compression.none,
                         backward_passes_per_step: int = 1, op: int = Average,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = global_process_set) -> _DistributedOptimizer:
    """Wrap `optimizer` so that `step()` applies gradients averaged (by `op`) over all ranks.

    Allreduces start during ``loss.backward()``; `step()` waits for them. For gradient
    clipping call ``optimizer.synchronize()``, clip, then step inside
    ``with optimizer.skip_synchronize():``. `backward_passes_per_step` accumulates that many
    backward passes locally before reducing (the sum is reduced, as in Horovod). `groups` (a
    count, or lists of parameters) fixes which gradients are fused together.
    """
    mpi_ops._check_process_set(process_set)
    if op == Adasum:
        raise NotImplementedError("Adasum is not supported by mpiml.horovod; use op=Average")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed",
                      DeprecationWarning, stacklevel=2)
        groups = num_groups if groups is None else groups
    if groups is not None:
        if not (isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
            raise ValueError("groups should be a non-negative integer or a list of list of "
                             "torch.Tensor.")
        if isinstance(groups, list):
            seen: set[int] = set()
            for group in groups:
                for p in group:
                    if not isinstance(p, torch.Tensor):
                        raise ValueError("groups must consist of torch.Tensor.")
                    if id(p) in seen:
                        raise ValueError("A parameter can only appear once in groups.")
                    seen.add(id(p))
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, not {backward_passes_per_step}")
    return _DistributedOptimizer(optimizer, named_parameters, compression,
                                 backward_passes_per_step, op, gradient_predivide_factor, groups,
                                 sparse_as_dense)
