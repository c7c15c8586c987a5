"""The strided per-rank loader.

For epoch `e` every rank draws the same permutation from `(seed, e)` and rank `r` of `N` takes
`perm[r::N]`. The permutation is first cut to a whole number of *global* batches
(`N * batch_size`), dropping the tail, so every rank runs the same number of steps and never
waits in a collective for a rank that has run out. With this rule the union of the ranks'
batches at step `t` is exactly `perm[t*N*b:(t+1)*N*b]`, the batch one process with batch `N*b`
takes at step `t`: N ranks train the same model as one big-batch process.

Only the rows of the rank's own batches are read (`Samples.take`), and with `prefetch > 0` a
background thread reads the next batches while the current step computes; the batches and
their order do not change (`ShardedLoader.epoch(e, start_step)` is deterministic either way).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from mpiml.data.prefetch import Prefetcher
from mpiml.data.samples import Samples
from mpiml.errors import DataError


class ShardedLoader:
    """Yields (inputs, labels) torch batches of this rank's shard for one epoch at a time."""

    def __init__(self, split: Samples, batch_size: int, rank: int, world_size: int,
                 seed: int, prefetch: int = 0) -> None:
        self.split = split
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        global_batch = batch_size * world_size
        self.steps_per_epoch = len(split) // global_batch
        if self.steps_per_epoch == 0:
            source = getattr(split, "source", "")
            raise DataError(
                f"the training split{f' ({source})' if source else ''} has {len(split)} "
                f"samples, fewer than one global batch of "
                f"{global_batch} (data.batch_size={batch_size} x {world_size} ranks). HINT: lower "
                "data.batch_size or use fewer ranks"
            )

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in order, steps_per_epoch * batch_size long."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
        used = perm[: self.steps_per_epoch * self.batch_size * self.world_size]
        return used[self.rank :: self.world_size]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `epoch`, from `start_step` on (to resume within an epoch).

        With prefetching, closing the generator (or dropping it) stops the loading thread.
        """
        batches = self._batches(epoch, start_step)
        if self.prefetch == 0:
            yield from batches
            return
        with Prefetcher(batches, self.prefetch) as ahead:
            yield from ahead

    def _batches(self, epoch: int,
                 start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.indices(epoch)
        for step in range(start_step, self.steps_per_epoch):
            idx = mine[step * self.batch_size : (step + 1) * self.batch_size]
            yield _to_tensors(self.split, idx)


def eval_shard(split: Samples, rank: int, world_size: int,
               batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided share of the eval split, every sample exactly once across ranks."""
    mine = np.arange(rank, len(split), world_size)
    for start in range(0, len(mine), batch_size):
        yield _to_tensors(split, mine[start : start + batch_size])


def _to_tensors(split: Samples, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Sorted reads are sequential in a file (adjacent rows become one read); the order within
    # a batch does not change the mean loss, so the big-batch equivalence holds.
    x, y = split.take(np.sort(idx))
    return torch.from_numpy(x), torch.from_numpy(y)
