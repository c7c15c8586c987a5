"""SIGTERM and SIGUSR1 ask for a checkpoint and a clean stop; they never kill a rank mid-step.

Slurm sends SIGUSR1 before the time limit (`--signal=B:USR1@N`, forwarded by the batch script)
and SIGTERM on preemption or `scancel`. A handler may run at any point of the loop, possibly on
some ranks only, so it only records the signal. The trainer then agrees on it at the next step
boundary (an allreduce-max of the flag, folded into the per-step agreement): every rank stops
after the same step, rank 0 writes a checkpoint and all ranks exit with `EXIT_REQUEUE` (75).
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal received; `install()` early, `restore()` at the end."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def ignore_from_now(self) -> None:
        """Once the run has ended (finished or checkpointed), a stop signal has nothing left to
        save: ignore it, so one that arrives while the process tears down (torch and MPI take
        a moment, and Python restores the default, fatal action first) cannot turn a finished
        job into one killed by SIGUSR1."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
