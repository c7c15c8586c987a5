"""Keep freed memory in the process heap, so every step's large tensors reuse their pages.

Why: glibc's malloc serves each block above its mmap threshold (128 KiB at start, raised by
its own rule up to 32 MiB, never beyond) with a fresh `mmap` and unmaps it on `free`.
PyTorch's CPU allocator is plain malloc, so a training step's large temporaries, such as a
4096 x 4096 layer's weight gradient (64 MiB) before it is added into `.grad`, come back as
fresh pages every step: the kernel faults them in and zeroes them again. On the 2-core
machine the wide MLP of `scripts/bench_train.py` (25 M parameters, batch 64) took about 25,000
page faults per step that way, and its step ran 17-22% faster without them (one process
alone, and two at once; the same loop switched between the two settings every six steps).

With mmap off for allocations and the heap's top never trimmed, a freed block stays in the
heap and the next step's allocation of the same size takes it back without a fault: a
training loop peaks at the same place every step, so the heap settles at that peak (while
small blocks still split the large free ones, a step now and then grows it once more; the
wide MLP with Adam ran steps 40-120 without a fault, its peak RSS 824 MiB against 818). The
price is that memory freed after the peak is kept by the process until it exits, the trade
PyTorch's CUDA caching allocator makes too. `train.keep_freed_memory: false` leaves glibc's
defaults. Other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import sys

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int: the largest trim threshold it can set


def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (process-wide); True if it took effect.

    Call it once, early, in the process that trains; threads started later are covered too.
    """
    libc = glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success. Allocations that find no room in the heap grow it (brk),
    # or, in a thread's arena, fall back to the main one; nothing fails for want of mmap.
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
