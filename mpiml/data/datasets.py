"""The datasets mpiml can train on: `digits`, `synthetic` and `npy`.

All return arrays indexed by sample; `npy` ones are memory-mapped, so a rank that indexes only
its own rows reads only those pages. Inputs are float32 of shape (n, *input_shape), labels int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpiml.config import DataConfig
from mpiml.errors import DataError


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (n, *input_shape), may be a np.memmap
    y: np.ndarray  # (n,) integer class labels

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    train: Split
    eval: Split
    input_shape: tuple[int, ...]
    num_classes: int


def _holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off `fraction` of the samples for evaluation, fixed by `seed`."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_eval = int(round(fraction * len(y)))
    held, kept = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return Split(x[kept], y[kept]), Split(x[held], y[held])


def load_digits_dataset(cfg: DataConfig) -> Dataset:
    """scikit-learn's 1,797 handwritten 8x8 digits: real data that ships inside the package."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (n, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    train, held = _holdout(x, y, cfg.eval_fraction, cfg.split_seed)
    return Dataset(train, held, (1, 8, 8), 10)


def make_synthetic_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Gaussian clusters, one per class; `noise` sets how much they overlap."""
    rng = np.random.default_rng([seed, 0x5E7])
    centers = rng.standard_normal((cfg.classes, cfg.features)).astype(np.float32) * 2.0
    y = rng.integers(0, cfg.classes, size=cfg.samples).astype(np.int64)
    noise = rng.standard_normal((cfg.samples, cfg.features)).astype(np.float32) * cfg.noise
    x = centers[y] + noise
    train, held = _holdout(x, y, cfg.eval_fraction, cfg.split_seed)
    return Dataset(train, held, (cfg.features,), cfg.classes)


def _open_npy(path_str: str, key: str) -> np.ndarray:
    path = Path(path_str)
    if not path.is_file():
        raise DataError(f"data.{key}: no file at {path} (HINT: give the path to a .npy file "
                        "written with numpy.save)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"data.{key}: {path} is not a readable .npy file ({err}). HINT: write it "
                        "with numpy.save(path, array) from a numeric array") from err


def _check_pair(x: np.ndarray, y: np.ndarray, x_key: str, y_key: str, cfg: DataConfig) -> None:
    x_path, y_path = getattr(cfg, x_key), getattr(cfg, y_key)
    if x.ndim < 2:
        raise DataError(f"data.{x_key}: {x_path} has shape {x.shape}; expected "
                        "(samples, features...) with at least 2 dimensions")
    if y.ndim != 1:
        raise DataError(f"data.{y_key}: {y_path} has shape {y.shape}; expected (samples,)")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"data.{x_key} has {x.shape[0]} samples but data.{y_key} has "
                        f"{y.shape[0]}; they must match row for row")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"data.{y_key}: {y_path} has dtype {y.dtype}; labels must be integers")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"data.{x_key}: {x_path} has dtype {x.dtype}; inputs must be numeric")


def open_npy_dataset(cfg: DataConfig) -> Dataset:
    """A pair of .npy files, memory-mapped: each rank touches only the rows it indexes."""
    assert cfg.x_path is not None and cfg.y_path is not None  # checked by DataConfig
    x, y = _open_npy(cfg.x_path, "x_path"), _open_npy(cfg.y_path, "y_path")
    _check_pair(x, y, "x_path", "y_path", cfg)
    if cfg.eval_x_path is not None and cfg.eval_y_path is not None:
        ex, ey = _open_npy(cfg.eval_x_path, "eval_x_path"), _open_npy(cfg.eval_y_path,
                                                                        "eval_y_path")
        _check_pair(ex, ey, "eval_x_path", "eval_y_path", cfg)
        if ex.shape[1:] != x.shape[1:]:
            raise DataError(f"data.eval_x_path rows have shape {ex.shape[1:]} but data.x_path "
                            f"rows have {x.shape[1:]}")
        train, held = Split(x, y), Split(ex, ey)
    else:
        # Hold out the last rows: a contiguous range keeps both splits memory-mapped.
        n_eval = int(round(cfg.eval_fraction * len(y)))
        cut = len(y) - n_eval
        train, held = Split(x[:cut], y[:cut]), Split(x[cut:], y[cut:])
    # Label range is checked on a bounded sample: scanning a 100 GB file would defeat mmap.
    num_classes = int(_label_max(y, cfg.y_path)) + 1
    return Dataset(train, held, tuple(int(d) for d in x.shape[1:]), num_classes)


def _label_max(y: np.ndarray, path: str | None) -> int:
    step = max(1, len(y) // 1_000_000)
    sample = np.asarray(y[::step])
    if sample.size and sample.min() < 0:
        raise DataError(f"data.y_path: {path} holds negative labels (min {sample.min()}); "
                        "labels must be class indices 0..C-1")
    return int(sample.max()) if sample.size else 0


def build_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Open the dataset named by `cfg.name`."""
    if cfg.name == "digits":
        return load_digits_dataset(cfg)
    if cfg.name == "synthetic":
        return make_synthetic_dataset(cfg, seed)
    if cfg.name == "npy":
        return open_npy_dataset(cfg)
    raise DataError(f"data.name = {cfg.name!r} is unknown")  # unreachable: config checks it
