"""Run the in-MPI test suites (tests/mpi) under real mpiexec at N = 1, 2, 3 and 4.

N = 3 and 4 oversubscribe this 2-core machine on purpose: the code must not assume a power of
two, nor as many cores as ranks. The same suite runs at every N and asserts collectively.
"""

from __future__ import annotations

import pytest

from mpirun import REPO, python, run_mpi


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_mpi_suite(n):
    job = run_mpi(n, [python(), "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider",
                      "--timeout=150", "--timeout-method=thread", str(REPO / "tests" / "mpi")],
                  timeout=240)
    assert job.returncode == 0, job.output
    assert " passed" in job.stdout, job.output
