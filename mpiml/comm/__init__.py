"""Everything that talks MPI lives in this package; the rest of mpiml receives a `World`."""

from mpiml.comm.world import World, build_world

__all__ = ["World", "build_world"]
