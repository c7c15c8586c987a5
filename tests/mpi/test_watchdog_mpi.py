"""The collective-progress watchdog, run inside mpiexec at N = 1..4: it names the ranks that
did not arrive, stays quiet while they do, and closes cleanly however ranks stagger."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mpiml.comm.watchdog import Watchdog

pytestmark = pytest.mark.mpi


def test_late_ranks_are_named_and_the_rest_stay_quiet(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    reports: list[str] = []
    dog = Watchdog(comm, timeout_s=0.6, interval_s=0.05, on_timeout=reports.append)
    # Everyone "enters" one collective that completes.
    with dog.watch("quick"):
        out = np.empty(1)
        comm.Allreduce(np.ones(1), out)
    # Rank 0 alone waits in a second one; the others run "outside MPI" meanwhile.
    if rank == 0:
        with dog.watch("lonely"):
            deadline = time.monotonic() + 5
            while not reports and time.monotonic() < deadline:
                time.sleep(0.02)
    else:
        time.sleep(1.2)
    comm.Barrier()
    dog.close()
    if rank == 0 and size > 1:
        assert len(reports) == 1, reports
        report = reports[0]
        assert "collective #2 (lonely)" in report
        assert f"rank(s) {', '.join(map(str, range(1, size)))} did not arrive" in report
        assert "rank 1: alive" in report and "has not arrived" in report
    elif rank == 0:
        assert "every rank reached it" in reports[0]
    else:
        assert reports == []  # rank 0 was alive and never late for them


def test_staggered_close_is_clean_and_quick(comm):
    rank = comm.Get_rank()
    dog = Watchdog(comm, timeout_s=30, interval_s=0.05, on_timeout=pytest.fail)
    time.sleep(0.15 * rank)  # early closers' goodbyes reach the others while they still run
    start = time.monotonic()
    dog.close()
    assert time.monotonic() - start < 5
    assert dog._drained
