"""The text dataset and custom datasets from a user's function; one test per bad input."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from mpiml.config import DataConfig
from mpiml.data import ShardedLoader, build_dataset
from mpiml.errors import ConfigError, DataError


def text_cfg(path, **kw) -> DataConfig:
    return DataConfig(name="text", text_path=str(path), **kw)


def test_default_text_ships_with_python():
    ds = build_dataset(DataConfig(name="text", block_size=16, eval_fraction=0.05), 0)
    assert ds.kind == "tokens" and ds.input_shape == (16,)
    assert 60 <= ds.num_classes <= 300 and len(ds.vocab or "") == ds.num_classes
    assert math.log(ds.num_classes) > 4  # the uniform baseline the transformer must beat
    assert len(ds.train) > 10_000


def test_windows_are_shifted_by_one_and_decode_to_the_text(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 5
    (tmp_path / "t.txt").write_text(text)
    ds = build_dataset(text_cfg(tmp_path / "t.txt", block_size=8, stride=3, eval_fraction=0.2), 0)
    x, y = ds.train.take(np.array([0, 2]))
    assert x.dtype == np.int64 and x.shape == (2, 8)
    assert "".join(ds.vocab[i] for i in x[1]) == text[6:14]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert len(ds.train) == (180 - 1 - 8) // 3 + 1 and len(ds.eval) == (45 - 1) // 8
    batch_x, _ = next(ShardedLoader(ds.train, 4, 1, 2, seed=0, prefetch=1).epoch(0))
    assert batch_x.shape == (4, 8)


def test_text_missing_file(tmp_path):
    with pytest.raises(DataError, match=f"data.text_path: no file at {tmp_path / 'no.txt'}"):
        build_dataset(text_cfg(tmp_path / "no.txt"), 0)


def test_text_not_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait\n" * 50)
    with pytest.raises(DataError, match="latin.txt is not UTF-8 text \\(byte 3, line 1"):
        build_dataset(text_cfg(tmp_path / "latin.txt"), 0)


def test_text_too_short_for_a_block(tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="short.txt is too short: 4 characters"):
        build_dataset(text_cfg(tmp_path / "short.txt"), 0)


def test_stdlib_text_missing_from_this_build():
    with pytest.raises(DataError, match="no source file for module 'no_such_text_zz'.*HINT"):
        build_dataset(DataConfig(name="text", text_path="stdlib:no_such_text_zz"), 0)


# -- custom -----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def user_module(tmp_path, monkeypatch):
    """A throwaway `userdata` module on sys.path, as a user's own package would be."""
    (tmp_path / "userdata.py").write_text('''
import numpy as np
import torch

def arrays(n=40, classes=3, bad=None):
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    y = np.arange(n) % classes
    if bad == "shape":
        x = x[:, 0]
    if bad == "rows":
        y = y[:-1]
    if bad == "float":
        y = y.astype(float)
    return torch.from_numpy(x), y

def splits():
    x, y = arrays()
    return {"train": (x, y), "eval": (x[:5], y[:5])}

class Squares(torch.utils.data.Dataset):
    classes = ["even", "odd"]
    def __len__(self):
        return 30
    def __getitem__(self, i):
        return torch.tensor([float(i), float(i * i)]), (i % 2 if i != 29 else 7)

def mapped():
    return Squares()

def unlabelled():
    return [(np.zeros(2), 0)] * 10

def nothing():
    return "not data"

NOT_A_FUNCTION = 3
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("userdata", None)
    yield
    sys.modules.pop("userdata", None)


def custom(fn, **kw) -> DataConfig:
    kwargs = kw.pop("kwargs", {})
    return DataConfig(name="custom", function=f"userdata:{fn}", kwargs=kwargs, **kw)


def test_custom_arrays_are_held_out_and_typed():
    ds = build_dataset(custom("arrays", kwargs={"n": 50}, eval_fraction=0.2), 0)
    assert (len(ds.train), len(ds.eval), ds.input_shape, ds.num_classes) == (40, 10, (2,), 3)
    x, y = ds.train.take(np.array([0, 1]))
    assert x.dtype == np.float32 and y.dtype == np.int64


def test_custom_explicit_splits():
    ds = build_dataset(custom("splits"), 0)
    assert (len(ds.train), len(ds.eval)) == (40, 5)


def test_custom_map_style_dataset_reads_items_per_batch():
    ds = build_dataset(custom("mapped", eval_fraction=0.1), 0)
    assert ds.num_classes == 2 and ds.input_shape == (2,) and len(ds.train) == 27
    x, y = ds.train.take(np.array([0, 3]))
    assert x.dtype == np.float32 and x.shape == (2, 2) and y.dtype == np.int64


def test_custom_map_style_label_out_of_range_names_the_sample():
    ds = build_dataset(custom("mapped", eval_fraction=0.0), 0)
    with pytest.raises(DataError, match="userdata:mapped\\(\\): sample 29 has label 7, out of "
                                        "range for 2 classes"):
        ds.train.take(np.arange(30))


def test_custom_function_import_fails():
    with pytest.raises(ConfigError, match="data.function = 'nouser_zz:f': no module named"):
        build_dataset(DataConfig(name="custom", function="nouser_zz:f"), 0)


def test_custom_function_does_not_exist():
    with pytest.raises(ConfigError, match="module 'userdata' has no 'missing'"):
        build_dataset(custom("missing"), 0)


def test_custom_function_not_callable():
    with pytest.raises(ConfigError, match="'userdata:NOT_A_FUNCTION' is a int, not a function"):
        build_dataset(custom("NOT_A_FUNCTION"), 0)


def test_custom_kwargs_do_not_fit():
    with pytest.raises(ConfigError, match="data.kwargs {'size': 3} do not fit data.function"):
        build_dataset(custom("arrays", kwargs={"size": 3}), 0)


def test_custom_returns_something_else():
    with pytest.raises(DataError, match="userdata:nothing\\(\\) returned a str; expected"):
        build_dataset(custom("nothing"), 0)


def test_custom_x_of_wrong_shape():
    with pytest.raises(DataError, match="userdata:arrays\\(\\): x has shape \\(40,\\)"):
        build_dataset(custom("arrays", kwargs={"bad": "shape"}), 0)


def test_custom_rows_differ():
    with pytest.raises(DataError, match="arrays\\(\\): x has 40 samples but y has 39"):
        build_dataset(custom("arrays", kwargs={"bad": "rows"}), 0)


def test_custom_float_labels():
    with pytest.raises(DataError, match="arrays\\(\\): y has dtype float64; labels must be"):
        build_dataset(custom("arrays", kwargs={"bad": "float"}), 0)


def test_custom_labels_out_of_declared_range():
    with pytest.raises(DataError, match="arrays\\(\\): y holds label 3, out of range for 3"):
        build_dataset(custom("arrays", kwargs={"classes": 4}, num_classes=3), 0)


def test_custom_map_style_without_class_count():
    with pytest.raises(DataError, match="unlabelled\\(\\) is a map-style dataset with no "
                                        "num_classes.*HINT: set data.num_classes"):
        build_dataset(custom("unlabelled"), 0)


def test_custom_needs_a_function():
    with pytest.raises(ConfigError, match="data.function = None is invalid"):
        DataConfig(name="custom")


def test_check_config_builds_the_text_transformer(capsys):
    from mpiml.check_config import main as check_main

    assert check_main(["configs/text_transformer.yaml", "--build", "--set",
                       "model.kwargs={dim: 16, depth: 1, heads: 2}"]) == 0
    assert "model transformer" in capsys.readouterr().out
