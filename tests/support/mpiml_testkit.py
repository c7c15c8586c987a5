"""Models for tests, named as `model.name: mpiml_testkit:Name` (tests/support on PYTHONPATH)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


def _rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


class FailOnRank(nn.Module):
    """Raises on rank `rank` at its `at_call`-th forward: a bug that hits one rank only."""

    def __init__(self, rank: int = 1, at_call: int = 3, features: int = 32, classes: int = 4):
        super().__init__()
        self.fail_rank, self.at_call, self.calls = rank, at_call, 0
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if _rank() == self.fail_rank and self.calls >= self.at_call:
            raise RuntimeError(f"injected failure in forward call {self.calls}")
        return self.fc(x)


class RankShaped(nn.Module):
    """A model whose width depends on the rank: a layout mismatch that must not hang."""

    def __init__(self, features: int = 32, classes: int = 4):
        super().__init__()
        self.fc = nn.Linear(features, 8 + _rank())
        self.out = nn.Linear(8 + _rank(), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x))


class BrokenImport:  # referenced only to show a failing import is told apart
    pass


class SlowOnRank(nn.Module):
    """A one-hidden-layer MLP whose training forward sleeps on rank `rank`: a straggler."""

    def __init__(self, rank: int = 1, delay_ms: float = 15.0, features: int = 32,
                 classes: int = 4, hidden: int = 16):
        super().__init__()
        self.slow_rank, self.delay = rank, delay_ms / 1e3
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _rank() == self.slow_rank:
            time.sleep(self.delay)
        return self.net(x)


if os.environ.get("MPIML_TESTKIT_BREAK_IMPORT"):
    raise ImportError("testkit import broken on purpose")
