"""Seeing what a job does: one real 2-rank run (with a straggler on rank 1), then its metrics,
evaluation at 1 and 2 ranks, plots, TensorBoard files and both progress modes."""

from __future__ import annotations

import json
import math
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from mpiml.checkpoint import resolve_checkpoint
from mpiml.errors import CheckpointError

from mpirun import REPO, SUPPORT, kill_group, mpiexec, python, run_mpi

SMALL = ["--set", "data.name=synthetic", "--set", "data.samples=480", "--set", "data.features=8",
         "--set", "data.classes=3", "--set", "train.epochs=2", "--set", "train.log_every=4",
         "--set", "data.batch_size=16", "--set", "optim.lr=0.05"]
STRAGGLER = ["--set", "model.name=mpiml_testkit:SlowOnRank",
             "--set", "model.kwargs={rank: 1, delay_ms: 15, features: 8, classes: 3}",
             "--set", "optim.lr_scaling=linear", "--set", "optim.warmup_steps=3",
             "--set", "log.tensorboard=true"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A short real training job with 2 ranks, output to a pipe; shared by this module."""
    path = tmp_path_factory.mktemp("observe") / "run"
    job = run_mpi(2, [python(), "-m", "mpiml.train", "configs/digits_mlp.yaml", *SMALL,
                      *STRAGGLER, "--set", f"run.dir={path}"], timeout=120)
    assert job.returncode == 0, job.output
    return path, job.stdout


def test_metrics_record_the_step_breakdown_and_the_straggler(trained):
    run_dir, _ = trained
    train = [r for r in records(run_dir) if "loss" in r]
    assert len(train) >= 4
    for r in train:
        stages = r["breakdown_ms"]
        assert set(stages) == {"data", "forward_backward", "comm_exposed", "optimizer"}
        assert r["step_ms"] == pytest.approx(sum(stages.values()), abs=0.01)
        assert r["slowest_step_ms"] >= r["step_ms"] - 0.002  # rank 0's is one of them
        assert r["busy_ms_min"] <= r["busy_ms_max"] <= r["slowest_step_ms"] + 0.002
    # Rank 1 sleeps 15 ms per forward: it is named, and rank 0 waits for it in comm_exposed.
    assert [r["slowest_rank"] for r in train].count(1) >= len(train) - 1, train
    assert sorted(r["busy_ms_max"] - r["busy_ms_min"] for r in train)[len(train) // 2] > 10
    assert sorted(r["breakdown_ms"]["comm_exposed"] for r in train)[len(train) // 2] > 10


def test_logged_lr_is_scaled_warmed_up_and_cosine_decayed(trained):
    run_dir, _ = trained
    train = [r for r in records(run_dir) if "loss" in r]
    total, peak, warmup = train[-1]["step"], 0.05 * 2, 3  # lr_scaling linear with 2 ranks
    for r in train:
        k = r["step"] - 1  # the record's last step, counted from 0
        factor = (k + 1) / warmup if k < warmup else \
            0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert r["lr"] == pytest.approx(peak * factor, rel=1e-5), r


def test_piped_output_gets_plain_progress_lines(trained):
    _, stdout = trained
    lines = [line for line in stdout.splitlines() if "samples/s" in line]
    assert lines and all("ETA" in line and "loss" in line and "step" in line for line in lines)
    assert "\r" not in stdout


def test_tensorboard_event_files_are_written(trained):
    run_dir, _ = trained
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 200


@pytest.mark.parametrize("n", [1, 2])
def test_evaluate_agrees_with_the_final_logged_accuracy(trained, n):
    run_dir, _ = trained
    final = [r for r in records(run_dir) if "eval_accuracy" in r][-1]
    job = run_mpi(n, [python(), "-m", "mpiml.evaluate", str(run_dir), "--json"], timeout=90)
    assert job.returncode == 0, job.output
    lines = [json.loads(line) for line in job.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, job.output  # rank 0 alone reports
    got = lines[0]
    assert got["ranks"] == n and got["step"] == final["step"]
    assert got["accuracy"] == final["eval_accuracy"]
    assert got["loss"] == pytest.approx(final["eval_loss"], abs=2e-6)


def test_evaluate_rejects_weights_that_do_not_fit_the_model(trained):
    run_dir, _ = trained
    job = run_mpi(1, [python(), "-m", "mpiml.evaluate", str(run_dir), "--set",
                      "model.kwargs={rank: 1, features: 8, classes: 3, hidden: 5}"], timeout=90)
    assert job.returncode == 2, job.output
    assert "model.pt does not fit model 'mpiml_testkit:SlowOnRank'" in job.stderr, job.output


def test_evaluate_finds_the_newest_checkpoint_or_names_what_is_missing(trained, tmp_path):
    run_dir, _ = trained
    newest = resolve_checkpoint(run_dir)
    assert newest.name == f"step-{records(run_dir)[-1]['step']}"
    assert resolve_checkpoint(newest) == newest
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(tmp_path / "nothing")
    assert f"{tmp_path / 'nothing'} is neither a checkpoint folder" in str(err.value)


def _is_png(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert path.stat().st_size > 10_000, path  # axes, curves and labels, not an empty canvas
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_plot_overlays_runs_into_valid_pngs(trained, tmp_path):
    run_dir, _ = trained
    other = tmp_path / "other_run"  # a second run to overlay: the same records, loss halved
    other.mkdir()
    with (other / "metrics.jsonl").open("w") as f:
        for r in records(run_dir):
            if "loss" in r:
                r["loss"] /= 2
            f.write(json.dumps(r) + "\n")
    out = tmp_path / "plots"
    done = subprocess.run([python(), "-m", "mpiml.plot", str(run_dir), str(other), "--out",
                           str(out)], capture_output=True, text=True, cwd=REPO, timeout=90)
    assert done.returncode == 0, done.stderr
    names = {"loss.png", "accuracy.png", "throughput.png", "lr.png", "breakdown.png"}
    assert {Path(line).name for line in done.stdout.split()} == names
    for name in names:
        width, height = _is_png(out / name)
        assert width >= 600 and height >= 400
    missing = subprocess.run([python(), "-m", "mpiml.plot", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert missing.returncode == 2 and "has no metrics.jsonl" in missing.stderr


def run_on_terminal(argv: list[str], timeout: float = 90) -> tuple[int, str]:
    """Run `mpiexec -n 1 argv` with its output on a pseudo-terminal, as a user at a shell."""
    master, slave = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100",
               PYTHONPATH=os.pathsep.join([str(SUPPORT), str(REPO)]))
    proc = subprocess.Popen(mpiexec() + ["-n", "1", *argv], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, cwd=REPO, env=env,
                            start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                kill_group(proc)
                pytest.fail(f"no end within {timeout} s; killed its process group\n{out!r}")
            if select.select([master], [], [], 0.2)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    data = b""
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    return proc.wait(timeout=30), out.decode(errors="replace")


def test_terminal_output_gets_a_progress_bar(tmp_path):
    code, out = run_on_terminal([python(), "-m", "mpiml.train", "configs/digits_mlp.yaml",
                                 *SMALL, "--set", "model.kwargs={hidden: [16]}",
                                 "--set", "train.epochs=1",
                                 "--set", f"run.dir={tmp_path / 'run'}"])
    assert code == 0, out
    assert "\r" in out and "step/s" in out and "24/24" in out, out  # tqdm's bar and ETA
    assert "epoch 0:" in out and "samples/s" in out and "loss " in out, out
    assert "ETA" not in out  # no plain progress lines on a terminal
    assert "eval loss" in out  # messages still print, above the bar
