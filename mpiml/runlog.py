"""Rank 0's side effects in one place: console output, `metrics.jsonl`, TensorBoard, the config.

Every rank builds a RunLog; only rank 0's does anything. Callers therefore never write
`if rank == 0` around logging, and no collective ends up inside one. Only values already
reduced across ranks should be recorded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mpiml.progress import Progress, choose_mode
from mpiml.tblog import TensorBoardLog


class RunLog:
    def __init__(self, run_dir: str | Path, enabled: bool, stream: TextIO = sys.stdout) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.stream = stream
        self._metrics: TextIO | None = None
        self._tensorboard: TensorBoardLog | None = None
        self._start = time.time()
        self.records = 0  # lines in metrics.jsonl, earlier runs' included (rank 0 only)
        # Until training starts: messages are plain lines (on rank 0 only).
        self.progress = Progress("off", 0, stream=stream, enabled=enabled)

    def open(self, config_yaml: str, tensorboard: bool = False) -> None:
        """Create the run directory, write the resolved config, open metrics.jsonl for append.

        With `tensorboard`, also open `run_dir/tensorboard/` (a ConfigError naming the install
        command if the package is missing).
        """
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_yaml)
        if tensorboard:
            self._tensorboard = TensorBoardLog(self.run_dir / "tensorboard")
        self._metrics = open(self.run_dir / "metrics.jsonl", "a+", buffering=1)
        self._metrics.seek(0)
        self.records = sum(1 for _ in self._metrics)

    def truncate(self, records: int) -> int:
        """Keep the first `records` lines of metrics.jsonl (a resume redoes what came after).

        Returns how many lines were dropped.
        """
        if self._metrics is None or records >= self.records:
            return 0
        self._metrics.seek(0)
        kept = [next(self._metrics) for _ in range(records)]
        self._metrics.seek(0)
        self._metrics.truncate()
        self._metrics.writelines(kept)
        self._metrics.flush()
        dropped, self.records = self.records - records, records
        return dropped

    def start_progress(self, setting: str, total_steps: int, initial_step: int = 0,
                       lines_every_s: float = 0.0) -> Progress:
        """Begin showing progress ('auto', 'bar', 'lines' or 'off'; see mpiml.progress)."""
        self.progress.close()
        mode = choose_mode(setting, self.stream) if self.enabled else "off"
        self.progress = Progress(mode, total_steps, initial_step, self.stream, self.enabled,
                                 lines_every_s)
        return self.progress

    def print(self, message: str) -> None:
        """One line on rank 0's stdout, printed above the progress bar if one is showing."""
        self.progress.write(message)

    def record(self, **fields: Any) -> None:
        """Append one JSON object to metrics.jsonl (line-buffered, so a crash loses little)."""
        if self.enabled and self._metrics is not None:
            fields.setdefault("time", round(time.time() - self._start, 3))
            self._metrics.write(json.dumps(fields) + "\n")
            self.records += 1
            if self._tensorboard is not None:
                self._tensorboard.write(fields)

    def close(self) -> None:
        self.progress.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
