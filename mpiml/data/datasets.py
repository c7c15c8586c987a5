"""The datasets mpiml can train on: `digits`, `synthetic`, `npy`, `text` and `custom`.

Each is opened (and checked) on every rank before the first step, so bad data is an error that
names the file and what is wrong, never a crash mid-run. `npy` files are read a batch of rows
at a time (see `npyfile.py`): a rank reads only its own rows, whatever the file's size.
Batches of inputs become float32 (int64 token ids for text), labels int64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpiml.config import DataConfig
from mpiml.data.npyfile import NpyRows
from mpiml.data.samples import Dataset, Split, check_labels, holdout, scan_labels
from mpiml.data.store import open_store
from mpiml.errors import DataError


def load_digits_dataset(cfg: DataConfig) -> Dataset:
    """scikit-learn's 1,797 handwritten 8x8 digits: real data that ships inside the package."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (n, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    train, held = holdout(x, y, cfg.eval_fraction, cfg.split_seed, "digits")
    return Dataset(train, held, (1, 8, 8), 10)


def make_synthetic_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Gaussian clusters, one per class; `noise` sets how much they overlap."""
    rng = np.random.default_rng([seed, 0x5E7])
    centers = rng.standard_normal((cfg.classes, cfg.features)).astype(np.float32) * 2.0
    y = rng.integers(0, cfg.classes, size=cfg.samples).astype(np.int64)
    noise = rng.standard_normal((cfg.samples, cfg.features)).astype(np.float32) * cfg.noise
    x = centers[y] + noise
    train, held = holdout(x, y, cfg.eval_fraction, cfg.split_seed, "synthetic")
    return Dataset(train, held, (cfg.features,), cfg.classes)


def _open_rows(path_str: str, key: str) -> NpyRows:
    path = Path(path_str)
    if not path.is_file():
        raise DataError(f"data.{key}: no file at {path} (HINT: give the path to a .npy file "
                        "written with numpy.save, or convert CSV/.npz with "
                        "`python -m mpiml.data convert`)")
    try:
        return NpyRows(path)
    except DataError as err:
        raise DataError(f"data.{key}: {err}") from None


def _check_pair(x: NpyRows, y: NpyRows, x_name: str, y_name: str) -> None:
    """Shapes and dtypes of one split's inputs and labels; the names say where they came from."""
    if x.ndim < 2:
        raise DataError(f"{x_name} has shape {x.shape}; expected (samples, features...) with at "
                        "least 2 dimensions (HINT: x.reshape(len(x), -1) for one feature)")
    if y.ndim != 1:
        raise DataError(f"{y_name} has shape {y.shape}; expected (samples,): one class "
                        "index per row")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x_name} has {x.shape[0]} samples but {y_name} has "
                        f"{y.shape[0]}; they must match row for row")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{y_name} has dtype {y.dtype}; labels must be integers (HINT: "
                        "y.astype(np.int64) before saving)")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{x_name} has dtype {x.dtype}; inputs must be numeric")


def open_npy_dataset(cfg: DataConfig) -> Dataset:
    """A dataset folder (`data.path`) or a bare .npy pair, read a batch of rows at a time.

    Without an eval split the last `eval_fraction` of the rows are held out: a contiguous
    range keeps both splits file-backed. Labels are scanned once, in bounded chunks.
    """
    if cfg.path is not None:
        store = open_store(cfg.path, "data.path")
        x, y, ex, ey = store.train_x, store.train_y, store.eval_x, store.eval_y
        names = [f"data.path: {r.path}" if r is not None else "" for r in (x, y, ex, ey)]
        declared = cfg.num_classes if cfg.num_classes is not None else store.num_classes
    else:
        assert cfg.x_path is not None and cfg.y_path is not None  # checked by DataConfig
        x, y = _open_rows(cfg.x_path, "x_path"), _open_rows(cfg.y_path, "y_path")
        ex = ey = None
        if cfg.eval_x_path is not None and cfg.eval_y_path is not None:
            ex = _open_rows(cfg.eval_x_path, "eval_x_path")
            ey = _open_rows(cfg.eval_y_path, "eval_y_path")
        names = [f"data.{key}: {path}" for key, path in
                 (("x_path", cfg.x_path), ("y_path", cfg.y_path),
                  ("eval_x_path", cfg.eval_x_path), ("eval_y_path", cfg.eval_y_path))]
        declared = cfg.num_classes
    _check_pair(x, y, names[0], names[1])
    low, high = scan_labels(y, names[1])
    if ex is not None and ey is not None:
        _check_pair(ex, ey, names[2], names[3])
        if ex.shape[1:] != x.shape[1:]:
            raise DataError(f"{names[2]} rows have shape {ex.shape[1:]} but {names[0]} rows "
                            f"have {x.shape[1:]}; both splits need the same row shape")
        if len(ey):
            e_low, e_high = scan_labels(ey, names[3])
            check_labels(e_low, e_high, declared if declared is not None else high + 1,
                         names[3])
        train, held = Split(x, y, names[0]), Split(ex, ey, names[2])
    else:
        cut = len(y) - int(round(cfg.eval_fraction * len(y)))
        train, held = Split(x[:cut], y[:cut], names[0]), Split(x[cut:], y[cut:], names[0])
    num_classes = check_labels(low, high, declared, names[1])
    return Dataset(train, held, tuple(int(d) for d in x.shape[1:]), num_classes)


def build_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Open and check the dataset named by `cfg.name` (every rank calls this before step 1)."""
    if cfg.name == "digits":
        return load_digits_dataset(cfg)
    if cfg.name == "synthetic":
        return make_synthetic_dataset(cfg, seed)
    if cfg.name == "npy":
        return open_npy_dataset(cfg)
    if cfg.name == "text":
        from mpiml.data.text import load_text_dataset

        return load_text_dataset(cfg)
    if cfg.name == "custom":
        from mpiml.data.custom import load_custom_dataset

        return load_custom_dataset(cfg)
    raise DataError(f"data.name = {cfg.name!r} is unknown")  # unreachable: config checks it
