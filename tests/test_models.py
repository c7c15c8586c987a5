"""Model construction by name, and errors that tell a failing import from a missing one."""

from __future__ import annotations

import pytest
import torch

from mpiml.errors import ConfigError
from mpiml.models import build_model


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("mlp", (12,))])
def test_builtin_models_produce_logits(name, shape):
    model = build_model(name, {}, shape, 10)
    assert model(torch.zeros(4, *shape)).shape == (4, 10)


def test_user_class_with_kwargs():
    model = build_model("torch.nn:Linear", {"in_features": 3, "out_features": 2}, (3,), 2)
    assert isinstance(model, torch.nn.Linear) and model.out_features == 2


@pytest.mark.parametrize("name,kwargs,message", [
    ("nopkg_zz:Net", {}, "no module named 'nopkg_zz'"),
    ("torch.nn:NoSuchLayer", {}, "module 'torch.nn' has no 'NoSuchLayer'"),
    ("mlp", {"depth": 3}, "model.kwargs {'depth': 3} do not fit model 'mlp'"),
    ("cnn", {}, "needs image inputs"),
    ("torch:zeros", {"size": [2]}, "not a torch.nn.Module"),
])
def test_model_errors(name, kwargs, message):
    shape = (12,) if name == "cnn" else (3,)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{")):
        build_model(name, kwargs, shape, 2)


def test_failing_import_is_told_apart(monkeypatch):
    monkeypatch.setenv("MPIML_TESTKIT_BREAK_IMPORT", "1")
    with pytest.raises(ConfigError, match="exists but failed to import: ImportError"):
        build_model("mpiml_testkit:FailOnRank", {}, (3,), 2)
