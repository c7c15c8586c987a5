"""Convert CSV or `.npz` files into the dataset folder layout of `store.py`, in bounded memory.

CSV: one sample per line, numeric feature columns and one label column (the last by default;
`label_column` picks another by index or header name). A header line is detected when its
fields are not all numbers. Labels that are all integers are kept; any other labels (names
such as `cat`) become class ids in sorted order, and the names are kept in the sidecar. The
file is read twice, a chunk of lines at a time: once to count rows and collect labels, once to
write. `.npz`: arrays are streamed out of the archive a chunk of rows at a time.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpiml.data.npyfile import NpyRows, NpyWriter, read_npy_header
from mpiml.data.samples import check_labels, scan_labels
from mpiml.data.store import SIDECAR, write_sidecar
from mpiml.errors import DataError

CHUNK_ROWS = 65536
X_KEYS = ("x", "X", "x_train", "X_train", "inputs", "data", "features")
Y_KEYS = ("y", "Y", "y_train", "labels", "targets", "target")
EVAL_X_KEYS = ("x_test", "X_test", "x_eval", "X_eval", "x_val", "X_val")
EVAL_Y_KEYS = ("y_test", "y_eval", "y_val")


@dataclass
class Converted:
    """What was written: per file, (dtype, shape); plus classes and their names if any."""

    files: dict[str, tuple[np.dtype, tuple[int, ...]]] = field(default_factory=dict)
    num_classes: int = 0
    class_names: list[str] | None = None


# -- CSV ----------------------------------------------------------------------------------------

def _fields(line: str, delimiter: str) -> list[str]:
    """The fields of one CSV line (quotes honoured, so a quoted field may hold the delimiter)."""
    return [f.strip() for f in next(csv.reader([line], delimiter=delimiter), [])]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class _CsvShape:
    rows: int
    columns: int
    header: list[str] | None
    label_col: int
    labels: set[str]


def _scan_csv(path: Path, delimiter: str, label_column: str | int | None) -> _CsvShape:
    """First pass: row and column counts, the header, every distinct label value."""
    header: list[str] | None = None
    columns, rows, labels = 0, 0, set()
    label_col = -1
    with open(path, encoding="utf-8", newline="") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = _fields(line, delimiter)
            if columns == 0:
                columns = len(fields)
                if columns < 2:
                    raise DataError(f"{path}:{number}: one column only; expected feature columns "
                                    f"and a label column separated by {delimiter!r} (HINT: "
                                    "--delimiter)")
                if not all(_is_number(v) for v in fields):
                    header = fields
                label_col = _label_index(path, label_column, header, columns)
                if header is not None:
                    continue
            if len(fields) != columns:
                raise DataError(f"{path}:{number}: {len(fields)} columns, but the first line has "
                                f"{columns}; every row needs the same columns")
            labels.add(fields[label_col])
            rows += 1
    if rows == 0:
        raise DataError(f"{path} holds no data rows")
    return _CsvShape(rows, columns, header, label_col, labels)


def _label_index(path: Path, spec: str | int | None, header: list[str] | None,
                 columns: int) -> int:
    if spec is None:
        return columns - 1
    if isinstance(spec, str) and not spec.lstrip("-").isdigit():
        if header is None or spec not in header:
            names = f"; its columns are {header}" if header else " (it has no header line)"
            raise DataError(f"{path}: no column named {spec!r}{names}")
        return header.index(spec)
    index = int(spec)
    if not -columns <= index < columns:
        raise DataError(f"{path}: label column {index} is out of range for {columns} columns")
    return index % columns


def _as_int(text: str) -> int | None:
    """The integer a label field holds ("3", "3.0"), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _label_map(path: Path, labels: set[str]) -> tuple[dict[str, int] | None, int, list[str] | None]:
    """(name -> id or None for integer labels, number of classes, class names or None)."""
    ints = {v: _as_int(v) for v in labels}
    if all(i is not None for i in ints.values()):
        low, high = min(ints.values()), max(ints.values())  # type: ignore[type-var]
        if low < 0:
            raise DataError(f"{path}: negative label {low}; labels must be class indices "
                            "0..C-1 or class names")
        return None, high + 1, None
    if all(_is_number(v) for v in labels):
        bad = next(v for v in sorted(labels) if ints[v] is None)
        raise DataError(f"{path}: label {bad!r} is not an integer; labels must be class indices "
                        "or class names (HINT: --label-column picks another column)")
    names = sorted(labels)
    return {name: i for i, name in enumerate(names)}, len(names), names


def _csv_chunks(path: Path, delimiter: str, skip_header: bool) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) in chunks of CHUNK_ROWS non-empty lines."""
    chunk: list[str] = []
    first = 0
    with open(path, encoding="utf-8", newline="") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if skip_header:
                skip_header = False
                continue
            if not chunk:
                first = number
            chunk.append(line)
            if len(chunk) == CHUNK_ROWS:
                yield first, chunk
                chunk = []
    if chunk:
        yield first, chunk


def _parse_features(path: Path, first: int, lines: list[str], delimiter: str,
                    cols: list[int]) -> np.ndarray:
    try:
        return np.loadtxt(lines, delimiter=delimiter, usecols=cols, dtype=np.float64,
                          ndmin=2, quotechar='"', comments=None)
    except ValueError:
        pass
    for offset, line in enumerate(lines):  # find the culprit for the message
        for col in cols:
            value = _fields(line, delimiter)[col]
            if not _is_number(value):
                raise DataError(f"{path}:{first + offset}: column {col + 1} holds {value!r}, "
                                "not a number; feature columns must be numeric") from None
    raise DataError(f"{path}: lines {first}..{first + len(lines) - 1} could not be parsed")


def convert_csv(path: Path, out: Path, prefix: str, dtype: np.dtype, delimiter: str,
                label_column: str | int | None,
                class_names: list[str] | None = None) -> tuple[Converted, int]:
    """Write `prefix`_x.npy and `prefix`_y.npy from a CSV file (two streaming passes).

    `class_names` are the training file's, for an eval file: its labels must be among them.
    Returns what was written and the number of classes its labels imply.
    """
    shape = _scan_csv(path, delimiter, label_column)
    if class_names is None:
        label_map, classes, names = _label_map(path, shape.labels)
    else:
        unknown = sorted(shape.labels - set(class_names))
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} do not occur in the training file")
        label_map = {name: i for i, name in enumerate(class_names)}
        classes, names = len(class_names), class_names
    feature_cols = [c for c in range(shape.columns) if c != shape.label_col]
    x_shape, y_shape = (shape.rows, len(feature_cols)), (shape.rows,)
    with NpyWriter(out / f"{prefix}_x.npy", dtype, x_shape) as wx, \
            NpyWriter(out / f"{prefix}_y.npy", np.int64, y_shape) as wy:
        for first, lines in _csv_chunks(path, delimiter, shape.header is not None):
            features = _parse_features(path, first, lines, delimiter, feature_cols)
            wx.write(_cast(features, dtype, path))
            raw = [row[shape.label_col] for row in csv.reader(lines, delimiter=delimiter)]
            wy.write(np.array([label_map[v] for v in raw] if label_map else
                              [_as_int(v) for v in raw], dtype=np.int64))
    done = Converted(class_names=names)
    done.files[f"{prefix}_x"] = (np.dtype(dtype), x_shape)
    done.files[f"{prefix}_y"] = (np.dtype(np.int64), y_shape)
    return done, classes


def _cast(values: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max
                            or np.any(values != np.round(values))):
            raise DataError(f"{path}: values do not fit --dtype {np.dtype(dtype).name} (range "
                            f"{values.min()}..{values.max()}); choose float32")
    return values.astype(dtype)


# -- npz ----------------------------------------------------------------------------------------

def _member_header(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], bool,
                                                                         np.dtype]:
    with zf.open(f"{key}.npy") as f:
        return read_npy_header(f, f"{path}[{key}]")  # type: ignore[arg-type]


def _pick(keys: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
          path: Path, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise DataError(f"{path} has no array {wanted!r} ({what}); it holds {keys}")
        return wanted
    for key in candidates:
        if key in keys:
            return key
    if required:
        raise DataError(f"{path} holds arrays {keys} but none is named like {what} "
                        f"({', '.join(candidates)}). HINT: name them with --x-key/--y-key")
    return None


def _copy_member(zf: zipfile.ZipFile, key: str, path: Path, target: Path,
                 dtype: np.dtype | None) -> tuple[np.dtype, tuple[int, ...]]:
    """Stream array `key` into `target` a chunk of rows at a time; (dtype, shape) written."""
    shape, fortran, src_dtype = _member_header(zf, key, path)
    if src_dtype.hasobject or src_dtype.fields is not None:
        raise DataError(f"{path}[{key}] holds dtype {src_dtype}; expected plain numbers")
    out_dtype = np.dtype(dtype) if dtype is not None else src_dtype
    if not shape:
        raise DataError(f"{path}[{key}] is a single number; expected rows")
    row_items = int(np.prod(shape[1:], dtype=np.int64))
    with zf.open(f"{key}.npy") as f, NpyWriter(target, out_dtype, shape) as w:
        read_npy_header(f, f"{path}[{key}]")  # type: ignore[arg-type]
        if fortran and len(shape) > 1:  # rare: column-major needs the whole array at once
            whole = np.frombuffer(f.read(), dtype=src_dtype).reshape(shape, order="F")
            w.write(whole)
        else:
            for a in range(0, shape[0], CHUNK_ROWS):
                n = min(CHUNK_ROWS, shape[0] - a)
                raw = f.read(n * row_items * src_dtype.itemsize)  # reads until n or EOF
                if len(raw) != n * row_items * src_dtype.itemsize:
                    raise DataError(f"{path}[{key}] is truncated")
                w.write(np.frombuffer(raw, dtype=src_dtype).reshape(n, *shape[1:]))
    return out_dtype, shape


def convert_npz(path: Path, out: Path, dtype: np.dtype | None, keys: dict[str, str | None],
                result: Converted) -> Converted:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} is not a readable .npz archive ({err})") from err
    with zf:
        names = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        x_key = _pick(names, keys.get("x"), X_KEYS, "the inputs", path, True)
        y_key = _pick(names, keys.get("y"), Y_KEYS, "the labels", path, True)
        ex_key = _pick(names, keys.get("eval_x"), EVAL_X_KEYS, "eval inputs", path, False)
        ey_key = _pick(names, keys.get("eval_y"), EVAL_Y_KEYS, "eval labels", path, False)
        if (ex_key is None) != (ey_key is None):
            raise DataError(f"{path} has {'eval inputs' if ex_key else 'eval labels'} "
                            f"({ex_key or ey_key}) without the other")
        pairs = [("train", x_key, y_key)] + ([("eval", ex_key, ey_key)] if ex_key else [])
        for prefix, xk, yk in pairs:
            assert xk is not None and yk is not None
            y_shape, _, y_dtype = _member_header(zf, yk, path)
            if not np.issubdtype(y_dtype, np.integer) or len(y_shape) != 1:
                raise DataError(f"{path}[{yk}] has shape {y_shape} and dtype {y_dtype}; labels "
                                "must be integers of shape (samples,)")
            x_dtype, x_shape = _copy_member(zf, xk, path, out / f"{prefix}_x.npy", dtype)
            _, y_shape = _copy_member(zf, yk, path, out / f"{prefix}_y.npy", np.int64)
            if x_shape[0] != y_shape[0]:
                raise DataError(f"{path}: {xk} has {x_shape[0]} rows but {yk} has {y_shape[0]}")
            if len(x_shape) < 2:
                raise DataError(f"{path}[{xk}] has shape {x_shape}; expected (samples, "
                                "features...)")
            labels = NpyRows(out / f"{prefix}_y.npy")
            if len(labels):
                low, high = scan_labels(labels, f"{path}[{yk}]")
                result.num_classes = max(result.num_classes,
                                         check_labels(low, high, None, f"{path}[{yk}]"))
            labels.close()
            result.files[f"{prefix}_x"] = (x_dtype, x_shape)
            result.files[f"{prefix}_y"] = (np.dtype(np.int64), y_shape)
    return result


# -- entry point --------------------------------------------------------------------------------

def convert(source: str | Path, out: str | Path, *, eval_source: str | Path | None = None,
            dtype: str | None = None, delimiter: str = ",",
            label_column: str | int | None = None, keys: dict[str, str | None] | None = None,
            force: bool = False) -> dict[str, Any]:
    """Convert `source` (CSV or .npz; plus `eval_source` CSV) into the folder `out`.

    Returns the sidecar contents. The folder is built beside `out` and renamed into place only
    when complete, so an interrupted conversion never looks like a dataset.
    """
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise DataError(f"no file at {source}")
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if occupied and not force:
        raise DataError(f"{out} already exists; choose another folder or pass --force to "
                        "replace it")
    staging = out.with_name(out.name + ".converting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    kind = "npz" if source.suffix == ".npz" else "csv"
    np_dtype = np.dtype(dtype) if dtype is not None else None
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, staging, ignore_errors=True)
        result = Converted()
        if kind == "npz":
            if eval_source is not None:
                raise DataError("--eval is for CSV input; an .npz carries its eval split as "
                                "x_test/y_test (or --eval-x-key/--eval-y-key)")
            convert_npz(source, staging, np_dtype, keys or {}, result)
        else:
            csv_dtype = np_dtype or np.dtype(np.float32)
            result, result.num_classes = convert_csv(source, staging, "train", csv_dtype,
                                                     delimiter, label_column)
            if eval_source is not None:
                eval_path = Path(eval_source)
                if not eval_path.is_file():
                    raise DataError(f"--eval: no file at {eval_path}")
                held, classes = convert_csv(eval_path, staging, "eval", csv_dtype, delimiter,
                                            label_column, result.class_names)
                if held.class_names is not None and result.class_names is None:
                    raise DataError(f"{eval_path} has class names as labels but {source} has "
                                    "integer labels; use the same kind in both")
                result.files.update(held.files)
                result.num_classes = max(result.num_classes, classes)
        extra: dict[str, Any] = {"source": str(source.resolve())}
        if eval_source is not None:
            extra["eval_source"] = str(Path(eval_source).resolve())
        if result.class_names is not None:
            extra["class_names"] = result.class_names
        write_sidecar(staging, result.files, result.num_classes, extra)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        cleanup.pop_all()
    return {"folder": str(out), **json.loads((out / SIDECAR).read_text())}
