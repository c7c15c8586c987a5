"""`python -m mpiml.data convert` and the dataset folders it writes: layout, header checks,
and one test per bad input, each checking that the message names the culprit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpiml.config import DataConfig
from mpiml.data import ShardedLoader, build_dataset
from mpiml.data.__main__ import main as data_main
from mpiml.data.convert import convert
from mpiml.data.npyfile import NpyRows
from mpiml.data.store import SIDECAR
from mpiml.errors import DataError


def write_csv(path, rows, header="a,b,c,label"):
    path.write_text((header + "\n" if header else "") + "\n".join(",".join(map(str, r))
                                                                  for r in rows) + "\n")
    return path


def folder_cfg(folder, **kw) -> DataConfig:
    return DataConfig(name="npy", path=str(folder), **kw)


@pytest.fixture
def dataset(tmp_path):
    """A converted folder of 40 rows, 3 features, labels 0..3 (from a CSV with a header)."""
    rng = np.random.default_rng(0)
    rows = [[*np.round(rng.random(3), 4), i % 4] for i in range(40)]
    convert(write_csv(tmp_path / "data.csv", rows), tmp_path / "ds")
    return tmp_path / "ds", np.array(rows)


def test_csv_round_trip_and_rank_reads_only_its_rows(dataset):
    folder, rows = dataset
    meta = json.loads((folder / SIDECAR).read_text())
    assert (meta["format"], meta["version"], meta["num_classes"]) == ("mpiml-npy", 1, 4)
    assert meta["files"]["train_x"] == {"dtype": "<f4", "shape": [40, 3]}
    ds = build_dataset(folder_cfg(folder, eval_fraction=0.25), 0)
    assert (len(ds.train), len(ds.eval), ds.input_shape, ds.num_classes) == (30, 10, (3,), 4)
    loader = ShardedLoader(ds.train, 4, 0, 2, seed=3)
    x, y = next(loader.epoch(0))
    want = np.sort(loader.indices(0)[:4])
    np.testing.assert_allclose(x.numpy(), rows[want, :3].astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), rows[want, 3])
    assert ds.train.x.bytes_read == 4 * 3 * 4  # one batch of 4 rows, 12 bytes each


def test_named_labels_eval_file_and_cli(tmp_path, capsys):
    write_csv(tmp_path / "tr.csv", [[1, 2, "cat"], [3, 4, "dog"], [5, 6, "cat"]], "u,v,kind")
    write_csv(tmp_path / "ev.csv", [[7, 8, "dog"]], "u,v,kind")
    assert data_main(["convert", str(tmp_path / "tr.csv"), str(tmp_path / "ds"),
                      "--eval", str(tmp_path / "ev.csv"), "--label-column", "kind",
                      "--dtype", "float16"]) == 0
    assert data_main(["info", str(tmp_path / "ds")]) == 0
    assert "headers match" in capsys.readouterr().out
    ds = build_dataset(folder_cfg(tmp_path / "ds"), 0)
    assert ds.num_classes == 2 and len(ds.eval) == 1
    assert json.loads((tmp_path / "ds" / SIDECAR).read_text())["class_names"] == ["cat", "dog"]
    x, y = ds.eval.take(np.array([0]))
    assert x.dtype == np.float32 and x.tolist() == [[7, 8]] and y.tolist() == [1]


def test_npz_with_a_test_split_is_streamed(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.random((70, 2, 3), dtype=np.float32), rng.integers(0, 5, 70)
    np.savez_compressed(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:9], y_test=y[:9])
    convert(tmp_path / "d.npz", tmp_path / "ds")
    ds = build_dataset(folder_cfg(tmp_path / "ds"), 0)
    assert (len(ds.train), len(ds.eval), ds.input_shape) == (70, 9, (2, 3))
    np.testing.assert_array_equal(ds.train.take(np.arange(70))[0], x)


# -- bad inputs: one test each --------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=f"data.path: no folder at {tmp_path / 'nope'}"):
        build_dataset(folder_cfg(tmp_path / "nope"), 0)


def test_folder_without_sidecar(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'ds'} is not an mpiml dataset folder: "
                                        f"{SIDECAR} is missing"):
        build_dataset(folder_cfg(tmp_path / "ds"), 0)


def test_sidecar_from_a_newer_version(dataset):
    folder, _ = dataset
    meta = json.loads((folder / SIDECAR).read_text())
    (folder / SIDECAR).write_text(json.dumps({**meta, "version": 7}))
    with pytest.raises(DataError, match="written by a newer mpiml \\(format version 7\\).*HINT"):
        build_dataset(folder_cfg(folder), 0)


def test_file_changed_after_conversion(dataset):
    folder, _ = dataset
    np.save(folder / "train_x.npy", np.zeros((40, 5), np.float32))
    with pytest.raises(DataError) as err:
        build_dataset(folder_cfg(folder), 0)
    assert f"{folder / 'train_x.npy'} has shape (40, 5)" in str(err.value)
    assert "says shape (40, 3)" in str(err.value) and "HINT: re-create" in str(err.value)


def test_dtype_changed_after_conversion(dataset):
    folder, _ = dataset
    np.save(folder / "train_y.npy", np.zeros(40, np.int32))
    with pytest.raises(DataError, match="train_y.npy has shape \\(40,\\) and dtype <i4 but"):
        build_dataset(folder_cfg(folder), 0)


def test_truncated_file(dataset):
    folder, _ = dataset
    path = folder / "train_x.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{path} is truncated"):
        build_dataset(folder_cfg(folder), 0)


def test_labels_out_of_declared_range(dataset):
    folder, _ = dataset
    with pytest.raises(DataError, match="train_y.npy holds label 3, out of range for 3 classes"):
        build_dataset(folder_cfg(folder, num_classes=3), 0)


def test_fortran_order_file(tmp_path):
    np.save(tmp_path / "x.npy", np.asfortranarray(np.zeros((6, 2), np.float32)))
    np.save(tmp_path / "y.npy", np.zeros(6, np.int64))
    cfg = DataConfig(name="npy", x_path=str(tmp_path / "x.npy"), y_path=str(tmp_path / "y.npy"))
    with pytest.raises(DataError, match="x.npy is stored in Fortran"):
        build_dataset(cfg, 0)


def test_eval_rows_of_another_shape(tmp_path):
    for name, arr in {"x": np.zeros((6, 2)), "y": np.zeros(6, int), "ex": np.zeros((3, 4)),
                      "ey": np.zeros(3, int)}.items():
        np.save(tmp_path / f"{name}.npy", arr)
    cfg = DataConfig(name="npy", x_path=str(tmp_path / "x.npy"), y_path=str(tmp_path / "y.npy"),
                     eval_x_path=str(tmp_path / "ex.npy"), eval_y_path=str(tmp_path / "ey.npy"))
    with pytest.raises(DataError, match="ex.npy rows have shape \\(4,\\) but .*x.npy rows"):
        build_dataset(cfg, 0)


def test_fewer_samples_than_ranks_times_batch_names_the_file(dataset):
    folder, _ = dataset
    ds = build_dataset(folder_cfg(folder, eval_fraction=0.5), 0)
    with pytest.raises(DataError, match=f"{folder / 'train_x.npy'}\\) has 20 samples, fewer "
                                        "than one global batch of 24"):
        ShardedLoader(ds.train, 8, 0, 3, seed=0)


def test_csv_missing(tmp_path):
    with pytest.raises(DataError, match=f"no file at {tmp_path / 'gone.csv'}"):
        convert(tmp_path / "gone.csv", tmp_path / "ds")


def test_csv_ragged_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", [[1, 2, 3, 0], [1, 2, 0]])
    with pytest.raises(DataError, match=f"{path}:3: 3 columns, but the first line has 4"):
        convert(path, tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.converting").exists()


def test_csv_non_numeric_feature(tmp_path):
    path = write_csv(tmp_path / "d.csv", [[1, 2, 3, 0], [1, "x7", 3, 1]])
    with pytest.raises(DataError, match=f"{path}:3: column 2 holds 'x7', not a number"):
        convert(path, tmp_path / "ds")


def test_csv_fractional_label(tmp_path):
    path = write_csv(tmp_path / "d.csv", [[1, 2, 3, 0], [1, 2, 3, 1.5]])
    with pytest.raises(DataError, match=f"{path}: label '1.5' is not an integer"):
        convert(path, tmp_path / "ds")


def test_csv_negative_label(tmp_path):
    path = write_csv(tmp_path / "d.csv", [[1, 2, 3, 0], [1, 2, 3, -2]])
    with pytest.raises(DataError, match=f"{path}: negative label -2"):
        convert(path, tmp_path / "ds")


def test_csv_unknown_label_column(tmp_path):
    path = write_csv(tmp_path / "d.csv", [[1, 2, 3, 0]])
    with pytest.raises(DataError, match=f"{path}: no column named 'klass'"):
        convert(path, tmp_path / "ds", label_column="klass")


def test_npz_without_recognisable_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 2)), answers=np.zeros(3, int))
    with pytest.raises(DataError, match="d.npz holds arrays \\['answers', 'images'\\] but none"):
        convert(tmp_path / "d.npz", tmp_path / "ds")


def test_npz_float_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(DataError, match="d.npz\\[y\\] has shape \\(3,\\) and dtype float64"):
        convert(tmp_path / "d.npz", tmp_path / "ds")


def test_not_an_npz(tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    with pytest.raises(DataError, match="d.npz is not a readable .npz archive"):
        convert(tmp_path / "d.npz", tmp_path / "ds")


def test_output_exists(dataset):
    folder, _ = dataset
    with pytest.raises(DataError, match=f"{folder} already exists; .* --force"):
        convert(folder.parent / "data.csv", folder)
    convert(folder.parent / "data.csv", folder, force=True)


def test_cli_reports_errors_with_exit_2(tmp_path, capsys):
    assert data_main(["info", str(tmp_path)]) == 2
    assert f"{tmp_path} is not an mpiml dataset folder" in capsys.readouterr().err


def test_rows_reader_any_order_and_chunked_reads(tmp_path):
    arr = np.arange(60, dtype=np.int16).reshape(20, 3)
    np.save(tmp_path / "a.npy", arr)
    rows = NpyRows(tmp_path / "a.npy")[2:18]
    np.testing.assert_array_equal(rows[np.array([5, 1, 2, 3, 15])], arr[2:18][[5, 1, 2, 3, 15]])
    np.testing.assert_array_equal(rows.read_range(0, 16), arr[2:18])
    with pytest.raises(IndexError):
        rows[np.array([16])]
