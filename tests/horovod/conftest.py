"""Tests in this folder run *inside* `mpiexec -n N python -m pytest --with-mpi tests/horovod`.

tests/test_horovod.py launches them once per N (2 and 3) under a timeout. Without --with-mpi
(a plain `pytest tests`) they are not collected. `hvd.init()` is called once for the session;
a failure on any rank aborts the whole job instead of leaving the others in a collective.
"""

from __future__ import annotations

import pytest

from mpi_suite import pytest_ignore_collect, pytest_runtest_makereport  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def hvd_session():
    import torch

    import mpiml.horovod.torch as hvd

    torch.set_num_threads(1)
    hvd.init()
    yield hvd
    hvd.shutdown()
