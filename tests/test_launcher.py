"""check_launcher against the environments the launchers really set (see mpiml/comm/launcher.py)."""

import pytest

from mpiml.comm.launcher import check_launcher, launcher_task_count, slurm_cpus_per_task
from mpiml.errors import CommError

MPICH = "MPICH Version:      5.0.2\nMPICH Release date: ..."
OPEN_MPI = "Open MPI v5.0.11, package: Open MPI user@localhost Distribution"

# Per-process environments as measured on the local cluster (scripts/slurm/local_cluster.sh).
SRUN_PMI2 = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
             "SLURM_STEP_ID": "0", "PMI_SIZE": "2", "PMI_RANK": "1", "PMI_FD": "13"}
SRUN_PLAIN = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
              "SLURM_STEP_ID": "0"}
HYDRA = {"PMI_SIZE": "2", "PMI_RANK": "0", "PMI_FD": "9", "MPI_LOCALNRANKS": "2"}
# MPICH's mpiexec inside an allocation: hydra's proxy is a one-task srun step.
HYDRA_IN_ALLOCATION = {**HYDRA, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1",
                       "SLURM_STEP_ID": "0"}
OMPI_MPIRUN = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0"}
BATCH_SHELL = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "6"}


@pytest.mark.parametrize("environ", [SRUN_PMI2, HYDRA, HYDRA_IN_ALLOCATION, OMPI_MPIRUN])
def test_matching_launch_passes(environ):
    check_launcher(2, environ)


@pytest.mark.parametrize("environ", [{}, BATCH_SHELL, {"PMI_SIZE": "1"},
                                     {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}])
def test_single_process_runs_pass(environ):
    check_launcher(1, environ)


def test_plain_srun_names_the_mpi_flag():
    with pytest.raises(CommError) as err:
        check_launcher(1, SRUN_PLAIN, mpi_library=MPICH)
    message = str(err.value)
    assert "SLURM_STEP_NUM_TASKS=2" in message
    assert "srun --mpi=pmi2" in message
    assert "mpi4py uses MPICH Version: 5.0.2)" in message


def test_plain_srun_with_open_mpi_suggests_pmix():
    with pytest.raises(CommError, match=r"srun --mpi=pmix.*\(mpi4py uses Open MPI v5\.0\.11\)"):
        check_launcher(1, SRUN_PLAIN, mpi_library=OPEN_MPI)


def test_unknown_library_lists_both_flags():
    with pytest.raises(CommError) as err:
        check_launcher(1, SRUN_PLAIN)
    assert "--mpi=pmi2" in str(err.value) and "--mpi=pmix" in str(err.value)


def test_mpich_mpiexec_with_open_mpi_mpi4py():
    with pytest.raises(CommError, match="PMI_SIZE=2.*Open MPI"):
        check_launcher(1, HYDRA, mpi_library=OPEN_MPI)


def test_srun_pmi2_with_open_mpi_mpi4py():
    with pytest.raises(CommError, match="PMI_SIZE=2.*srun --mpi=pmix"):
        check_launcher(1, SRUN_PMI2, mpi_library=OPEN_MPI)


def test_open_mpi_mpirun_with_other_mpi4py():
    with pytest.raises(CommError, match="OMPI_COMM_WORLD_SIZE=2"):
        check_launcher(1, OMPI_MPIRUN, mpi_library=MPICH)


def test_launcher_variable_beats_slurm_step():
    # hydra under an allocation: SLURM says 1 task (the proxy), PMI says 2 ranks.
    assert launcher_task_count(HYDRA_IN_ALLOCATION) == (2, "PMI_SIZE")
    with pytest.raises(CommError, match="PMI_SIZE=2"):
        check_launcher(1, HYDRA_IN_ALLOCATION)


@pytest.mark.parametrize("value", ["", "two", "0", "-3"])
def test_unparsable_counts_are_ignored(value):
    assert launcher_task_count({"PMI_SIZE": value}) is None
    check_launcher(1, {"PMI_SIZE": value})


def test_slurm_cpus_per_task():
    assert slurm_cpus_per_task({"SLURM_CPUS_PER_TASK": "4"}) == 4
    assert slurm_cpus_per_task({}) is None
    assert slurm_cpus_per_task({"SLURM_CPUS_PER_TASK": "x"}) is None


def test_slurm_cpus_per_task_sets_torch_threads():
    """`--cpus-per-task` counts even where Slurm does not pin (task/none); never above the
    cores we may use, and an explicit train.threads wins."""
    import os

    from mpiml.trainer import threads_per_rank

    usable = len(os.sched_getaffinity(0))
    assert threads_per_rank(local_size=2, requested=0, cpus_per_task=1) == 1
    assert threads_per_rank(local_size=1, requested=0, cpus_per_task=10_000) == usable
    assert threads_per_rank(local_size=2, requested=3, cpus_per_task=1) == 3
