"""Catch a launcher that does not match the MPI library mpi4py loaded.

The symptom is silent: `srun -n 2` without `--mpi=pmi2`, or `mpiexec` from MPICH with mpi4py on
Open MPI, starts N processes that each see an MPI world of one rank. They all train the whole
dataset alone and all write the same checkpoint. The launcher still tells each process how many
tasks it started, through environment variables; if that number is more than one while MPI says
one, the two disagree and we stop before any work is done.

What the launchers set (measured with Slurm 22.05, MPICH 5.0 and Open MPI 5.0 wheels):

| launcher                          | MPI world | variables each process sees                    |
|-----------------------------------|-----------|------------------------------------------------|
| `srun --mpi=pmi2 -n 2`, MPICH     | 2         | PMI_SIZE=2 PMI_RANK SLURM_STEP_NUM_TASKS=2     |
| `srun -n 2` (no `--mpi`)          | 1 each    | SLURM_STEP_NUM_TASKS=2 SLURM_PROCID, no PMI_*  |
| `srun --mpi=pmi2 -n 2`, Open MPI  | 1 each    | PMI_SIZE=2 (Open MPI 5 only speaks PMIx)       |
| MPICH `mpiexec -n 2` (hydra)      | 2         | PMI_SIZE=2 PMI_RANK MPI_LOCALNRANKS=2          |
| MPICH `mpiexec -n 2`, Open MPI    | 1 each    | PMI_SIZE=2 MPI_LOCALNRANKS=2                   |
| Open MPI `mpirun -n 2`            | 2         | OMPI_COMM_WORLD_SIZE=2 PMIX_RANK               |
| Open MPI `mpirun -n 2`, MPICH     | aborts    | MPICH 5 refuses PMIx itself, before we run     |

Inside an allocation, hydra and prterun start their proxies with `srun` (one task per node), so
the SLURM_* step variables describe the proxies, not the ranks: the launcher's own variables
come first. The batch shell itself has SLURM_NTASKS of the whole allocation but no step; a
process started there without `srun` is a single-process run on purpose, and is not flagged.

This module does not import mpi4py: it reads an environment mapping and a world size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mpiml.errors import CommError

# (variable, who sets it), most specific first: the first one present decides.
TASK_COUNT_VARIABLES: tuple[tuple[str, str], ...] = (
    ("PMI_SIZE", "a PMI launcher (srun --mpi=pmi2, MPICH's mpiexec)"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("MPI_LOCALNRANKS", "MPICH's mpiexec"),
    ("SLURM_STEP_NUM_TASKS", "srun"),
)


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number > 0 else None


def launcher_task_count(environ: Mapping[str, str] = os.environ) -> tuple[int, str] | None:
    """How many processes the launcher says it started, and the variable that says so.

    None when no launcher variable is set (a plain `python` run) or none parses.
    """
    for name, _ in TASK_COUNT_VARIABLES:
        count = _positive_int(environ.get(name))
        if count is not None:
            return count, name
    return None


def _advice(variable: str, mpi_library: str | None) -> str:
    """The launch command that would have worked, given what started us and what mpi4py uses."""
    library = (mpi_library or "").lower()
    if "open mpi" in library:
        fix = "with Open MPI use `srun --mpi=pmix` or Open MPI's own `mpirun`"
    elif "mpich" in library or "intel" in library:
        fix = "with MPICH use `srun --mpi=pmi2` or MPICH's own `mpiexec`"
    else:
        fix = (
            "use `srun --mpi=pmi2` for MPICH or `srun --mpi=pmix` for Open MPI, or the "
            "`mpiexec` of the MPI that mpi4py uses"
        )
    if variable == "SLURM_STEP_NUM_TASKS":
        cause = "The tasks came from srun with no MPI plugin (no --mpi, and MpiDefault=none)"
    elif variable == "OMPI_COMM_WORLD_SIZE":
        cause = "Open MPI's mpirun started the tasks but mpi4py uses another MPI"
    else:
        cause = "A PMI launcher started the tasks but mpi4py's MPI did not join it"
    # "Open MPI v5.0.11, package: ..." -> "Open MPI v5.0.11"; "MPICH Version:   5.0.2\n..." too.
    name = " ".join(mpi_library.splitlines()[0].split(",")[0].split()) if mpi_library else ""
    where = f"mpi4py uses {name}" if name else (
        "check which MPI mpi4py uses with `python -c 'from mpi4py import MPI; "
        "print(MPI.Get_library_version())'`"
    )
    return f"{cause}; {fix} ({where})"


def check_launcher(
    world_size: int,
    environ: Mapping[str, str] = os.environ,
    mpi_library: str | None = None,
) -> None:
    """Raise CommError if MPI sees one rank but the launcher started more than one task.

    `mpi_library` (optional) is `MPI.Get_library_version()`, used to name the right flag.
    Call it on every rank right after MPI starts: each rank of a broken launch sees the same
    world of one, so each raises the same error and no rank waits for another.
    """
    if world_size != 1:
        return
    found = launcher_task_count(environ)
    if found is None or found[0] <= 1:
        return
    count, variable = found
    who = dict(TASK_COUNT_VARIABLES)[variable]
    raise CommError(
        f"MPI sees a world of 1 rank, but {variable}={count} says {who} started {count} "
        f"processes: each would train alone. {_advice(variable, mpi_library)}"
    )


def slurm_cpus_per_task(environ: Mapping[str, str] = os.environ) -> int | None:
    """CPUs Slurm gave each task (SLURM_CPUS_PER_TASK), for torch's thread count; else None."""
    return _positive_int(environ.get("SLURM_CPUS_PER_TASK"))
