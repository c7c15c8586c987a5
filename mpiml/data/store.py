"""The on-disk dataset layout that `python -m mpiml.data convert` writes and `npy` datasets read.

A folder holding plain `.npy` files and a small JSON sidecar that says what they must be:

    DIR/mpiml-dataset.json   {"format": "mpiml-npy", "version": 1, "num_classes": 10,
                              "files": {"train_x": {"dtype": "<f4", "shape": [n, 64]}, ...}}
    DIR/train_x.npy          inputs, C order, any numeric dtype (batches become float32)
    DIR/train_y.npy          integer class labels 0..num_classes-1
    DIR/eval_x.npy, DIR/eval_y.npy   optional held-out split

On open, every file's own `.npy` header must agree with the sidecar (dtype and shape), so a
file swapped or truncated after conversion is caught before the first step, with a hint. The
sidecar is written last: a folder without one is an interrupted conversion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpiml.data.npyfile import NpyRows
from mpiml.errors import DataError

FORMAT = "mpiml-npy"
VERSION = 1
SIDECAR = "mpiml-dataset.json"
FILES = ("train_x", "train_y", "eval_x", "eval_y")
_RECONVERT = "HINT: re-create the folder with `python -m mpiml.data convert SOURCE {dir}`"


@dataclass
class StoredDataset:
    """The opened files of a dataset folder (eval ones None when it has no eval split)."""

    folder: Path
    train_x: NpyRows
    train_y: NpyRows
    eval_x: NpyRows | None
    eval_y: NpyRows | None
    num_classes: int
    meta: dict[str, Any]


def write_sidecar(folder: Path, files: dict[str, tuple[np.dtype, tuple[int, ...]]],
                  num_classes: int, extra: dict[str, Any]) -> None:
    """Write the sidecar describing `files` (name -> (dtype, shape)); call it last."""
    meta = {"format": FORMAT, "version": VERSION, "num_classes": int(num_classes),
            "files": {name: {"dtype": np.dtype(dt).str, "shape": [int(d) for d in shape]}
                      for name, (dt, shape) in files.items()},
            **extra}
    tmp = folder / (SIDECAR + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(folder / SIDECAR)


def read_sidecar(folder: Path, key: str = "data.path") -> dict[str, Any]:
    """The checked sidecar of `folder`, or a DataError naming what is wrong and how to fix it."""
    hint = _RECONVERT.format(dir=folder)
    if not folder.is_dir():
        raise DataError(f"{key}: no folder at {folder}. HINT: create one with "
                        f"`python -m mpiml.data convert data.csv {folder}` (CSV or .npz)")
    path = folder / SIDECAR
    if not path.is_file():
        raise DataError(f"{key}: {folder} is not an mpiml dataset folder: {SIDECAR} is missing "
                        f"(an interrupted conversion, or plain .npy files?). {hint}; for a bare "
                        ".npy pair use data.x_path and data.y_path instead")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise DataError(f"{key}: {path} is not valid JSON ({err}). {hint}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{key}: {path} has format {got!r}, expected {FORMAT!r}. {hint}")
    version = meta.get("version")
    if version != VERSION:
        if isinstance(version, int) and version > VERSION:
            raise DataError(f"{key}: {path} was written by a newer mpiml (format version "
                            f"{version}); this one reads version {VERSION}. HINT: upgrade mpiml, "
                            f"or re-create the folder with this one's `python -m mpiml.data "
                            f"convert SOURCE {folder}`")
        raise DataError(f"{key}: {path} has format version {version!r}; this mpiml reads "
                        f"version {VERSION}. {hint}")
    files = meta.get("files")
    if not isinstance(files, dict) or not {"train_x", "train_y"} <= set(files):
        raise DataError(f"{key}: {path} lists no train_x and train_y files. {hint}")
    if ("eval_x" in files) != ("eval_y" in files):
        raise DataError(f"{key}: {path} lists only one of eval_x and eval_y. {hint}")
    classes = meta.get("num_classes")
    if not isinstance(classes, int) or classes < 1:
        raise DataError(f"{key}: {path} has num_classes = {classes!r}; expected an integer "
                        f">= 1. {hint}")
    return meta


def _open_checked(folder: Path, name: str, want: dict[str, Any], key: str) -> NpyRows:
    path = folder / f"{name}.npy"
    if not path.is_file():
        raise DataError(f"{key}: {path} is missing but {SIDECAR} lists it. "
                        f"{_RECONVERT.format(dir=folder)}")
    try:
        rows = NpyRows(path)
    except DataError as err:
        raise DataError(f"{key}: {err}") from None
    shape, dtype = tuple(rows.file_shape), rows.dtype
    want_shape, want_dtype = tuple(want.get("shape", ())), np.dtype(want.get("dtype", "V"))
    if shape != want_shape or dtype != want_dtype:
        rows.close()
        raise DataError(
            f"{key}: {path} has shape {shape} and dtype {dtype.str} but {SIDECAR} says shape "
            f"{want_shape} and dtype {want_dtype.str}: the file changed after conversion. "
            f"{_RECONVERT.format(dir=folder)}")
    return rows


def open_store(folder: str | Path, key: str = "data.path") -> StoredDataset:
    """Open a dataset folder, checking each file's header against the sidecar."""
    folder = Path(folder)
    meta = read_sidecar(folder, key)
    files = meta["files"]
    opened = {name: _open_checked(folder, name, files[name], key)
              for name in FILES if name in files}
    return StoredDataset(folder, opened["train_x"], opened["train_y"], opened.get("eval_x"),
                         opened.get("eval_y"), int(meta["num_classes"]), meta)
