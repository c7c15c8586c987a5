"""The `World`: who we are in the job, and the few collectives the trainer needs.

Built once in `main()` and passed down. It owns a duplicate of the launcher's communicator so
our traffic never matches a user's messages, and a shared-memory split so local rank and the
ranks per node come from MPI itself rather than from launcher environment variables.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from mpiml.comm.watchdog import EXIT_WATCHDOG, FORWARD_GRACE_S, Watchdog
from mpiml.errors import CommError, MpimlError, unwinding_alone

T = TypeVar("T")

# Exit codes (documented in the README): 0 done; 1 a rank failed and the job was aborted;
# 2 bad input (config, data, checkpoint, launcher, run dir) agreed on by every rank; 3 the loss
# became NaN/inf under train.nonfinite=abort; 4 the watchdog saw a rank that did not arrive;
# 75 (EX_TEMPFAIL) stopped by SIGUSR1/SIGTERM after a checkpoint: requeue to resume.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_TIMEOUT = EXIT_WATCHDOG
EXIT_REQUEUE = 75


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
        self.watchdog: Watchdog | None = None

    def start_watchdog(self, timeout_s: float | None) -> None:
        """Abort the job when a collective waits longer than `timeout_s` (None: never)."""
        if self.watchdog is not None or not timeout_s or self.size == 1:
            return
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:  # its thread calls MPI beside ours
            if self.is_root:
                sys.stderr.write("mpiml: warning: this MPI gives no MPI_THREAD_MULTIPLE, so "
                                 "the comm.timeout_s watchdog is off: a dead rank can hang "
                                 "the job\n")
            return
        self.watchdog = Watchdog(self.comm, timeout_s)

    def watch(self, label: str) -> AbstractContextManager[None]:
        """Wrap a wait on other ranks (a collective) so the watchdog can time it."""
        return self.watchdog.watch(label) if self.watchdog is not None else nullcontext()

    # -- identity ---------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"World(rank={self.rank}, size={self.size}, "
                f"local={self.local_rank}/{self.local_size})")

    # -- collectives (every rank must call them) -------------------------------------------
    def barrier(self) -> None:
        with self.watch("barrier"):
            self.comm.Barrier()

    def bcast_object(self, obj: T, root: int = 0) -> T:
        with self.watch("bcast"):
            return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj: T) -> list[T]:
        with self.watch("allgather"):
            return self.comm.allgather(obj)

    def gather_object(self, obj: T, root: int = 0) -> list[T] | None:
        """Every rank's `obj` on `root` (in rank order); None on the other ranks."""
        with self.watch("gather"):
            return self.comm.gather(obj, root=root)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum a small float64 array across ranks (metrics, counts): MPI's latency path."""
        send = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(send)
        with self.watch("allreduce sum"):
            self.comm.Allreduce(send, out, op=MPI.SUM)
        return out

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(send)
        with self.watch("allreduce max"):
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
        with self.watch("rank 0's verdict"):
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
        with self.watch("agreement"):
            failures = self.comm.allgather(failure)
        for rank, err in enumerate(failures):
            if err is not None:
                if rank != 0:
                    err = type(err)(f"on rank {rank}: {err}")
                raise err.agreed()
        return value

    def check_same(self, what: str, value: Any) -> None:
        """Raise CommError on every rank unless `value` is equal on all ranks."""
        with self.watch("check_same"):
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
    def close(self, wait_for_peers: bool = True) -> None:
        """Release the communicators; without `wait_for_peers` (this rank is failing alone)
        nothing that needs the other ranks is done."""
        if self.watchdog is not None:
            self.watchdog.close(goodbye=wait_for_peers)
            self.watchdog = None
        for comm in (self.node_comm, self.comm):
            if wait_for_peers and comm != MPI.COMM_NULL and not MPI.Is_finalized():
                comm.Free()
        self.node_comm = self.comm = MPI.COMM_NULL

    def __enter__(self) -> World:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(wait_for_peers=not unwinding_alone(exc))


def mpi_library_version() -> str:
    """The MPI library mpi4py loaded (to name the right launcher flag in errors)."""
    return MPI.Get_library_version()


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
            return err.exit_code
        return _abort(rank, f"mpiml: error on rank {rank}: {type(err).__name__}: {err}\n", 1)
    except BaseException as err:  # noqa: BLE001 - anything uncaught must end the whole job
        message = f"mpiml: rank {rank} failed:\n{traceback.format_exc()}"
        message += f"mpiml: aborting the job because rank {rank} failed\n"
        return _abort(rank, message, 130 if isinstance(err, KeyboardInterrupt) else 1)


def _abort(rank: int, message: str, code: int) -> int:
    sys.stderr.write(message)
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
        time.sleep(FORWARD_GRACE_S)  # let the launcher pass the message on before the kill
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)
