"""Resume without MPI: choosing a checkpoint, keeping the global batch and the data position,
RNG state, the watchdog's diagnosis, signals, room checks and metrics truncation."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from mpiml.checkpoint import check_room, list_checkpoints, recover_interrupted, save_checkpoint
from mpiml.comm.watchdog import PeerView, diagnose
from mpiml.config import config_from_dict
from mpiml.data import ShardedLoader, Split
from mpiml.errors import CheckpointError, ConfigError
from mpiml.resume import (
    ResumePoint,
    check_resumable,
    find_resume_point,
    fit_config_to_checkpoint,
    load_resume_state,
    rng_state,
    set_rng_state,
)
from mpiml.runlog import RunLog
from mpiml.signals import StopRequest

CFG = config_from_dict({"data": {"batch_size": 8}, "train": {"accumulate_steps": 1}})


def resumable(run_dir, step: int, world_size: int = 2, batch: int = 8) -> None:
    """A checkpoint shaped like Trainer.save_checkpoint's (tiny tensors)."""
    cfg = dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, batch_size=batch))
    tensors = {"model": {"w": torch.full((2,), float(step))}, "optimizer": {"state": {}},
               "scheduler": {"last_epoch": step}, "ranks": [{"rng": rng_state()}] * world_size}
    meta = {"epoch": 0, "epoch_step": step, "steps_per_epoch": 100, "complete": False,
            "world_size": world_size, "global_batch": batch * world_size,
            "config": cfg.to_dict(), "metrics_records": 0}
    save_checkpoint(run_dir, step, tensors, meta)


def corrupt(path, how: str) -> None:
    file = path / "model.pt"
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip one bit in the middle
        data[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(data))


# -- choosing the checkpoint ----------------------------------------------------------------------

def test_auto_takes_the_newest_and_none_takes_nothing(tmp_path):
    assert find_resume_point("auto", tmp_path) is None  # no checkpoints: start fresh
    for step in (10, 20):
        resumable(tmp_path, step)
    point = find_resume_point("auto", tmp_path)
    assert point is not None and point.step == 20 and point.path.endswith("step-20")
    assert find_resume_point("none", tmp_path) is None
    state = load_resume_state(point)
    assert state["model"]["w"][0] == 20 and len(state["ranks"]) == 2


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, how):
    for step in (10, 20):
        resumable(tmp_path, step)
    corrupt(tmp_path / "checkpoints" / "step-20", how)
    said: list[str] = []
    point = find_resume_point("auto", tmp_path, said.append)
    assert point is not None and point.step == 10
    assert len(said) == 1 and "step-20/model.pt is corrupt" in said[0], said
    assert "falling back" in said[0]
    with pytest.raises(CheckpointError, match="step-20/model.pt is corrupt"):
        find_resume_point(str(tmp_path / "checkpoints" / "step-20"), tmp_path)


def test_all_checkpoints_bad_is_an_error_not_a_fresh_start(tmp_path):
    resumable(tmp_path, 10)
    corrupt(tmp_path / "checkpoints" / "step-10", "flip")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*--resume none"):
        find_resume_point("auto", tmp_path, lambda line: None)


def test_explicit_path_must_exist_and_hold_a_resume(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        find_resume_point(str(tmp_path / "nope"), tmp_path)
    old = save_checkpoint(tmp_path, 5, {"model": {"w": torch.zeros(1)}}, {"epoch": 0})
    with pytest.raises(CheckpointError, match="cannot be resumed from: it lacks optimizer.pt"):
        check_resumable(old)


def test_interrupted_saves_are_tidied(tmp_path):
    resumable(tmp_path, 10)
    resumable(tmp_path, 20)
    root = tmp_path / "checkpoints"
    (root / ".step-30.tmp-123").mkdir()  # killed while writing
    os.replace(root / "step-20", root / ".step-20.old-77")  # killed between the two renames
    said = recover_interrupted(tmp_path)
    assert len(said) == 2 and [p.name for p in list_checkpoints(tmp_path)] == ["step-10",
                                                                                "step-20"]
    assert not any(p.name.startswith(".") for p in root.iterdir())


# -- another number of ranks ----------------------------------------------------------------------

def point_for(tmp_path, world_size: int, batch: int) -> ResumePoint:
    resumable(tmp_path, 7, world_size=world_size, batch=batch)
    return ResumePoint(str(tmp_path / "checkpoints" / "step-7"),
                       check_resumable(tmp_path / "checkpoints" / "step-7"))


def test_same_ranks_keep_the_config(tmp_path):
    cfg, notes = fit_config_to_checkpoint(CFG, point_for(tmp_path, 2, 8), 2)
    assert cfg == CFG and notes == []


def test_other_ranks_keep_the_global_batch(tmp_path):
    point = point_for(tmp_path, 2, 8)
    cfg, notes = fit_config_to_checkpoint(CFG, point, 4)
    assert cfg.data.batch_size == 4 and "data.batch_size 8 -> 4" in notes[0]
    cfg, _ = fit_config_to_checkpoint(CFG, point, 1)
    assert cfg.data.batch_size == 16


def test_a_global_batch_that_cannot_be_kept_says_what_to_change(tmp_path):
    point = point_for(tmp_path, 2, 8)
    with pytest.raises(ConfigError, match=r"global batch of 16.*\[1, 2, 4, 8, 16\]"):
        fit_config_to_checkpoint(CFG, point, 3)
    bigger = dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, batch_size=32))
    with pytest.raises(ConfigError, match="make 64"):
        fit_config_to_checkpoint(bigger, point, 2)


@pytest.mark.parametrize("before,after", [(2, 4), (4, 1), (2, 1), (1, 2)])
def test_data_position_maps_across_rank_counts(before, after):
    """K steps on `before` ranks, then the rest of the epoch on `after` ranks with the same
    global batch: every sample of the epoch exactly once, in the same global batches."""
    split = Split(np.zeros((203, 1), np.float32), np.arange(203))
    global_batch, epoch, k = 16, 3, 5
    seen: list[np.ndarray] = []
    for ranks, steps in ((before, range(k)), (after, None)):
        loaders = [ShardedLoader(split, global_batch // ranks, r, ranks, seed=11)
                   for r in range(ranks)]
        steps = steps if steps is not None else range(k, loaders[0].steps_per_epoch)
        for t in steps:
            idx = np.concatenate([ld.indices(epoch)[t * ld.batch_size:(t + 1) * ld.batch_size]
                                  for ld in loaders])
            seen.append(np.sort(idx))
    one = ShardedLoader(split, global_batch, 0, 1, seed=11)  # one rank, the global batch
    expected = [np.sort(one.indices(epoch)[t * global_batch:(t + 1) * global_batch])
                for t in range(one.steps_per_epoch)]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_loader_resumes_within_an_epoch():
    split = Split(np.arange(64, dtype=np.float32)[:, None], np.arange(64))
    loader = ShardedLoader(split, 4, 1, 2, seed=0)
    full = [y for _, y in loader.epoch(2)]
    resumed = [y for _, y in loader.epoch(2, start_step=3)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed, strict=True))


# -- RNG state ------------------------------------------------------------------------------------

def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(3), np.random.rand(3), random.random(), np.random.randn()
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)],
            np.random.randn())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)],
           np.random.randn())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2] and got[3] == want[3]


# -- watchdog diagnosis ---------------------------------------------------------------------------

def test_watchdog_names_silent_and_late_ranks():
    peers = {1: PeerView(9, False, 0.2), 2: PeerView(12, True, 0.1), 3: PeerView(12, True, 9.0),
             4: PeerView(0, False, None)}
    missing, report = diagnose(0, 12, "gradient allreduce", 6.1, 5.0, peers, 2.0)
    assert missing == [1, 3, 4]
    assert "rank(s) 1, 3, 4 did not arrive" in report
    assert "rank 1: alive" in report and "has not arrived" in report
    assert "rank 3: dead, or frozen: last heartbeat 9.0 s ago" in report
    assert "rank 4: dead, or frozen: never sent a heartbeat" in report
    assert "exit 4" in report and "comm.timeout_s" in report


def test_watchdog_with_everyone_present_blames_the_collective():
    missing, report = diagnose(1, 3, "bcast", 6.0, 5.0, {0: PeerView(3, True, 0.1)}, 2.0)
    assert missing == [] and "every rank reached it" in report


# -- signals, run dir, metrics --------------------------------------------------------------------

def test_stop_request_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_room_check_names_the_folder(tmp_path):
    check_room(tmp_path / "run", 1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoints in .*file/checkpoints"):
        check_room(blocker, 1)
    with pytest.raises(CheckpointError, match="MiB free, but a checkpoint needs about"):
        check_room(tmp_path / "run", 2**62)


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    with RunLog(tmp_path, enabled=True) as log:
        log.open("a: 1\n")
        for step in range(5):
            log.record(step=step)
    with RunLog(tmp_path, enabled=True) as log:
        log.open("a: 1\n")
        assert log.records == 5
        assert log.truncate(3) == 2 and log.truncate(7) == 0
        log.record(step=3)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
