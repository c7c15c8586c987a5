"""Optional TensorBoard event files: the same records as metrics.jsonl, as scalars.

TensorBoard is an optional extra (`pip install 'mpiml[tensorboard]'`): it pulls in grpcio, a
web server and a data-server binary (about 50 MB) that a cluster job does not need to train;
metrics.jsonl and `python -m mpiml.plot` work without it. When `log.tensorboard: true` and the
package is missing, the job stops before its first step with the install command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpiml.errors import ConfigError

INSTALL_HINT = "pip install 'mpiml[tensorboard]'  (or: pip install tensorboard)"


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record as TensorBoard tags: eval/*, time/* (the *_ms fields) and train/*."""
    tags: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "epoch", "time") or isinstance(value, bool):
            continue
        if isinstance(value, dict):  # breakdown_ms -> time/breakdown_ms/data, ...
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tags[f"time/{key}/{sub}"] = float(v)
        elif isinstance(value, (int, float)):
            if key.startswith("eval_"):
                tags[f"eval/{key.removeprefix('eval_')}"] = float(value)
            elif key.endswith("_ms"):
                tags[f"time/{key}"] = float(value)
            else:
                tags[f"train/{key}"] = float(value)
    return tags


class TensorBoardLog:
    """Writes each record's numbers to `folder` at the record's step."""

    def __init__(self, folder: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(f"log.tensorboard = True needs the tensorboard package, which is "
                              f"not installed ({err}). HINT: {INSTALL_HINT}, or set "
                              "log.tensorboard: false") from err
        self.folder = Path(folder)
        self._writer = SummaryWriter(log_dir=str(self.folder))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalar_tags(record).items():
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
