"""Datasets and the strided per-rank loader. No MPI here: rank and world size are plain ints."""

from mpiml.data.datasets import build_dataset
from mpiml.data.loader import ShardedLoader, eval_shard
from mpiml.data.samples import Dataset, Samples, Split

__all__ = ["Dataset", "Samples", "Split", "build_dataset", "ShardedLoader", "eval_shard"]
