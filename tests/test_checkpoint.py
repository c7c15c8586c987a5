"""Checkpoints are atomic, checksummed and loadable with weights_only=True."""

from __future__ import annotations

import os

import pytest
import torch

from mpiml.checkpoint import (
    MARKER,
    list_checkpoints,
    load_tensors,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from mpiml.errors import CheckpointError


def state(v: float) -> dict:
    return {"model": {"w": torch.full((3, 2), v)}}


def test_save_list_load_and_prune(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, state(step), {"epoch": 0})
    paths = list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["step-5", "step-10", "step-15"]
    assert verify_checkpoint(paths[-1])["step"] == 15
    assert torch.equal(load_tensors(paths[1], "model")["w"], torch.full((3, 2), 10.0))
    assert torch.load(paths[0] / "model.pt", weights_only=True)["w"][0, 0] == 5
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-10", "step-15"]


def test_uncommitted_folder_is_never_listed(tmp_path):
    save_checkpoint(tmp_path, 1, state(1), {})
    half = tmp_path / "checkpoints" / "step-2"
    half.mkdir()
    (half / "model.pt").write_bytes(b"half written")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    with pytest.raises(CheckpointError, match="no COMMITTED marker"):
        verify_checkpoint(half)


def test_corruption_is_detected_by_checksum(tmp_path):
    path = save_checkpoint(tmp_path, 3, state(3), {})
    with open(path / "model.pt", "r+b") as f:
        f.seek(os.path.getsize(path / "model.pt") // 2)
        f.write(b"\x00garbage\x00")
    with pytest.raises(CheckpointError, match="model.pt is corrupt"):
        verify_checkpoint(path)


def test_resaving_a_step_replaces_it_whole(tmp_path):
    save_checkpoint(tmp_path, 4, state(1), {})
    path = save_checkpoint(tmp_path, 4, state(2), {})
    assert load_tensors(path, "model")["w"][0, 0] == 2
    assert (path / MARKER).exists() and len(list((tmp_path / "checkpoints").iterdir())) == 1


def test_unwritable_run_dir_is_a_checkpoint_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        save_checkpoint(blocker, 1, state(1), {})
