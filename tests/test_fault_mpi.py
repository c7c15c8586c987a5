"""Faults under real mpiexec: exact resume, preemption, dead and stalled ranks, damaged
checkpoints, a job killed mid-save, NaN losses, a full or unwritable run dir, a bad launch.

One uninterrupted run is the oracle; one run stopped by SIGUSR1 is resumed in several ways.
Everything is tiny (a 259-parameter MLP, 48 steps) so the file runs in about a minute.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mpiml.resume import check_resumable

from mpirun import REPO, Job, python, run_mpi, start_mpi

# 256 training samples, global batch 16: 16 steps per epoch, 48 in all. Rank 0's forward
# calls: 1-16 train epoch 0, 17 evaluates, 18-33 train epoch 1 (steps 17-32), 34 evaluates.
FAULT = ["--set", "data.name=synthetic", "--set", "data.samples=320", "--set", "data.features=12",
         "--set", "data.classes=3", "--set", "data.noise=3.0", "--set", "data.batch_size=8",
         "--set", "train.epochs=3", "--set", "train.log_every=5",
         "--set", "checkpoint.every_steps=10", "--set", "model.name=mpiml_testkit:Faulty"]
NO_FAULT = "model.kwargs={fault: none}"
STOP_CALL = 26  # SIGUSR1 on rank 0 during step 25: checkpoints 10, 20 and 25
COMPARED = ("step", "epoch", "loss", "eval_loss", "eval_accuracy", "event", "skipped_steps")


def train(n: int, run_dir: Path, *overrides: str, resume: str | None = None,
          module: str = "mpiml.train", timeout: float = 120, env: dict | None = None) -> Job:
    argv = [python(), "-m", module, "configs/digits_mlp.yaml", *FAULT,
            "--set", f"run.dir={run_dir}", *overrides]
    if resume is not None:
        argv += ["--resume", resume]
    return run_mpi(n, argv, timeout=timeout, env=env)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    steps = sorted(run_dir.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    return torch.load(steps[-1] / "model.pt", weights_only=True)


def metrics(run_dir: Path) -> list[dict]:
    """The records that must not depend on being stopped (no times or rates)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [{k: r[k] for k in COMPARED if k in r} for r in records]


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run that is never stopped."""
    run = tmp_path_factory.mktemp("fault") / "reference"
    job = train(2, run, "--set", NO_FAULT)
    assert job.returncode == 0, job.output
    return run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Job]:
    """The same run, sent SIGUSR1 on rank 0 only during step 25."""
    run = tmp_path_factory.mktemp("fault") / "stopped"
    job = train(2, run, "--set", f"model.kwargs={{fault: sigusr1, rank: 0, at_call: {STOP_CALL}}}")
    return run, job


def copy_of(stopped_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    return run


# -- preemption and exact resume ------------------------------------------------------------------

def test_sigusr1_on_one_rank_checkpoints_and_exits_75(stopped):
    run, job = stopped
    assert job.returncode == 75, job.output
    assert "stopped at step 25 on SIGUSR1" in job.stdout, job.output
    assert [p.name for p in sorted(run.glob("checkpoints/step-*"))] == \
        ["step-10", "step-20", "step-25"]
    meta = check_resumable(run / "checkpoints" / "step-25")
    assert (meta["step"], meta["epoch"], meta["epoch_step"]) == (25, 1, 9)


def test_resume_is_exact(reference, stopped, tmp_path):
    run = copy_of(stopped[0], tmp_path)
    job = train(2, run, "--set", NO_FAULT, resume="auto")
    assert job.returncode == 0, job.output
    assert re.search(r"resumed from \S+/step-25 at step 25", job.stdout), job.output
    assert_same_bits(final_params(run), final_params(reference))
    assert metrics(run) == metrics(reference)


def test_resume_on_one_rank_keeps_the_global_batch(reference, stopped, tmp_path):
    run = copy_of(stopped[0], tmp_path)
    job = train(1, run, "--set", NO_FAULT, resume="auto")
    assert job.returncode == 0, job.output
    assert "data.batch_size 8 -> 16 keeps the global batch of 16" in job.stdout, job.output
    # Same samples in the same global batches; only the order of float additions differs.
    got, want = final_params(run), final_params(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert [r["step"] for r in metrics(run)] == [r["step"] for r in metrics(reference)]


def test_resume_on_ranks_that_cannot_keep_the_global_batch_is_refused(stopped, tmp_path):
    run = copy_of(stopped[0], tmp_path)
    job = train(3, run, "--set", NO_FAULT, resume="auto", timeout=60)
    assert job.returncode == 2, job.output
    assert "global batch of 16" in job.stderr and "HINT: run on a number of ranks in" \
        in job.stderr, job.output


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_and_stays_exact(reference, stopped, tmp_path, how):
    run = copy_of(stopped[0], tmp_path)
    model = run / "checkpoints" / "step-25" / "model.pt"
    data = bytearray(model.read_bytes())
    if how == "truncate":
        data = data[: len(data) - 100]
    else:
        data[len(data) // 2] ^= 0x10
    model.write_bytes(bytes(data))
    job = train(2, run, "--set", NO_FAULT, resume="auto")
    assert job.returncode == 0, job.output
    assert f"{model} is corrupt" in job.stderr and "falling back" in job.stderr, job.output
    assert re.search(r"resumed from \S+/step-20 at step 20", job.stdout), job.output
    assert_same_bits(final_params(run), final_params(reference))
    assert metrics(run) == metrics(reference)


def test_job_killed_while_writing_a_checkpoint(reference, tmp_path):
    run, mark = tmp_path / "run", tmp_path / "hung"
    proc = start_mpi(2, [python(), "-m", "mpiml_slowsave", "configs/digits_mlp.yaml", *FAULT,
                         "--set", f"run.dir={run}", "--set", NO_FAULT],
                     env={"MPIML_SLOWSAVE_AT": "3", "MPIML_SLOWSAVE_MARK": str(mark)})
    deadline = time.monotonic() + 120
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mpiexec included, at once
    out, err = proc.communicate(timeout=30)
    assert mark.exists(), f"the third save never started\n{out}\n{err}"
    assert [p.name for p in sorted(run.glob("checkpoints/.step-30.tmp-*/*"))] == ["model.pt"]
    assert check_resumable(run / "checkpoints" / "step-20")["step"] == 20

    job = train(2, run, "--set", NO_FAULT, resume="auto")
    assert job.returncode == 0, job.output
    assert "left by a save that did not finish" in job.stderr, job.output
    assert re.search(r"resumed from \S+/step-20 at step 20", job.stdout), job.output
    assert_same_bits(final_params(run), final_params(reference))


def test_resume_from_a_path_into_a_new_run_dir(reference, stopped, tmp_path):
    run = tmp_path / "fork"
    job = train(2, run, "--set", NO_FAULT, resume=str(stopped[0] / "checkpoints" / "step-20"))
    assert job.returncode == 0, job.output
    assert re.search(r"resumed from \S+/step-20 at step 20", job.stdout), job.output
    assert_same_bits(final_params(run), final_params(reference))
    assert metrics(run) == [r for r in metrics(reference) if r["step"] > 20]


def test_finished_run_resumed_again_does_nothing(reference, tmp_path):
    run = copy_of(reference, tmp_path)
    job = train(2, run, "--set", NO_FAULT, resume="auto", timeout=60)
    assert job.returncode == 0, job.output
    assert "already finished at step 48" in job.stdout, job.output
    assert metrics(run) == metrics(reference)


# -- failures: NaN, dead and stalled ranks --------------------------------------------------------

def test_nonfinite_loss_aborts_every_rank_with_3(tmp_path):
    job = train(2, tmp_path / "run", "--set", "model.kwargs={fault: nan, rank: 1, at_call: 10}",
                timeout=60)
    assert job.returncode == 3, job.output
    assert "not finite (NaN or inf) on rank(s) [1] at step 10" in job.stderr, job.output
    assert job.stderr.count("mpiml:") == 1, job.output


def test_nonfinite_loss_skipped_the_same_way_on_every_rank(tmp_path):
    run = tmp_path / "run"
    job = train(2, run, "--set", "model.kwargs={fault: nan, rank: 1, at_call: 10}",
                "--set", "train.nonfinite=skip", "--set", "train.max_steps=20")
    assert job.returncode == 0, job.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert {"step": 10, "epoch": 0, "event": "skipped_step", "reason": "nonfinite loss",
            "ranks": [1]}.items() <= next(r for r in records if "event" in r).items()
    assert next(r for r in records if r.get("step") == 10 and "loss" in r)["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert all(torch.isfinite(t).all() for t in final_params(run).values())


def named_rank(job: Job) -> int | None:
    """The rank the job blamed: the watchdog names it; a launcher that killed the job names
    its PID, which the trainer's `ranks:` line maps to a rank."""
    found = re.search(r"rank\(s\) (\d+) did not arrive", job.stderr)
    if found:
        return int(found.group(1))
    pids = dict((int(pid), int(rank)) for rank, pid in re.findall(r"(\d+)=pid (\d+)@", job.stdout))
    for pid in re.findall(r"PID (\d+)", job.output):
        if int(pid) in pids:
            return pids[int(pid)]
    return None


@pytest.mark.parametrize("fault,says", [
    ("sigstop", "dead, or frozen"),  # no heartbeat: what a SIGKILLed rank looks like too
    ("stall", "alive"),  # heartbeats, but stuck outside MPI
    ("sigkill", None),  # MPICH's mpiexec ends the job itself and names the PID
])
def test_a_dead_or_stalled_rank_ends_the_job_and_is_named(tmp_path, fault, says):
    timeout_s, mark = 3, tmp_path / "struck"
    job = train(2, tmp_path / "run", "--set", f"comm.timeout_s={timeout_s}",
                "--set", f"model.kwargs={{fault: {fault}, rank: 1, at_call: 12}}",
                timeout=120, env={"MPIML_FAULT_MARK": str(mark)})
    ended = time.time()
    assert job.returncode != 0, job.output
    assert mark.exists(), job.output
    assert ended - float(mark.read_text()) < timeout_s + 30, job.output
    assert named_rank(job) == 1, job.output
    if says is not None:
        assert job.returncode == 4, job.output
        assert f"rank 1: {says}" in job.stderr, job.output


# -- the run directory and the launch -------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a few pages (needs root, as in CI); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        where = tmp_path / f"disk{kib}k"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_run_dir_is_reported_before_training(small_disk):
    run = small_disk(64) / "run"  # a checkpoint of this job takes about 64 KiB
    job = train(2, run, "--set", NO_FAULT, timeout=60)
    assert job.returncode == 2, job.output
    assert "MiB free, but a checkpoint needs about" in job.stderr, job.output
    assert "loss" not in job.stdout, job.output


def test_disk_full_at_a_save_is_an_error_on_every_rank(small_disk):
    run = small_disk(160) / "run"  # room for a checkpoint or two, not for all of them
    job = train(2, run, "--set", NO_FAULT, "--set", "checkpoint.every_steps=4")
    assert job.returncode == 2, job.output
    failed = re.search(r"could not write checkpoint \S+/step-(\d+): No space left on device",
                       job.stderr)
    assert failed, job.output
    assert job.stderr.count("mpiml:") == 1, job.output  # one verdict, shared by every rank
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    assert saved and saved == list(range(4, int(failed.group(1)), 4)), saved  # no leftovers
    for step in saved:  # the earlier checkpoints are intact
        assert check_resumable(run / "checkpoints" / f"step-{step}")["step"] == step


def test_unwritable_run_dir_is_reported_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    job = train(2, tmp_path / "file" / "run", "--set", NO_FAULT, timeout=60)
    assert job.returncode == 2, job.output
    assert "cannot be written" in job.stderr and "--set run.dir=PATH" in job.stderr, job.output


def test_plain_srun_launch_is_refused_before_any_work(tmp_path):
    """Without `--mpi=pmi2` srun starts N one-rank worlds; each must refuse, not train."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_"))}
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="0", PYTHONPATH=str(REPO))
    done = subprocess.run([python(), "-m", "mpiml.train", "configs/digits_mlp.yaml",
                           "--set", f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "srun --mpi=pmi2" in done.stderr and "world of 1 rank" in done.stderr
    assert not (tmp_path / "run").exists()


def test_stop_signal_after_the_run_ended_is_ignored(tmp_path):
    """A SIGUSR1 that reaches a rank after its run finished (Slurm's warning arriving as the job
    ends) must not kill it: Python restores the fatal default action while it tears down, and
    a finished job then showed as killed by signal 10 (exit 138). After `main()` the stop
    signals are ignored, so the rank lives on and exits 0."""
    code = ("import os, signal, sys; from mpiml.train import main; rc = main(sys.argv[1:]); "
            "ignored = signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN "
            "and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN; "
            "os.kill(os.getpid(), signal.SIGUSR1); "
            "print(f'alive after SIGUSR1: exit {rc}, ignored {ignored}', flush=True); "
            "sys.exit(rc)")
    argv = [python(), "-c", code, "configs/digits_mlp.yaml", *FAULT, "--set", NO_FAULT,
            "--set", f"run.dir={tmp_path / 'run'}"]
    job = run_mpi(2, argv, timeout=120)
    assert job.returncode == 0, job.output
    assert job.stdout.count("alive after SIGUSR1: exit 0, ignored True") == 2, job.output
