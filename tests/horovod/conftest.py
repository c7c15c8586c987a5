"""Tests in this folder run *inside* `mpiexec -n N python -m pytest --with-mpi tests/horovod`.

tests/test_horovod.py launches them once per N (2 and 3) under a timeout. Without --with-mpi
(a plain `pytest tests`) they are not collected. `hvd.init()` is called once for the session;
a failure on any rank aborts the whole job instead of leaving the others in a collective.
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
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.config.getoption("with_mpi", default=False):
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            sys.stderr.write(f"\nrank {MPI.COMM_WORLD.Get_rank()}: {item.nodeid} failed:\n"
                             f"{report.longreprtext}\naborting the MPI job\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)


@pytest.fixture(scope="session", autouse=True)
def hvd_session():
    import torch

    import mpiml.horovod.torch as hvd

    torch.set_num_threads(1)
    hvd.init()
    yield hvd
    hvd.shutdown()
