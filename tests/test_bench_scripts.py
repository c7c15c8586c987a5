"""The benchmark scripts under real mpiexec, in miniature: they run, and their JSON holds what
their docstrings promise, computed from their own medians (not timed: the figures themselves
are for the README, from full runs)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time

import numpy as np
import pytest

from mpirun import REPO, kill_group, python, run_mpi


def bench(n: int, script: str, out, *args: str) -> dict:
    job = run_mpi(n, [python(), str(REPO / "scripts" / script), *args, "--out", str(out)],
                  timeout=180)
    assert job.returncode == 0, job.output
    return json.loads(out.read_text())


@pytest.mark.parametrize("n", [2, 3])
def test_bench_allreduce_compares_every_size_with_mpi(tmp_path, n):
    doc = bench(n, "bench_allreduce.py", tmp_path / "ar.json",
                "--sizes", "4KiB,1MiB", "--repeats", "3", "--no-gloo")
    assert doc["world_size"] == n
    assert [r["bytes"] for r in doc["results"]] == [4096, 1 << 20]
    for r in doc["results"]:
        us = r["median_us"]
        assert us["mpiml"] > 0 and us["mpi"] > 0 and us["mpi_out"] > 0
        best_mpi = min(us["mpi"], us["mpi_out"])  # in place or into a second buffer
        assert r["ratio_vs_mpi"] == pytest.approx(us["mpiml"] / best_mpi, rel=0.02, abs=0.002)
        algbw = r["bytes"] / (us["mpiml"] * 1e-6) / 1e9
        assert r["algbw_GBps"]["mpiml"] == pytest.approx(algbw, rel=0.02, abs=0.002)
        assert r["busbw_GBps"]["mpiml"] == pytest.approx(algbw * 2 * (n - 1) / n,
                                                         rel=0.02, abs=0.002)


def test_bench_train_reports_every_contender_and_the_ratios(tmp_path):
    doc = bench(2, "bench_train.py", tmp_path / "train.json",
                "--models", "mlp", "--repeats", "3", "--steps", "2", "--batch", "8")
    (result,) = doc["results"]
    step = result["step_ms"]
    assert set(step) == {"mpiml", "mpiml_overlap", "mpiml_sync", "mpiml_unsharded", "ddp",
                         "local", "single"}
    assert all(v > 0 for v in step.values())
    assert result["ratio_mpiml_over_ddp"] == pytest.approx(step["ddp"] / step["mpiml"],
                                                           rel=0.02)
    assert result["scaling_efficiency"]["mpiml"] == pytest.approx(
        step["single"] / step["mpiml"], rel=0.02)
    assert result["sharded"] is True
    assert result["mpiml_overlap_choice"].startswith("comm.overlap auto: ")
    for form in ("exposed_comm_ms_per_step", "exposed_comm_ms_pooled_mean",
                 "exposed_comm_ms_median_step", "exposed_comm_ms_last_rank"):
        values = result[form]
        assert all(math.isfinite(v) and v >= 0 for v in values.values()), form
        # the last rank to finish backward waits least: never more than the pooled mean
        if form == "exposed_comm_ms_last_rank":
            pooled = result["exposed_comm_ms_pooled_mean"]
            assert all(values[k] <= pooled[k] + 0.01 for k in values)
    # overlap_hides from the same statistic (both inputs rounded to 0.01 ms in the JSON)
    on, off = (result["exposed_comm_ms_per_step"][k] for k in ("mpiml_overlap",
                                                                "mpiml_no_overlap"))
    slack = (on + 0.005) / max(off - 0.005, 1e-9) - on / off + 0.001
    assert abs(result["overlap_hides"] - (1 - on / off)) <= slack


def test_exposed_time_per_step_keeps_a_stalled_step_to_its_round():
    from bench_train import median_of_round_means

    rng = np.random.default_rng(0)
    steps, rounds = 5, 7
    per_rank = rng.uniform(1e-3, 3e-3, (2, rounds * steps))
    per_rank[1, 2] = 0.5  # rank 1 waited 500 ms in round 0 for a stalled peer
    by_round = per_rank.reshape(2, rounds, steps).transpose(1, 0, 2).reshape(rounds, -1)
    expected = np.median(by_round.mean(axis=1))
    got = median_of_round_means(per_rank.tolist(), steps)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got < 3e-3 < per_rank.mean()  # the pooled mean would carry the stall


def script(name: str, *args: str, timeout: float = 180) -> tuple[int, str, str]:
    """A script that launches its own processes (or none): (exit code, stdout, stderr)."""
    proc = subprocess.Popen([python(), str(REPO / "scripts" / name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = kill_group(proc)
        pytest.fail(f"{name} did not finish within {timeout} s\n{out}\n{err}")
    return proc.returncode, out, err


def test_bench_memory_reports_growth_in_gradient_sizes_from_its_peaks():
    code, out, err = script("bench_memory.py", "--model", "mlp", "--steps", "2")
    assert code == 0, err
    doc = json.loads(out)
    from bench_train import build

    factory, _ = build("mlp")
    grad_mb = sum(p.numel() for p in factory().parameters()) * 4 / 2**20
    assert doc["grad_mb"] == pytest.approx(grad_mb, abs=0.05)
    peaks = doc["peak_rss_mb"]
    assert len(peaks["plain"]) == 1 and all(len(peaks[k]) == 2 for k in
                                            ("mpiml", "mpiml_unsharded", "ddp"))
    for kind, growth in doc["growth_over_plain_in_gradient_sizes"].items():
        expected = (max(peaks[kind]) - peaks["plain"][0]) / doc["grad_mb"]
        assert growth == pytest.approx(expected, abs=0.02 + 0.1 / doc["grad_mb"]), kind


def test_probe_coherence_times_every_history_and_wants_two_ranks(tmp_path):
    from probe_coherence import HISTORIES

    doc = bench(2, "probe_coherence.py", tmp_path / "pc.json", "--mb", "0.2", "--repeats", "6")
    assert set(doc["median_ms"]) == {*HISTORIES, "private"}
    assert all(math.isfinite(v) and v > 0 for v in doc["median_ms"].values())
    job = run_mpi(3, [python(), str(REPO / "scripts" / "probe_coherence.py")], timeout=60)
    assert job.returncode == 2
    assert "two ranks on one node" in job.output


def test_bench_runs_gathers_every_run_of_bench_train(tmp_path):
    tiny = ("--models", "mlp,cnn", "--repeats", "2", "--steps", "1", "--batch", "4")
    code, out, err = script("bench_runs.py", "--runs", "2", "--pause", "0", "--out",
                            str(tmp_path / "runs.json"), "--", *tiny, timeout=300)
    assert code == 0, err
    doc = json.loads(out)
    assert doc == json.loads((tmp_path / "runs.json").read_text())
    assert doc["runs"] == 2 and doc["bench_train_args"] == list(tiny)
    assert set(doc["results"]) == {"mlp", "cnn"}
    for figures in doc["results"].values():
        assert set(figures) == {"scaling_efficiency", "no_sync_efficiency",
                                "ratio_mpiml_over_ddp", "mpiml_vs_no_sync", "overlap_hides"}
        for name, f in figures.items():
            assert len(f["runs"]) == 2 and all(math.isfinite(v) for v in f["runs"])
            if name != "overlap_hides":  # a share of time, negative where overlap lost
                assert all(v > 0 for v in f["runs"]), name
            assert f["median"] == pytest.approx(float(np.median(f["runs"])), abs=1e-3)
            assert (f["min"], f["max"]) == (min(f["runs"]), max(f["runs"]))
            assert f["runs_at_or_above_bar"] == sum(v >= f["bar"] for v in f["runs"])


def test_bench_runs_stops_at_a_failed_run_and_shows_why():
    code, _, err = script("bench_runs.py", "--runs", "3", "--", "--models", "nope",
                          timeout=120)
    assert code != 0
    assert "exited with" in err and "unknown model 'nope'" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_bench_runs_interrupted_takes_its_run_with_it(sig):
    """Each run is in a session of its own (so a timeout can kill its whole group); Ctrl-C or
    a SIGTERM to bench_runs.py must then end the run too, not leave ranks training alone."""
    marker = "3.14159"  # a bucket size nobody else uses: finds this run's processes
    proc = subprocess.Popen([python(), str(REPO / "scripts" / "bench_runs.py"), "--runs", "1",
                             "--", "--models", "mlp", "--repeats", "100000",
                             "--bucket-mb", marker], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # a test run in the background inherits SIGINT ignored, and
                            # Python then leaves it so: give the script a terminal's Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def training() -> bool:
        found = subprocess.run(["pgrep", "-f", f"bench_train.py.*{marker}"],
                               capture_output=True, text=True)
        return bool(found.stdout.strip())

    try:
        deadline = time.monotonic() + 60
        while not training():
            assert time.monotonic() < deadline, "bench_train.py never started"
            time.sleep(0.2)
        time.sleep(2)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) != 0
        deadline = time.monotonic() + 15
        while training():
            assert time.monotonic() < deadline, "the interrupted run went on training"
            time.sleep(0.2)
    finally:
        kill_group(proc)
        subprocess.run(["pkill", "-9", "-f", f"bench_train.py.*{marker}"])
