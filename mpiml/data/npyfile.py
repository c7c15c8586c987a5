"""Single `.npy` files read and written a few rows at a time, for datasets larger than memory.

Reading: `NpyRows` parses the `.npy` header once and then fetches only the rows asked for with
`os.preadv`, straight into the batch buffer. Why not `np.load(mmap_mode="r")`: every page a
memory map touches stays resident and counts in the process's RSS until the kernel needs it
back, so over an epoch each rank's RSS would grow towards its whole shard. Positioned reads go
through the page cache instead, which is shared, never counted in RSS and dropped under
pressure. A rank therefore reads exactly the bytes of its own rows and holds at most one batch.

Writing: `NpyWriter` writes the header for a known shape, then appends rows chunk by chunk, so
conversions never hold the whole array either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.lib.format as npformat

from mpiml.errors import DataError

# preadv moves at most about 2 GiB per call on Linux; stay well below.
_MAX_READ = 256 << 20


def read_npy_header(f: BinaryIO, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an open `.npy` stream positioned at its start."""
    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(f)
        else:  # 3.0 only differs in allowing a UTF-8 header
            shape, fortran, dtype = npformat._read_array_header(f, version)  # noqa: SLF001
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{name} is not a readable .npy file ({err}). HINT: write it with "
                        "numpy.save(path, array), or convert CSV/.npz with "
                        "`python -m mpiml.data convert`") from err
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


class _Fd:
    """One read-only descriptor shared by an `NpyRows` and the views sliced from it."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class NpyRows:
    """Rows `start:stop` of a C-ordered `.npy` file; indexing reads only the rows asked for.

    Supports `len()`, `.shape`, `.dtype`, `rows[a:b]` (a view, no I/O) and `rows[idx]` for an
    integer array (a fresh array of those rows, in the order given).
    """

    def __init__(self, path: str | Path, *, _fd: _Fd | None = None,
                 _layout: tuple[int, tuple[int, ...], np.dtype] | None = None,
                 start: int = 0, stop: int | None = None) -> None:
        self.path = Path(path)
        if _layout is None:
            if not self.path.is_file():
                raise DataError(f"no file at {self.path}")
            with open(self.path, "rb") as f:
                shape, fortran, dtype = read_npy_header(f, str(self.path))
                offset = f.tell()
            if dtype.hasobject or dtype.fields is not None:
                raise DataError(f"{self.path} holds dtype {dtype}; expected plain numbers. "
                                "HINT: save a numeric array (float or integer)")
            if fortran and len(shape) > 1:
                raise DataError(f"{self.path} is stored in Fortran (column-major) order, so one "
                                "row is scattered over the whole file. HINT: rewrite it with "
                                "numpy.save(path, np.ascontiguousarray(array))")
            if len(shape) == 0:
                raise DataError(f"{self.path} holds a single number (shape ()); expected rows")
            need = offset + int(np.prod(shape)) * dtype.itemsize
            if self.path.stat().st_size < need:
                raise DataError(f"{self.path} is truncated: its header says shape {shape} "
                                f"({need:,} bytes) but the file has {self.path.stat().st_size:,}. "
                                "HINT: the copy or conversion was interrupted; redo it")
            _layout = (offset, shape, dtype)
            _fd = _Fd(self.path)
        assert _fd is not None
        self._fd = _fd
        self.offset, self.file_shape, self.dtype = _layout
        n = self.file_shape[0]
        self.start = start
        self.stop = n if stop is None else stop
        self.row_shape = self.file_shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.bytes_read = 0  # what this object fetched (views count their own)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.row_shape)

    @property
    def ndim(self) -> int:
        return len(self.file_shape)

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:
        return f"NpyRows({str(self.path)!r}, rows {self.start}:{self.stop} of {self.file_shape})"

    def __getitem__(self, key: slice | np.ndarray | int) -> NpyRows | np.ndarray:
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise IndexError("NpyRows slices must be contiguous (step 1)")
            return NpyRows(self.path, _fd=self._fd, _layout=(self.offset, self.file_shape,
                                                              self.dtype),
                           start=self.start + a, stop=self.start + max(a, b))
        if isinstance(key, (int, np.integer)):
            return self.take(np.array([int(key)]))[0]
        return self.take(np.asarray(key))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (relative to this view), read with one preadv per run of adjacent rows."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1} for {self.path}")
        order = None
        if idx.size > 1 and np.any(idx[1:] < idx[:-1]):
            order = np.argsort(idx, kind="stable")
            idx = idx[order]
        out = np.empty((idx.size, *self.row_shape), dtype=self.dtype)
        if self.row_bytes and idx.size:
            flat = out.reshape(idx.size, -1).view(np.uint8)
            # Split into runs of consecutive rows: each run is one contiguous read.
            breaks = np.flatnonzero(np.diff(idx) != 1) + 1
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, idx.size], strict=True):
                self._read_into(flat[lo:hi], int(idx[lo]))
        if order is not None:
            unsorted = np.empty_like(out)
            unsorted[order] = out
            out = unsorted
        return out

    def read_range(self, a: int, b: int) -> np.ndarray:
        """Rows a:b as one array (one read): for scans in bounded chunks."""
        return self.take(np.arange(a, b))

    def _read_into(self, rows: np.ndarray, first: int) -> None:
        buf = memoryview(rows).cast("B")
        pos = self.offset + (self.start + first) * self.row_bytes
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd.fd, [buf[done : done + _MAX_READ]], pos + done)
            if n <= 0:
                raise DataError(f"{self.path}: unexpected end of file at byte {pos + done:,}. "
                                "HINT: the file was truncated after it was opened")
            done += n
        self.bytes_read += done

    def close(self) -> None:
        """Close the descriptor (shared with views: close once, when done with all of them)."""
        self._fd.close()


class NpyWriter:
    """Write a `.npy` file of known shape a chunk of rows at a time (C order)."""

    def __init__(self, path: str | Path, dtype: np.dtype | str, shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        self.rows = 0
        self._f = open(self.path, "wb")
        header = {"descr": npformat.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}
        if len(repr(header)) > 65000:  # version 1.0 headers are limited to 64 KiB
            npformat.write_array_header_2_0(self._f, header)
        else:
            npformat.write_array_header_1_0(self._f, header)

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows of shape {chunk.shape[1:]} for {self.path}, "
                             f"expected {self.shape[1:]}")
        if self.rows + len(chunk) > self.shape[0]:
            raise ValueError(f"more than {self.shape[0]} rows written to {self.path}")
        self._f.write(chunk.tobytes())
        self.rows += len(chunk)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            if self.rows != self.shape[0]:
                raise ValueError(f"{self.path}: {self.rows} rows written, header says "
                                 f"{self.shape[0]}")

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
