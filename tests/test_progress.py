"""The progress chooser and its three modes, and the TensorBoard sink (no MPI needed)."""

from __future__ import annotations

import io
import sys

import pytest

from mpiml import progress
from mpiml.errors import ConfigError
from mpiml.progress import Progress, choose_mode, format_duration
from mpiml.runlog import RunLog
from mpiml.tblog import TensorBoardLog, scalar_tags


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("launcher,tty,want", [
    (None, True, "bar"),  # no launcher above: the stream itself decides
    (None, False, "lines"),
    ("/dev/pts/3", False, "bar"),  # mpiexec on a terminal; our own stdout is its pipe
    ("/var/log/slurm-1234.out", True, "lines"),  # launcher into a file, even via a pty
    ("pipe:[4242]", False, "lines"),  # mpiexec ... | tee log
    ("", True, "lines"),  # started by slurmstepd: a batch job
])
def test_auto_mode_follows_where_the_launchers_output_goes(monkeypatch, launcher, tty, want):
    monkeypatch.setattr(progress, "launcher_stdout", lambda: launcher)
    assert choose_mode("auto", FakeStream(tty)) == want


@pytest.mark.parametrize("setting", ["bar", "lines", "off"])
def test_explicit_modes_are_kept(monkeypatch, setting):
    monkeypatch.setattr(progress, "launcher_stdout", lambda: "/dev/pts/3")
    assert choose_mode(setting, FakeStream(False)) == setting


def test_launcher_is_found_from_proc(monkeypatch):
    """Walks parents in /proc: python <- hydra_pmi_proxy <- mpiexec (stdout on a pty)."""
    tree = {100: ("hydra_pmi_proxy", 50), 50: ("mpiexec", 10), 10: ("bash", 1)}
    monkeypatch.setattr(progress.os, "getppid", lambda: 100)
    monkeypatch.setattr(progress, "_stat", lambda pid: tree[pid])
    monkeypatch.setattr(progress.os, "readlink",
                        lambda path: "/dev/pts/7" if path == "/proc/50/fd/1" else "pipe:[1]")
    assert progress.launcher_stdout() == "/dev/pts/7"
    tree[100] = ("slurmstepd", 1)
    assert progress.launcher_stdout() == ""
    tree[100] = ("bash", 1)
    assert progress.launcher_stdout() is None


def test_lines_mode_prints_epoch_step_loss_rate_and_eta():
    out = FakeStream(False)
    bar = Progress("lines", total_steps=100, stream=out)
    bar.advance(10, 0)
    bar.report(epoch=0, step=10, loss=1.23456, samples_per_s=12345.6)
    line = out.getvalue()
    assert line.startswith("epoch   0  step     10/100  loss 1.2346  12,346 samples/s  ETA 0:")
    assert "\r" not in line and line.endswith("\n")


def test_lines_are_throttled_but_each_epoch_and_the_end_show(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    out = FakeStream(False)
    bar = Progress("lines", total_steps=8, stream=out, lines_every_s=10)
    for step, epoch, t in [(1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 0, 12.5), (5, 1, 13), (6, 1, 14),
                           (7, 1, 15), (8, 1, 16)]:
        now[0] = t
        bar.report(epoch=epoch, step=step, loss=1.0, samples_per_s=1.0)
    steps = [line.split()[3] for line in out.getvalue().splitlines()]
    # step 1: the first; 4: 11.5 s after it; 5: a new epoch; 8: the last step
    assert steps == ["1/8", "4/8", "5/8", "8/8"]


def test_bar_mode_draws_a_bar_with_loss_and_rate():
    out = FakeStream(True)
    bar = Progress("bar", total_steps=50, stream=out)
    for step in range(1, 51):
        bar.advance(step, (step - 1) // 25)
    bar.report(epoch=1, step=50, loss=0.5, samples_per_s=2000.0)
    bar.write("epoch   1  eval loss 0.5000")
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "100%" in text and "50/50" in text
    assert "epoch 1" in text and "loss 0.5000, 2,000 samples/s" in text
    assert "eval loss 0.5000\n" in text


def test_off_mode_and_other_ranks_stay_quiet():
    out = FakeStream(True)
    quiet = Progress("off", total_steps=10, stream=out)
    quiet.advance(5, 0)
    quiet.report(0, 5, 1.0, 1.0)
    assert out.getvalue() == ""
    quiet.write("a message")  # messages still print in off mode
    assert out.getvalue() == "a message\n"
    other = Progress("bar", total_steps=10, stream=out, enabled=False)
    other.advance(5, 0)
    other.report(0, 5, 1.0, 1.0)
    other.write("rank 1 says nothing")
    assert out.getvalue() == "a message\n"


def test_format_duration():
    assert format_duration(3725.4) == "1:02:05" and format_duration(-1) == "0:00:00"


def test_scalar_tags_group_records():
    record = {"step": 5, "epoch": 0, "loss": 1.5, "samples_per_s": 10.0, "lr": 0.1,
              "step_ms": 3.0, "breakdown_ms": {"data": 1.0, "optimizer": 2.0},
              "slowest_rank": 1, "eval_accuracy": 0.9, "time": 1.0}
    assert scalar_tags(record) == {
        "train/loss": 1.5, "train/samples_per_s": 10.0, "train/lr": 0.1, "time/step_ms": 3.0,
        "time/breakdown_ms/data": 1.0, "time/breakdown_ms/optimizer": 2.0,
        "train/slowest_rank": 1.0, "eval/accuracy": 0.9}


def test_missing_tensorboard_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ConfigError) as err:
        TensorBoardLog(tmp_path / "tb")
    message = str(err.value)
    assert "log.tensorboard = True needs the tensorboard package" in message
    assert "pip install 'mpiml[tensorboard]'" in message
    with RunLog(tmp_path / "run", enabled=True) as log, pytest.raises(ConfigError):
        log.open("a: 1\n", tensorboard=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with RunLog(tmp_path, enabled=True) as log:
        log.open("a: 1\n", tensorboard=True)
        log.record(step=1, epoch=0, loss=2.0)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
