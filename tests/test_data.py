"""Datasets and the strided loader (no MPI: rank and world size are plain numbers)."""

from __future__ import annotations

import numpy as np
import pytest

from mpiml.config import DataConfig
from mpiml.data import ShardedLoader, Split, build_dataset, eval_shard
from mpiml.errors import DataError


def split(n: int) -> Split:
    return Split(np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n) % 3)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_union_of_rank_batches_is_the_big_batch(world_size):
    data, b = split(103), 5
    big = ShardedLoader(data, b * world_size, 0, 1, seed=7)
    ranks = [ShardedLoader(data, b, r, world_size, seed=7) for r in range(world_size)]
    assert all(r.steps_per_epoch == big.steps_per_epoch for r in ranks)
    for epoch in (0, 1):
        want = big.indices(epoch).reshape(big.steps_per_epoch, -1)
        got = [r.indices(epoch).reshape(r.steps_per_epoch, b) for r in ranks]
        for t in range(big.steps_per_epoch):
            assert sorted(np.concatenate([g[t] for g in got])) == sorted(want[t])
    assert not np.array_equal(big.indices(0), big.indices(1)), "epochs must reshuffle"


def test_batches_are_tensors_of_the_right_rows():
    data = split(40)
    loader = ShardedLoader(data, 4, 1, 2, seed=0)
    (x, y), idx = next(loader.epoch(0)), np.sort(loader.indices(0)[:4])
    assert x.shape == (4, 2) and x.dtype.is_floating_point
    np.testing.assert_array_equal(y.numpy(), idx % 3)
    np.testing.assert_array_equal(x[:, 0].numpy(), idx * 2)
    assert len(list(loader.epoch(0, start_step=3))) == loader.steps_per_epoch - 3


def test_eval_shards_cover_every_sample_once():
    data = split(29)
    seen = [int(v) for r in range(3) for _, y in eval_shard(data, r, 3, 4) for v in y]
    assert len(seen) == 29


def test_too_few_samples_for_one_global_batch():
    with pytest.raises(DataError, match="fewer than one global batch of 12"):
        ShardedLoader(split(10), 4, 0, 3, seed=0)


def test_digits_is_real_and_held_out():
    ds = build_dataset(DataConfig(), seed=0)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.train) + len(ds.eval) == 1797 and abs(len(ds.eval) - 359) <= 1
    assert 0.0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1.0


def test_synthetic_is_deterministic_from_the_seed():
    cfg = DataConfig(name="synthetic", samples=50, features=3, classes=2)
    a, b, c = (build_dataset(cfg, s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert not np.array_equal(a.train.x, c.train.x)


def test_npy_pair_reads_only_the_rows_of_each_batch(tmp_path):
    x = np.random.default_rng(0).random((50, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(50) % 5)
    cfg = DataConfig(name="npy", x_path=str(tmp_path / "x.npy"), y_path=str(tmp_path / "y.npy"),
                     eval_fraction=0.2)
    ds = build_dataset(cfg, 0)
    assert (len(ds.train), len(ds.eval), ds.num_classes, ds.input_shape) == (40, 10, 5, (4,))
    loader = ShardedLoader(ds.train, 3, 1, 2, seed=0)
    before = ds.train.x.bytes_read
    batches = list(loader.epoch(0))
    rows = np.sort(loader.indices(0).reshape(-1, 3), axis=1).reshape(-1)
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in batches]), x[rows])
    # Rank 1 of 2 read exactly its own rows, 16 bytes each, and nothing else.
    assert ds.train.x.bytes_read - before == len(rows) * 16 == 6 * 3 * 16


@pytest.mark.parametrize("x,y,message", [
    (None, np.zeros(5, np.int64), "data.x_path: no file at"),
    (np.zeros((5, 2), np.float32), np.zeros(4, np.int64), "x.npy has 5 samples but data.y_path"),
    (np.zeros((5, 2), np.float32), np.zeros(5, np.float32), "labels must be integers"),
    (np.zeros((5, 2), np.float32), -np.ones(5, np.int64), "negative labels"),
    (np.zeros(5, np.float32), np.zeros(5, np.int64), "at least 2 dimensions"),
])
def test_bad_npy_files_name_the_file(tmp_path, x, y, message):
    if x is not None:
        np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    cfg = DataConfig(name="npy", x_path=str(tmp_path / "x.npy"), y_path=str(tmp_path / "y.npy"))
    with pytest.raises(DataError, match=message):
        build_dataset(cfg, 0)


def test_a_file_that_is_not_npy(tmp_path):
    (tmp_path / "x.npy").write_text("not numpy")
    np.save(tmp_path / "y.npy", np.zeros(3, np.int64))
    cfg = DataConfig(name="npy", x_path=str(tmp_path / "x.npy"), y_path=str(tmp_path / "y.npy"))
    with pytest.raises(DataError, match="is not a readable .npy file"):
        build_dataset(cfg, 0)
