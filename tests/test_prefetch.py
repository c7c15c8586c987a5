"""Background prefetch: the same batches in the same order, errors surfaced, threads stopped."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mpiml.data import ShardedLoader, Split
from mpiml.data.prefetch import Prefetcher


def loader(prefetch: int, rank: int = 1) -> ShardedLoader:
    data = Split(np.arange(206, dtype=np.float32).reshape(103, 2), np.arange(103) % 3)
    return ShardedLoader(data, 5, rank, 3, seed=11, prefetch=prefetch)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_same_batches_in_the_same_order(depth):
    for epoch, start in ((0, 0), (3, 2)):
        want = list(loader(0).epoch(epoch, start))
        got = list(loader(depth).epoch(epoch, start))
        assert len(got) == len(want) == loader(0).steps_per_epoch - start
        for (gx, gy), (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(gx, wx) and torch.equal(gy, wy)


def test_an_error_in_the_thread_is_raised_in_the_consumer():
    def source():
        yield 1
        raise OSError("disk gone")

    with Prefetcher(source(), 2) as ahead:
        assert next(ahead) == 1
        with pytest.raises(OSError, match="disk gone"):
            next(ahead)


def test_stopping_early_ends_the_thread():
    before = threading.active_count()
    batches = loader(1, rank=0).epoch(0)
    next(batches)
    batches.close()  # what happens when the trainer reaches max_steps mid-epoch
    assert threading.active_count() == before
    endless = Prefetcher(iter(range(10**9)), 3)
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()
    endless.close()
    assert not any(t.name == "mpiml-prefetch" for t in threading.enumerate())
