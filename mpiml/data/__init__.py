"""Datasets and the strided per-rank loader. No MPI here: rank and world size are plain ints."""

from mpiml.data.datasets import Dataset, Split, build_dataset
from mpiml.data.loader import ShardedLoader, eval_shard

__all__ = ["Dataset", "Split", "build_dataset", "ShardedLoader", "eval_shard"]
