"""Tests in this folder run *inside* `mpiexec -n N python -m pytest --with-mpi tests/mpi`.

They are launched by tests/test_mpi_suites.py for N = 1..4 under a timeout. Run without
--with-mpi (a plain `pytest tests`) they are not collected at all.
"""

from __future__ import annotations

import pytest

from mpi_suite import pytest_ignore_collect, pytest_runtest_makereport  # noqa: F401


@pytest.fixture
def comm():
    """A private duplicate of COMM_WORLD, freed after the test."""
    from mpi4py import MPI

    dup = MPI.COMM_WORLD.Dup()
    yield dup
    dup.Free()
