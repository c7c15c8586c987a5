"""The `World`: who we are in the job, and the few collectives the trainer needs.

Built once in `main()` and passed down. It owns a duplicate of the launcher's communicator so
our traffic never matches a user's messages, and a shared-memory split so local rank and the
ranks per node come from MPI itself rather than from launcher environment variables.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from mpiml.errors import CommError, MpimlError

T = TypeVar("T")

# Exit codes (documented in the README): 0 done; 1 a rank failed and the job was aborted;
# 2 bad input (config, data, checkpoint, launcher) agreed on by every rank.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class World:
    """Rank, size, node-local rank and the job's communicators. Close it (or use `with`)."""

    def __init__(self, comm: MPI.Comm | None = None) -> None:
        base = MPI.COMM_WORLD if comm is None else comm
        self.comm: MPI.Comm = base.Dup()
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.node_comm: MPI.Comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank: int = self.node_comm.Get_rank()
        self.local_size: int = self.node_comm.Get_size()

    # -- identity ---------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"World(rank={self.rank}, size={self.size}, "
                f"local={self.local_rank}/{self.local_size})")

    # -- collectives (every rank must call them) -------------------------------------------
    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast_object(self, obj: T, root: int = 0) -> T:
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj: T) -> list[T]:
        return self.comm.allgather(obj)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum a small float64 array across ranks (metrics, counts): MPI's latency path."""
        send = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(send)
        self.comm.Allreduce(send, out, op=MPI.SUM)
        return out

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(send)
        self.comm.Allreduce(send, out, op=MPI.MAX)
        return out

    def root_decides(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and give every rank its result, or its MpimlError.

        For decisions that could differ between ranks (a file exists, a config parses): one
        verdict, shared, so no rank goes on while another has stopped.
        """
        outcome: tuple[bool, Any] = (True, None)
        if self.is_root:
            try:
                outcome = (True, fn())
            except MpimlError as err:
                outcome = (False, err)
        ok, value = self.comm.bcast(outcome, root=0)
        if not ok:
            raise value.agreed()
        return value

    def run_together(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it raises MpimlError on any rank, raise it on all.

        For steps every rank does itself (open its data, build its model) that could fail on
        some ranks only: no rank walks into the next collective while another has given up.
        """
        try:
            value, failure = fn(), None
        except MpimlError as err:
            value, failure = None, err
        failures = self.comm.allgather(failure)
        for rank, err in enumerate(failures):
            if err is not None:
                if rank != 0:
                    err = type(err)(f"on rank {rank}: {err}")
                raise err.agreed()
        return value

    def check_same(self, what: str, value: Any) -> None:
        """Raise CommError on every rank unless `value` is equal on all ranks."""
        everyone = self.comm.allgather(value)
        differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
        if differ:
            raise CommError(
                f"{what} differs between rank 0 and rank(s) {differ}; every rank must build "
                "the same thing (same config, same code version)"
            ).agreed()

    # -- failure ----------------------------------------------------------------------------
    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort): the alternative is ranks waiting forever."""
        MPI.COMM_WORLD.Abort(code)

    # -- life cycle -------------------------------------------------------------------------
    def close(self) -> None:
        for comm in (self.node_comm, self.comm):
            if comm != MPI.COMM_NULL and not MPI.Is_finalized():
                comm.Free()
        self.node_comm = self.comm = MPI.COMM_NULL

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_world(comm: MPI.Comm | None = None) -> World:
    """Create the job's World from the launcher's communicator (COMM_WORLD by default)."""
    return World(comm)


def run_or_abort(fn: Callable[[], int | None], rank: int | None = None) -> int:
    """Run `fn`; if it raises on this rank, print why with the rank and abort the whole job.

    An exception that only ends one rank would leave the others blocked in their next
    collective until the allocation runs out; MPI_Abort ends them all within seconds.
    """
    rank = MPI.COMM_WORLD.Get_rank() if rank is None else rank
    try:
        return int(fn() or 0)
    except SystemExit:
        raise
    except MpimlError as err:
        if err.shared:  # every rank holds this same verdict: end cleanly, rank 0 says why
            if rank == 0:
                sys.stderr.write(f"mpiml: {type(err).__name__}: {err}\n")
                sys.stderr.flush()
            return EXIT_USAGE
        return _abort(rank, f"mpiml: error on rank {rank}: {type(err).__name__}: {err}\n", 1)
    except BaseException as err:  # noqa: BLE001 - anything uncaught must end the whole job
        message = f"mpiml: rank {rank} failed:\n{traceback.format_exc()}"
        message += f"mpiml: aborting the job because rank {rank} failed\n"
        return _abort(rank, message, 130 if isinstance(err, KeyboardInterrupt) else 1)


def _abort(rank: int, message: str, code: int) -> int:
    sys.stderr.write(message)
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)
