"""Load the next batches in one background thread while the current step computes.

The thread only runs the loader's own iterator ahead of the consumer, through a bounded queue,
so the batches and their order are exactly those without prefetching (the equivalence and
resume guarantees rest on that). Reading rows (`os.preadv`), numpy copies and torch's kernels
release the GIL, so loading overlaps with forward and backward.

An exception in the thread is re-raised in the consumer at the batch where it happened.
`close()` (or leaving the `with` block, or dropping an unfinished epoch's generator) stops the
thread without waiting on timeouts: it drains the queue so a blocked `put` returns, and the
thread sees the stop flag before it loads anything else.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = range(3)


class Prefetcher(Generic[T]):
    """Iterate `source` up to `depth` items ahead in a daemon thread; yields the same items."""

    def __init__(self, source: Iterator[T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self._source = source
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="mpiml-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(_ITEM, item):
                    return
            self._put(_END, None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_ERROR, err)

    def _put(self, kind: int, value: object) -> bool:
        # After `close()` sets the flag, at most one put (one that passed this check just
        # before) still happens; `close()` drains the queue, so that put finds a free slot.
        if self._stop.is_set():
            return False
        self._queue.put((kind, value))
        return True

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value  # type: ignore[return-value]
        self._finished = True
        self._thread.join()
        if kind == _ERROR:
            assert isinstance(value, BaseException)
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread and wait for it; safe to call more than once."""
        self._stop.set()
        self._finished = True
        while True:  # free every slot: a put that is blocked (or about to be) then returns
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
