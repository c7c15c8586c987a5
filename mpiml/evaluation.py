"""Distributed evaluation of a model on a held-out split, shared by training and `mpiml.evaluate`.

Each rank takes its strided share of the split (every sample exactly once across ranks) and the
loss sum, correct count and sample count are summed over ranks, so the result does not depend
on the number of ranks and every rank holds the same numbers afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mpiml.comm import World
from mpiml.data import Samples, eval_shard
from mpiml.losses import count_correct, cross_entropy


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per prediction (per sample, or per token for text)
    accuracy: float  # share of predictions whose arg-max is the target
    samples: int  # predictions counted: samples, or tokens for text


def eval_batch_size(train_batch_size: int) -> int:
    """No gradients are kept, so evaluation can take bigger batches than training."""
    return max(256, train_batch_size)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, split: Samples, world: World,
                   batch_size: int) -> EvalResult | None:
    """Evaluate on `split` across the world (a collective: every rank calls it); None if empty."""
    was_training = model.training
    model.eval()
    totals = np.zeros(3)  # loss sum, correct, samples
    for x, y in eval_shard(split, world.rank, world.size, batch_size):
        logits = model(x)
        totals += (float(cross_entropy(logits, y, reduction="sum")), count_correct(logits, y),
                   y.numel())
    loss_sum, correct, count = world.allreduce_sum(totals)
    model.train(was_training)
    if count == 0:
        return None
    return EvalResult(loss=loss_sum / count, accuracy=correct / count, samples=int(count))
