"""Checkpoints: `run.dir/checkpoints/step-<N>/`, written so a half-written one is never used.

Rank 0 writes into a hidden temporary folder, flushes every file to disk, records each file's
SHA-256 in `meta.json`, writes the `COMMITTED` marker last and only then renames the folder to
its final name. A crash at any point leaves either the complete checkpoint or no `step-<N>`
at all; readers also insist on the marker, and on the checksums when asked to verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mpiml.errors import CheckpointError

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write `tensors` (file stem -> object for torch.save) and `meta`; return the folder."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        for stem, obj in tensors.items():
            path = tmp / f"{stem}.pt"
            with open(path, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            files[path.name] = _sha256(path)
        with open(tmp / "meta.json", "w") as f:
            json.dump({**meta, "step": step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / MARKER, "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a rerun into the same run.dir: replace, never half-replace
            stale = root / f".step-{step}.old-{os.getpid()}"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {err.strerror or err}. Earlier checkpoints "
            "are untouched. HINT: check that run.dir is writable and the disk is not full"
        ) from err
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A committed `step-<N>` folder, or the newest one of a run directory."""
    path = Path(path)
    if (path / "model.pt").is_file() or (path / "meta.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"{path} is neither a checkpoint folder (with model.pt) nor a run "
                          "directory with committed checkpoints. HINT: pass "
                          "RUN_DIR/checkpoints/step-<N> or RUN_DIR")


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` committed checkpoints."""
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Return the checkpoint's meta after checking its marker and every file's checksum."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a committed checkpoint (no {MARKER} marker): it "
                              "was never completely written")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/meta.json is unreadable: {err}") from err
    for name, digest in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint file {file} is corrupt: its checksum does not "
                                  "match the one recorded when it was saved")
    return meta


def load_tensors(path: str | Path, stem: str) -> Any:
    """`torch.load(..., weights_only=True)` of one file: a checkpoint never runs code."""
    file = Path(path) / f"{stem}.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load {file}: {type(err).__name__}: {err}") from err
