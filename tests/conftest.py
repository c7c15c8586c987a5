"""Shared fixtures. MPI jobs are launched through tests/mpirun.py, always under a timeout."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "support"))
