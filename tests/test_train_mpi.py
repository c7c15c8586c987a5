"""The trainer under real mpiexec: equivalence with one big-batch process, failures, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from mpiml.heap import glibc

from mpirun import python, run_mpi

SYNTH = ["--set", "data.name=synthetic", "--set", "data.samples=600", "--set", "data.features=12",
         "--set", "data.classes=3", "--set", "model.kwargs={hidden: [24, 16]}",
         "--set", "train.epochs=3", "--set", "train.log_every=5"]


def train(n: int, run_dir: Path, *overrides: str, timeout: float = 120):
    argv = [python(), "-m", "mpiml.train", "configs/digits_mlp.yaml", *SYNTH,
            "--set", f"run.dir={run_dir}", *overrides]
    return run_mpi(n, argv, timeout=timeout)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    steps = sorted(run_dir.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    return torch.load(steps[-1] / "model.pt", weights_only=True)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_n_ranks_equal_one_rank_with_n_times_the_batch(tmp_path, n, optim):
    b = 8
    common = ("--set", f"optim.name={optim}", "--set", "optim.lr=0.01", "--set",
              "train.max_steps=30", "--set", "comm.bucket_mb=0.002")
    multi = train(n, tmp_path / "multi", "--set", f"data.batch_size={b}", *common)
    assert multi.returncode == 0, multi.output
    single = train(1, tmp_path / "single", "--set", f"data.batch_size={n * b}", *common)
    assert single.returncode == 0, single.output
    got, want = final_params(tmp_path / "multi"), final_params(tmp_path / "single")
    initial = None
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5, msg=name)
        initial = name
    assert initial is not None
    # The runs must have trained: parameters moved far more than the tolerance.
    records = [json.loads(line) for line in (tmp_path / "multi/metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]


def test_accumulation_and_clipping_match_one_big_batch(tmp_path):
    """2 ranks x 3 micro-batches of 4, clipped, equal 1 rank with batch 24, clipped."""
    common = ("--set", "train.max_steps=15", "--set", "optim.clip_grad_norm=0.05",
              "--set", "optim.lr=0.05")
    acc = train(2, tmp_path / "acc", "--set", "data.batch_size=4", "--set",
                "train.accumulate_steps=3", *common)
    big = train(1, tmp_path / "big", "--set", "data.batch_size=24", *common)
    unclipped = train(1, tmp_path / "free", "--set", "data.batch_size=24",
                      "--set", "train.max_steps=15", "--set", "optim.lr=0.05")
    assert acc.returncode == big.returncode == unclipped.returncode == 0, acc.output + big.output
    want, free = final_params(tmp_path / "big"), final_params(tmp_path / "free")
    for name, value in final_params(tmp_path / "acc").items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=2e-5, msg=name)
    assert any(not torch.allclose(want[n], free[n], atol=1e-3) for n in want), \
        "clipping at 0.05 should have changed the result"


def test_overlap_off_mpi_algorithm_and_malloc_defaults_give_the_same_model(tmp_path):
    base = ("--set", "train.max_steps=20", "--set", "data.batch_size=8")
    a = train(2, tmp_path / "a", *base, "--set", "comm.overlap=false", "--set",
              "comm.algorithm=mpi", "--set", "train.keep_freed_memory=false")
    b = train(2, tmp_path / "b", *base, "--set", "comm.overlap=true", "--set",
              "comm.algorithm=ring", "--set", "comm.bucket_mb=0.001")
    assert a.returncode == 0 and b.returncode == 0, a.output + b.output
    # glibc's malloc tuning (mpiml/heap.py) follows the config and changes no result.
    assert "freed memory kept" not in a.stdout, a.output
    assert ("freed memory kept" in b.stdout) == (glibc() is not None), b.output
    for name, value in final_params(tmp_path / "a").items():
        torch.testing.assert_close(final_params(tmp_path / "b")[name], value, rtol=1e-5,
                                   atol=1e-6)


def test_metrics_are_global_and_run_dir_is_complete(tmp_path):
    # batch 8: 37 steps per epoch, 111 in all: enough for the overlap tuner (51) to finish
    job = train(2, tmp_path / "run", "--set", "checkpoint.every_steps=10",
                "--set", "data.batch_size=8")
    assert job.returncode == 0, job.output
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    train_recs = [r for r in records if "loss" in r]
    eval_recs = [r for r in records if "eval_accuracy" in r]
    assert train_recs and eval_recs
    assert {"step", "epoch", "loss", "samples_per_s"} <= set(train_recs[0])
    # comm.overlap auto timed both ways in the first steps, chose, and said so once.
    assert job.stdout.count("comm.overlap auto: ") == 1, job.output
    chosen = "auto: on" in job.stdout
    assert train_recs[-1]["overlap"] is chosen
    assert {"epoch", "eval_loss", "eval_accuracy"} <= set(eval_recs[0])
    assert len(eval_recs) == 3  # one per epoch, not one per rank
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoints/step-*"))
    assert steps[:2] == [10, 20] and steps[-1] == train_recs[-1]["step"]
    assert not list(run.glob("checkpoints/.*")), "temporary checkpoint folders left behind"
    assert "optim:" in (run / "config.yaml").read_text()


def test_exception_on_rank_1_ends_the_job_and_names_the_rank(tmp_path):
    start = time.monotonic()
    job = train(3, tmp_path / "run", "--set", "model.name=mpiml_testkit:FailOnRank",
                "--set", "model.kwargs={rank: 1, features: 12, classes: 3}", timeout=60)
    assert job.returncode != 0
    assert time.monotonic() - start < 30
    assert "rank 1 failed" in job.stderr and "injected failure" in job.stderr, job.output


def test_layout_mismatch_is_a_clear_error_not_a_hang(tmp_path):
    job = train(2, tmp_path / "run", "--set", "model.name=mpiml_testkit:RankShaped",
                "--set", "model.kwargs={features: 12, classes: 3}", timeout=60)
    assert job.returncode == 2, job.output
    assert "model layout differs" in job.stderr and "rank 1" in job.stderr, job.output


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'. Did you mean 'lr'?"),
    ("optim.name=lbfgs", "optim.name = 'lbfgs' is not one of the choices"),
    ("data.batch_size=many", "data.batch_size = 'many' has the wrong type"),
    ("model.name=no_such_pkg.mod:Net", "no module named 'no_such_pkg.mod'"),
    ("data.batch_size=5000", "fewer than one global batch"),
])
def test_bad_input_is_reported_once_with_exit_2(tmp_path, override, message):
    job = train(2, tmp_path / "run", "--set", override, timeout=60)
    assert job.returncode == 2, job.output
    assert message in job.stderr, job.output
    assert job.stderr.count("mpiml:") == 1, job.output  # rank 0 speaks for everyone


def test_default_job_reaches_95_percent_on_digits(tmp_path):
    job = run_mpi(2, [python(), "-m", "mpiml.train", "configs/digits_mlp.yaml",
                      "--set", f"run.dir={tmp_path}"], timeout=180)
    assert job.returncode == 0, job.output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    final = [r for r in records if "eval_accuracy" in r][-1]
    assert final["eval_accuracy"] >= 0.95, final
    assert "accuracy" in job.stdout
