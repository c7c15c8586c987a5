"""Rank 0's side effects in one place: console lines, `metrics.jsonl`, the resolved config.

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


class RunLog:
    def __init__(self, run_dir: str | Path, enabled: bool, stream: TextIO = sys.stdout) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.stream = stream
        self._metrics: TextIO | None = None
        self._start = time.time()
        self.records = 0  # lines in metrics.jsonl, earlier runs' included (rank 0 only)

    def open(self, config_yaml: str) -> None:
        """Create the run directory, write the resolved config, open metrics.jsonl for append."""
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_yaml)
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

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def record(self, **fields: Any) -> None:
        """Append one JSON object to metrics.jsonl (line-buffered, so a crash loses little)."""
        if self.enabled and self._metrics is not None:
            fields.setdefault("time", round(time.time() - self._start, 3))
            self._metrics.write(json.dumps(fields) + "\n")
            self.records += 1

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
