"""Rank 0's view of a running job: a progress bar on a terminal, plain lines in a log file.

A bar redraws itself with carriage returns: lovely on a terminal, a single endless line in a
SLURM log. So `log.progress: auto` picks the bar only when the output reaches a terminal.

That is harder to tell than `isatty()` suggests. Under `mpirun` a rank's stdout is a pipe to the
launcher (MPICH's hydra) or a pseudo-terminal the launcher made (Open MPI), whatever the user's
own output is; what the user sees is the *launcher's* stdout. So we walk up the process tree to
the launcher and look at where its stdout goes. Under `srun` the ranks are children of
`slurmstepd`, whose output is a file: lines. With no launcher above us we ask the stream itself.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

# Process names (as in /proc/PID/stat) of launchers whose stdout is what the user sees.
LAUNCHERS = {"mpiexec", "mpirun", "mpiexec.hydra", "orterun", "prterun", "prte"}
# Process names that start ranks for a batch system: their output always goes to a file.
BATCH_DAEMONS = {"slurmstepd", "prted", "orted", "pbs_mom", "lsf_res"}


def _stat(pid: int) -> tuple[str, int]:
    """(process name, parent pid) from /proc; the name may itself hold spaces or parentheses."""
    text = Path(f"/proc/{pid}/stat").read_text()
    name = text[text.index("(") + 1 : text.rindex(")")]
    return name, int(text[text.rindex(")") + 2 :].split()[1])


def _is_terminal_path(path: str) -> bool:
    return path.startswith(("/dev/pts/", "/dev/tty", "/dev/console"))


def launcher_stdout(max_depth: int = 8) -> str | None:
    """Where the nearest launcher ancestor's stdout goes ('' for a batch daemon), or None."""
    try:
        pid = os.getppid()
        for _ in range(max_depth):
            if pid <= 1:
                return None
            name, parent = _stat(pid)
            if name in BATCH_DAEMONS:
                return ""
            if name in LAUNCHERS:
                return os.readlink(f"/proc/{pid}/fd/1")
            pid = parent
    except (OSError, ValueError, IndexError):  # no /proc (macOS), or not ours to read
        return None
    return None


def output_is_terminal(stream: TextIO) -> bool:
    """Whether what we write to `stream` ends up on a terminal a person is looking at."""
    target = launcher_stdout()
    if target is not None:
        return _is_terminal_path(target)
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def choose_mode(setting: str, stream: TextIO) -> str:
    """'bar', 'lines' or 'off' for the `log.progress` setting ('auto' decides by the output)."""
    if setting != "auto":
        return setting
    return "bar" if output_is_terminal(stream) else "lines"


def _terminal_width(default: int = 100) -> int:
    """The launcher's terminal width: our own stdout is a pipe and has none."""
    target = launcher_stdout()
    if target and _is_terminal_path(target):
        try:
            fd = os.open(target, os.O_WRONLY | os.O_NOCTTY)
            try:
                columns = os.get_terminal_size(fd).columns
            finally:
                os.close(fd)
            return columns if columns >= 40 else default  # 0 when the size was never set
        except OSError:
            pass
    try:
        columns = os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return default
    return columns if columns >= 40 else default


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Shows progress in one of three modes; does nothing at all when not `enabled` (rank > 0).

    `advance()` is called after every optimizer step (cheap: the bar redraws at most a few
    times a second); `report()` at each training record with numbers already reduced across
    ranks; `write()` prints a message without tearing the bar.
    """

    def __init__(self, mode: str, total_steps: int, initial_step: int = 0,
                 stream: TextIO | None = None, enabled: bool = True,
                 lines_every_s: float = 0.0) -> None:
        self.mode = mode if enabled else "off"
        self.enabled = enabled
        self.total = total_steps
        self.initial = initial_step
        self.step = initial_step
        self.stream = stream if stream is not None else sys.stdout
        self.lines_every_s = lines_every_s
        self._start = time.perf_counter()
        self._last_line: tuple[float, int] | None = None  # (time, epoch) of the last line
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, file=self.stream,
                             unit="step", ncols=_terminal_width(), mininterval=0.25,
                             dynamic_ncols=False, leave=True, desc="epoch 0")

    def eta_seconds(self) -> float | None:
        done = self.step - self.initial
        if done <= 0:
            return None
        return (self.total - self.step) * (time.perf_counter() - self._start) / done

    def advance(self, step: int, epoch: int) -> None:
        if self._bar is not None:
            self._bar.set_description_str(f"epoch {epoch}", refresh=False)
            self._bar.update(step - self.step)
        self.step = step

    def report(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None:
        self.step = step
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}, {samples_per_s:,.0f} samples/s",
                                      refresh=False)
        elif self.mode == "lines" and self._line_due(epoch, step):
            eta = self.eta_seconds()
            self.write(f"epoch {epoch:>3}  step {step:>6}/{self.total}  loss {loss:.4f}  "
                       f"{samples_per_s:,.0f} samples/s  ETA "
                       + ("?" if eta is None else format_duration(eta)))

    def _line_due(self, epoch: int, step: int) -> bool:
        now = time.perf_counter()
        due = (self._last_line is None or epoch != self._last_line[1] or step >= self.total
               or now - self._last_line[0] >= self.lines_every_s)
        if due:
            self._last_line = (now, epoch)
        return due

    def write(self, message: str) -> None:
        """Print one line (any mode but off on a non-root rank), above the bar if there is one."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
