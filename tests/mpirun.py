"""Launch real `mpiexec` jobs from ordinary tests, never leaving a hung or orphaned process.

Each job runs in its own session (process group); when the timeout fires the whole group gets
SIGTERM, then SIGKILL, and the test fails with everything the job printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUPPORT = REPO / "tests" / "support"
sys.path.insert(0, str(REPO / "scripts"))  # the scripts' own helpers

import launch  # noqa: E402  (found through the line above)


def mpiexec() -> list[str]:
    """The launcher the benchmark scripts use (`scripts/launch.py`), with its flags."""
    try:
        return list(launch.mpiexec())
    except SystemExit as missing:
        pytest.fail(str(missing))


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def start_mpi(n: int, argv: list[str], env: dict | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
    """Start `mpiexec -n N argv...` in its own process group; the caller must reap it
    (`proc.communicate` with a timeout, then `kill_group` if it fires)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(SUPPORT), str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    cmd = mpiexec() + ["-n", str(n)] + argv
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd or REPO, start_new_session=True)


def run_mpi(n: int, argv: list[str], timeout: float = 120, env: dict | None = None,
            cwd: str | Path | None = None, expect_timeout: bool = False) -> Job:
    """Run `mpiexec -n N argv...`; on timeout kill the whole process group and fail."""
    start = time.monotonic()
    proc = start_mpi(n, argv, env, cwd)
    cmd = proc.args
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = kill_group(proc)
        job = Job(-9, out, err, time.monotonic() - start)
        if expect_timeout:
            return job
        pytest.fail(f"`{' '.join(cmd)}` did not finish within {timeout} s; killed its process "
                    f"group\n{job.output}")
    return Job(proc.returncode, out, err, time.monotonic() - start)


def kill_group(proc: subprocess.Popen) -> tuple[str, str]:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.communicate()


def python() -> str:
    return sys.executable
