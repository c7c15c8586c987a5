"""The loss and accuracy of a batch, for any shape of prediction.

Classes sit on the last axis of the logits: (batch, C) with (batch,) labels for classification,
(batch, T, V) with (batch, T) next tokens for language modelling, where every position counts
as one prediction (the loss is the mean per token, accuracy the share of tokens right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every prediction in the batch, whatever its leading shape."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction=reduction)


def count_correct(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many predictions (samples, or tokens) have their arg-max equal to the target."""
    return int((logits.argmax(-1) == targets).sum())
