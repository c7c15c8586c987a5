"""A dataset from the user's own function: `data.name: custom`, `data.function: pkg.mod:fn`.

The function is called on every rank with `data.kwargs` as keyword arguments and returns one of:

- `(x, y)`: arrays (numpy, torch tensors, anything `np.asarray` takes). `x` is (n, ...) numbers,
  `y` is (n,) integer class labels, or (n, T) next-token targets when `x` is (n, T) token ids.
  `data.eval_fraction` of the samples are held out at random, fixed by `data.split_seed`.
- a map-style dataset: `len(ds)` and `ds[i] -> (x, y)` with an integer label (a
  `torch.utils.data.Dataset` works). Items are fetched only for the samples of a batch, so it
  may be larger than memory. Held out at random like arrays.
- `{"train": part, "eval": part}` with each part one of the above, for an explicit eval split.

Everything that can be checked up front (shapes, label types and ranges of arrays) is checked
before the first step; a map-style dataset's items are checked as they are read.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from mpiml.config import DataConfig
from mpiml.data.samples import Dataset, Samples, Split, check_labels, holdout, scan_labels
from mpiml.errors import ConfigError, DataError
from mpiml.plugins import import_object

RETURNS = ("(x, y) arrays, a map-style dataset (len(ds) and ds[i] -> (x, y)), or "
           "{'train': ..., 'eval': ...} of those")


class MapSplit:
    """Samples `indices` of a map-style dataset, fetched item by item for each batch."""

    def __init__(self, dataset: Any, indices: np.ndarray, source: str,
                 num_classes: int | None = None) -> None:
        self.dataset, self.indices, self.source = dataset, indices, source
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def item(self, i: int) -> tuple[np.ndarray, int]:
        item = self.dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"{self.source}: sample {i} is a {type(item).__name__}; a map-style "
                            "dataset must return (x, y) pairs")
        x, y = np.asarray(item[0]), np.asarray(item[1])
        if y.ndim != 0 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{self.source}: sample {i} has label {item[1]!r}; expected one "
                            "integer class index")
        label = int(y)
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise DataError(f"{self.source}: sample {i} has label {label}, out of range for "
                            f"{self.num_classes} classes (0..{(self.num_classes or 1) - 1})")
        return x, label

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = [self.item(int(i)) for i in self.indices[np.asarray(idx)]]
        try:
            x = np.stack([x for x, _ in items]).astype(np.float32)
        except ValueError as err:
            raise DataError(f"{self.source}: the samples of one batch differ in shape "
                            f"({err}); every x must have the same shape") from None
        return x, np.array([y for _, y in items], dtype=np.int64)


def _is_map_style(obj: Any) -> bool:
    return hasattr(obj, "__len__") and hasattr(obj, "__getitem__") and not isinstance(
        obj, (np.ndarray, str, bytes, Mapping))


def _is_array_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and all(
        hasattr(v, "__array__") or isinstance(v, (list, tuple)) for v in obj)


def _arrays(part: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        x, y = np.asarray(part[0]), np.asarray(part[1])
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{where}: could not turn (x, y) into arrays: {err}") from None
    if x.ndim < 2:
        raise DataError(f"{where}: x has shape {x.shape}; expected (samples, features...) with "
                        "at least 2 dimensions (HINT: x.reshape(len(x), -1))")
    if y.ndim not in (1, 2):
        raise DataError(f"{where}: y has shape {y.shape}; expected (samples,) class labels or "
                        "(samples, T) token targets")
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} samples but y has {len(y)}; they must match "
                        "row for row")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}: x has dtype {x.dtype}; inputs must be numeric")
    if y.ndim == 2 and (x.shape != y.shape or not np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{where}: y has shape {y.shape}, so it holds token targets, but x "
                        f"has shape {x.shape} and dtype {x.dtype}; expected integer token ids "
                        "of the same shape")
    return x, y


def _split_map(ds: Any, cfg: DataConfig, where: str) -> tuple[MapSplit, MapSplit]:
    order = np.random.default_rng(cfg.split_seed).permutation(len(ds))
    n_eval = int(round(cfg.eval_fraction * len(ds)))
    return (MapSplit(ds, np.sort(order[n_eval:]), where),
            MapSplit(ds, np.sort(order[:n_eval]), where))


def _map_classes(ds: Any, cfg: DataConfig, where: str) -> int:
    if cfg.num_classes is not None:
        return cfg.num_classes
    if isinstance(getattr(ds, "num_classes", None), int):
        return int(ds.num_classes)
    if hasattr(getattr(ds, "classes", None), "__len__"):
        return len(ds.classes)
    raise DataError(f"{where} is a map-style dataset with no num_classes or classes attribute, "
                    "so the number of classes is unknown without reading every sample. HINT: "
                    "set data.num_classes")


def call_function(cfg: DataConfig) -> Any:
    """Import `data.function` and call it with `data.kwargs`."""
    assert cfg.function is not None  # checked by DataConfig
    fn = import_object(cfg.function, "data.function")
    if not callable(fn):
        raise ConfigError(f"data.function = {cfg.function!r} is a {type(fn).__name__}, not a "
                          "function")
    try:
        inspect.signature(fn).bind(**cfg.kwargs)
    except TypeError as err:
        raise ConfigError(f"data.kwargs {cfg.kwargs!r} do not fit data.function "
                          f"{cfg.function!r}: {err}") from None
    except ValueError:  # no signature to check (a builtin): let the call decide
        pass
    return fn(**cfg.kwargs)


def load_custom_dataset(cfg: DataConfig) -> Dataset:
    """Call the user's function and check what it returned (see the module docstring)."""
    result = call_function(cfg)
    where = f"data.function {cfg.function}()"
    if isinstance(result, Mapping):
        unknown = set(result) - {"train", "eval"}
        if "train" not in result or unknown:
            raise DataError(f"{where} returned a mapping with keys {sorted(map(str, result))}; "
                            "expected 'train' and optionally 'eval'")
        train_part, eval_part = result["train"], result.get("eval")
    else:
        train_part, eval_part = result, None

    if _is_array_pair(train_part):
        x, y = _arrays(train_part, f"{where}['train']" if eval_part is not None else where)
        low, high = scan_labels(y, f"{where}: y")
        tokens = y.ndim == 2
        if tokens:  # a vocabulary: ids in both inputs and targets
            low, high = min(low, int(x.min())), max(high, int(x.max()))
        classes = check_labels(low, high, cfg.num_classes, f"{where}: y")
        if eval_part is None:
            train, held = holdout(x, y, cfg.eval_fraction, cfg.split_seed, where)
        else:
            if not _is_array_pair(eval_part):
                raise DataError(f"{where}['eval'] must be (x, y) arrays like 'train'")
            ex, ey = _arrays(eval_part, f"{where}['eval']")
            if ex.shape[1:] != x.shape[1:] or ey.ndim != y.ndim:
                raise DataError(f"{where}['eval'] samples have shape {ex.shape[1:]} but "
                                f"'train' samples have {x.shape[1:]}")
            if len(ey):
                check_labels(*scan_labels(ey, f"{where}['eval']: y"), classes,
                             f"{where}['eval']: y")
            x_dtype = np.int64 if tokens else np.float32
            train, held = Split(x, y, where, x_dtype), Split(ex, ey, where, x_dtype)
        return Dataset(train, held, tuple(int(d) for d in x.shape[1:]), classes,
                       kind="tokens" if tokens else "classes")

    if _is_map_style(train_part):
        classes = _map_classes(train_part, cfg, where)
        if eval_part is None:
            train_s, held_s = _split_map(train_part, cfg, where)
        elif _is_map_style(eval_part):
            train_s = MapSplit(train_part, np.arange(len(train_part)), where)
            held_s = MapSplit(eval_part, np.arange(len(eval_part)), f"{where}['eval']")
        else:
            raise DataError(f"{where}['eval'] must be a map-style dataset like 'train'")
        for split in (train_s, held_s):
            split.num_classes = classes
        if len(train_s) == 0:
            raise DataError(f"{where} returned an empty dataset")
        first, _ = train_s.item(int(train_s.indices[0]))
        samples: tuple[Samples, Samples] = (train_s, held_s)
        return Dataset(*samples, tuple(int(d) for d in first.shape), classes)

    raise DataError(f"{where} returned a {type(train_part).__name__}; expected {RETURNS}")
