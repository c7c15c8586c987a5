"""Start an mpiexec job from a benchmark script, and never leave it running on its own.

The job runs in a session of its own, so that a timeout can kill every process of it (hydra
killed alone leaves its ranks behind); Ctrl-C or a SIGTERM to the script then has to end the
job too, as neither reaches the job's session by itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def mpiexec() -> tuple[str, ...]:
    """The launcher beside this Python (the venv's mpich wheel), else the one on PATH, with
    the flags Open MPI needs to start more ranks than cores, and as root (containers)."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        raise SystemExit("no mpiexec found: run `make install` or put your MPI's on the PATH")
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        return found, "--oversubscribe", "--allow-run-as-root"
    return (found,)


def run_job(np_: int, argv: list[str], timeout: float = 600) -> str:
    """`mpiexec -n np_ argv...` from the repository, one thread per rank; its stdout.
    Exits with the job's output if it fails or outlives `timeout` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [*mpiexec(), "-n", str(np_), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise SystemExit(f"`{' '.join(cmd)}` ran over {timeout:.0f} s; killed it\n"
                         f"{out}\n{err}") from None
    except BaseException:  # Ctrl-C or SIGTERM
        _kill_group(proc)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` exited with {proc.returncode}\n{out}\n{err}")
    return out


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.killpg(proc.pid, signal.SIGKILL)
