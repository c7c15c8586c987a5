# One entry point for a fresh machine: `make train` and `make test` set themselves up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NP     ?= 2
CONFIG ?= configs/digits_mlp.yaml
# The CPU build lies on disk here; a bare `torch` would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
MPI_LOADS := import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; MPI.Get_library_version()

.PHONY: install train test test-slurm lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	@# Use the cluster's MPI when one is on the PATH; otherwise take MPICH from PyPI.
	@if command -v mpiexec >/dev/null 2>&1; then \
		echo "using system MPI: $$(command -v mpiexec)"; \
	else \
		echo "no mpiexec on PATH: installing the mpich wheel"; \
		$(PY) -m pip install --quiet mpich; \
	fi
	$(PY) -m pip install --quiet -e ".[test]" "$(TORCH_PIN)"
	@# An mpiexec on the PATH whose MPI library mpi4py cannot load (another venv's, say): take
	@# MPICH from PyPI after all. Loads the library without MPI_Init (not on a login node).
	@if ! $(PY) -c "$(MPI_LOADS)" >/dev/null 2>&1; then \
		echo "mpi4py cannot load the MPI library behind $$(command -v mpiexec): installing the mpich wheel"; \
		$(PY) -m pip install --quiet mpich; \
		$(PY) -c "$(MPI_LOADS)" || { echo "mpi4py still cannot load an MPI library: put your MPI's lib directory on LD_LIBRARY_PATH, or take mpiexec off the PATH to use the mpich wheel"; exit 1; }; \
	fi
	touch $@

train: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" mpiexec -n $(NP) $(PY) -m mpiml.train $(CONFIG)

test: install
	$(PY) -m ruff check mpiml tests scripts examples
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

# Checkpoint-and-requeue on a real one-node Slurm cluster (needs root or sudo; installs
# slurm-wlm and munge with apt when missing; about a minute).
test-slurm: install
	MPIML_PYTHON="$(CURDIR)/$(PY)" scripts/slurm/test_requeue.sh $(CONFIG)

lint: install
	$(PY) -m ruff check mpiml tests scripts examples

clean:
	rm -rf $(VENV) runs .pytest_cache
