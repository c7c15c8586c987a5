"""pytest hooks shared by the suites that run *inside* `mpiexec ... pytest --with-mpi`.

Each suite's conftest re-exports them: without --with-mpi the suite is not collected, and a
failed test on one rank aborts the whole job, since the other ranks would wait in a collective.
"""

from __future__ import annotations

import sys

import pytest


def pytest_ignore_collect(collection_path, config):
    if not config.getoption("with_mpi", default=False):
        return True
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on one rank aborts the job: the other ranks would wait in a collective."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.config.getoption("with_mpi", default=False):
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            sys.stderr.write(f"\nrank {MPI.COMM_WORLD.Get_rank()}: {item.nodeid} failed:\n"
                             f"{report.longreprtext}\naborting the MPI job\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)
