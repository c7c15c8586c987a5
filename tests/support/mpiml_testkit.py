"""Models for tests, named as `model.name: mpiml_testkit:Name` (tests/support on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
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


class Faulty(nn.Module):
    """A small MLP with one injected fault on rank `rank` at its `at_call`-th forward call.

    fault: none | raise | sigkill | sigstop | stall | nan | sigusr1. `nan` poisons that one
    call's output; `sigusr1` sends the signal to this rank only (the others must still agree).
    """

    def __init__(self, features: int = 12, classes: int = 3, hidden: int = 16,
                 fault: str = "none", rank: int = 1, at_call: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))
        self.fault, self.fault_rank, self.at_call, self.calls = fault, rank, at_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.net(x)
        if self.fault == "none" or self.calls != self.at_call or _rank() != self.fault_rank:
            return out
        if os.environ.get("MPIML_FAULT_MARK"):  # when the fault struck, for latency checks
            with open(os.environ["MPIML_FAULT_MARK"], "w") as f:
                f.write(repr(time.time()))
        if self.fault == "raise":
            raise RuntimeError(f"injected failure in forward call {self.calls}")
        if self.fault == "nan":
            return out * float("nan")
        if self.fault == "stall":
            time.sleep(3600)
        sig = {"sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP,
               "sigusr1": signal.SIGUSR1}[self.fault]
        os.kill(os.getpid(), sig)
        return out


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
