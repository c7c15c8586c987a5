"""Distributed evaluation of a model on a held-out split, shared by training and `mpiml.evaluate`.

Each rank takes its strided share of the split (every sample exactly once across ranks) and the
loss sum, correct count and sample count are summed over ranks, so the result does not depend
on the number of ranks and every rank holds the same numbers afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mpiml.comm import World
from mpiml.data import Split, eval_shard


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per sample
    accuracy: float  # share of samples whose arg-max prediction is the label
    samples: int


def eval_batch_size(train_batch_size: int) -> int:
    """No gradients are kept, so evaluation can take bigger batches than training."""
    return max(256, train_batch_size)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, split: Split, world: World,
                   batch_size: int) -> EvalResult | None:
    """Evaluate on `split` across the world (a collective: every rank calls it); None if empty."""
    was_training = model.training
    model.eval()
    totals = np.zeros(3)  # loss sum, correct, samples
    for x, y in eval_shard(split, world.rank, world.size, batch_size):
        logits = model(x)
        totals += (float(F.cross_entropy(logits, y, reduction="sum")),
                   float((logits.argmax(1) == y).sum()), len(y))
    loss_sum, correct, count = world.allreduce_sum(totals)
    model.train(was_training)
    if count == 0:
        return None
    return EvalResult(loss=loss_sum / count, accuracy=correct / count, samples=int(count))
