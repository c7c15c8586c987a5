"""What a dataset hands the loader: splits that return the rows they are asked for.

A split is anything with `len()`, a `source` (named in error messages) and `take(idx)`, which
returns the inputs and labels of samples `idx` (sorted) as numpy arrays. Only the rows asked for
are read, so a split backed by a file larger than memory costs one batch of memory per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from mpiml.errors import DataError


class Samples(Protocol):
    source: str

    def __len__(self) -> int: ...

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and int64 labels of samples `idx`, in that order."""
        ...


@dataclass(frozen=True)
class Split:
    """Inputs and labels indexed by sample: numpy arrays, or `NpyRows` read from a file."""

    x: Any  # (n, *input_shape): np.ndarray or NpyRows (anything indexable by an int array)
    y: Any  # (n,) integer class labels, or (n, T) token targets
    source: str = ""  # what to name in errors: a file, a function, a dataset
    x_dtype: Any = np.float32  # what batches of inputs become (int64 for token ids)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(self.x[idx], dtype=self.x_dtype)
        y = np.ascontiguousarray(self.y[idx], dtype=np.int64)
        return x, y


@dataclass(frozen=True)
class Dataset:
    train: Samples
    eval: Samples
    input_shape: tuple[int, ...]
    num_classes: int  # classes, or the vocabulary size for token data
    # "classes": one label per sample; "tokens": a target per position (language modelling)
    kind: Literal["classes", "tokens"] = "classes"
    vocab: str | None = None  # text: the characters that token ids 0..V-1 stand for


def holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int,
            source: str = "") -> tuple[Split, Split]:
    """Split off `fraction` of the samples for evaluation, chosen at random but fixed by `seed`."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_eval = int(round(fraction * len(y)))
    held, kept = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    x_dtype = np.int64 if np.issubdtype(x.dtype, np.integer) and y.ndim == 2 else np.float32
    return (Split(x[kept], y[kept], source, x_dtype), Split(x[held], y[held], source, x_dtype))


def check_labels(low: int, high: int, num_classes: int | None, where: str) -> int:
    """Check a label range against the declared class count; return the class count to use."""
    if low < 0:
        raise DataError(f"{where} holds negative labels (min {low}); labels must be class "
                        "indices 0..C-1")
    if num_classes is not None and high >= num_classes:
        raise DataError(f"{where} holds label {high}, out of range for {num_classes} classes "
                        f"(labels must be 0..{num_classes - 1}). HINT: raise data.num_classes or "
                        "fix the labels")
    return num_classes if num_classes is not None else high + 1


def scan_labels(y: Any, where: str, chunk: int = 1 << 20) -> tuple[int, int]:
    """(min, max) of integer labels, read `chunk` rows at a time (labels may be file-backed)."""
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where} has dtype {y.dtype}; labels must be integers (HINT: "
                        "y.astype(np.int64) before saving)")
    low, high = None, None
    for a in range(0, len(y), chunk):
        part = np.asarray(y[a : a + chunk]) if isinstance(y, np.ndarray) else \
            y.read_range(a, min(len(y), a + chunk))
        if part.size:
            low = int(part.min()) if low is None else min(low, int(part.min()))
            high = int(part.max()) if high is None else max(high, int(part.max()))
    if low is None or high is None:
        raise DataError(f"{where} holds no labels (0 rows)")
    return low, high
