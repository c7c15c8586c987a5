"""mpiml.horovod under real mpiexec: the API suite (tests/horovod) at N = 2 and 3, one job per
N, and the Horovod-style example script training on 2 ranks."""

from __future__ import annotations

import json

import pytest

from mpirun import REPO, python, run_mpi


@pytest.mark.parametrize("n", [2, 3])
def test_horovod_api_suite(n):
    job = run_mpi(n, [python(), "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider",
                      "--timeout=150", "--timeout-method=thread", str(REPO / "tests" / "horovod")],
                  timeout=240)
    assert job.returncode == 0, job.output
    assert " passed" in job.stdout and " failed" not in job.stdout, job.output


def test_horovod_style_example_learns_on_two_ranks(tmp_path):
    metrics = tmp_path / "metrics.json"
    job = run_mpi(2, [python(), str(REPO / "examples" / "horovod_style_mnist_like.py"),
                      "--epochs", "6", "--quiet", "--metrics-json", str(metrics)], timeout=180)
    assert job.returncode == 0, job.output
    result = json.loads(metrics.read_text())
    assert result["workers"] == 2
    assert result["test_accuracy"] > 0.9, result  # chance is 0.1
    assert job.stdout.count("Test set:") == 6  # rank 0 alone prints, once per epoch
