"""Horovod's PyTorch API on mpiml: change `import horovod.torch as hvd` to
`import mpiml.horovod.torch as hvd` and run the script under `mpirun` or `srun`.

Nothing is compiled and Horovod need not be installed: collectives run on mpi4py through
`mpiml.comm.engine` (ordered, checked across ranks) and mpiml's own allreduce. See the README
section "Horovod scripts" for what is supported and what is not.
"""
