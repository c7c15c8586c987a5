"""Checkpoints: `run.dir/checkpoints/step-<N>/`, written so a half-written one is never used.

Rank 0 writes into a hidden temporary folder, flushes every file to disk, records each file's
SHA-256 in `meta.json`, writes the `COMMITTED` marker last and only then renames the folder to
its final name. A crash at any point leaves either the complete checkpoint or no `step-<N>`
at all; readers also insist on the marker, and on the checksums when asked to verify.
"""

from __future__ import annotations

import contextlib
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
                    meta: dict[str, Any], texts: dict[str, str] | None = None) -> Path:
    """Write `tensors` (file stem -> object for torch.save), `texts` (file name -> content)
    and `meta`; return the folder. Every file is checksummed and in place before the marker."""
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
        for name, text in (texts or {}).items():
            with open(tmp / name, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            files[name] = _sha256(tmp / name)
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


def check_room(run_dir: str | Path, need_bytes: int) -> None:
    """Before training: can checkpoints be written in `run_dir`, and is there room for one?

    Finding out at the first save wastes the work until then; finding out at a later save
    is still handled (an error on every rank, earlier checkpoints untouched).
    """
    root = Path(run_dir) / "checkpoints"
    probe = root / f".probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"mpiml")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        free = shutil.disk_usage(root).free
    except OSError as err:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write checkpoints in {root}: {err.strerror or err}. HINT: choose a "
            "writable folder with --set run.dir=PATH") from err
    if free < need_bytes:
        raise CheckpointError(
            f"{root} has {free / 2**20:.2f} MiB free, but a checkpoint needs about "
            f"{need_bytes / 2**20:.2f} MiB. HINT: free some space, or choose another "
            "run.dir")


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


def recover_interrupted(run_dir: str | Path) -> list[str]:
    """Tidy what a save killed half-way left behind; return one line per thing done.

    A temporary folder is never a checkpoint: it is removed. A replaced checkpoint parked as
    `.step-N.old-*` while its successor was renamed in is put back if the successor is
    missing (the job died between the two renames), else removed.
    """
    root = Path(run_dir) / "checkpoints"
    done: list[str] = []
    if not root.is_dir():
        return done
    for entry in sorted(root.iterdir()):
        match = re.match(r"^\.(step-\d+)\.(tmp|old)-\d+$", entry.name)
        if not match or not entry.is_dir():
            continue
        final = root / match.group(1)
        if match.group(2) == "old" and not final.exists() and (entry / MARKER).is_file():
            os.replace(entry, final)
            done.append(f"restored {final} from {entry.name} (a replacement was interrupted)")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry} (left by a save that did not finish)")
    return done


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
