"""Tests in this folder run *inside* `mpiexec -n N python -m pytest --with-mpi tests/mpi`.

Without --with-mpi (a plain `pytest tests`) they are not collected at all.
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


@pytest.fixture
def comm():
    """A private duplicate of COMM_WORLD, freed after the test."""
    from mpi4py import MPI

    dup = MPI.COMM_WORLD.Dup()
    yield dup
    dup.Free()
