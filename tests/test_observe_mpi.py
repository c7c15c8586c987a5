"""Seeing what a job did: one real 2-rank training run, then evaluation, plots and metrics."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mpirun import REPO, python, run_mpi

SMALL = ["--set", "data.name=synthetic", "--set", "data.samples=480", "--set", "data.features=8",
         "--set", "data.classes=3", "--set", "model.kwargs={hidden: [16]}",
         "--set", "train.epochs=2", "--set", "train.log_every=4", "--set", "data.batch_size=16",
         "--set", "optim.lr_scaling=linear", "--set", "optim.warmup_steps=3",
         "--set", "optim.lr=0.05"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A short real training job with 2 ranks, shared by the tests of this module."""
    path = tmp_path_factory.mktemp("observe") / "run"
    job = run_mpi(2, [python(), "-m", "mpiml.train", "configs/digits_mlp.yaml", *SMALL,
                      "--set", f"run.dir={path}"], timeout=120)
    assert job.returncode == 0, job.output
    return path


@pytest.mark.parametrize("n", [1, 2])
def test_evaluate_agrees_with_the_final_logged_accuracy(run_dir, n):
    final = [r for r in records(run_dir) if "eval_accuracy" in r][-1]
    job = run_mpi(n, [python(), "-m", "mpiml.evaluate", str(run_dir), "--json"], timeout=90)
    assert job.returncode == 0, job.output
    lines = [json.loads(line) for line in job.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, job.output  # rank 0 alone reports
    got = lines[0]
    assert got["ranks"] == n and got["step"] == final["step"]
    assert got["accuracy"] == final["eval_accuracy"]
    assert got["loss"] == pytest.approx(final["eval_loss"], abs=2e-6)


def test_evaluate_names_a_missing_checkpoint(tmp_path):
    done = subprocess.run([python(), "-m", "mpiml.evaluate", str(tmp_path / "nothing")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2
    assert f"{tmp_path / 'nothing'} is neither a checkpoint folder" in done.stderr
