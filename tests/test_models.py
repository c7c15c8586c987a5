"""Model construction by name, and errors that tell a failing import from a missing one."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mpiml.config import BUILTIN_MODELS
from mpiml.errors import ConfigError
from mpiml.losses import cross_entropy
from mpiml.models import BUILTIN, build_model


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("mlp", (12,)),
                                        ("resnet", (1, 8, 8)), ("resnet", (3, 13, 11))])
def test_builtin_models_produce_logits(name, shape):
    model = build_model(name, {}, shape, 10)
    assert model(torch.zeros(4, *shape)).shape == (4, 10)


def test_config_lists_every_builtin():
    assert set(BUILTIN_MODELS) == set(BUILTIN)


def test_transformer_is_causal_and_predicts_every_position():
    torch.manual_seed(0)
    model = build_model("transformer", {"dim": 32, "depth": 2, "heads": 4}, (12,), 20,
                        kind="tokens")
    x = torch.randint(0, 20, (3, 12))
    logits = model(x)
    assert logits.shape == (3, 12, 20)
    changed = x.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 20  # the future must not change the past
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_per_token_loss_and_gradients():
    model = build_model("transformer", {"dim": 16, "depth": 1, "heads": 2}, (6,), 9,
                        kind="tokens")
    x = torch.randint(0, 9, (2, 6))
    loss = cross_entropy(model(x), x)
    loss.backward()
    assert abs(float(loss.detach()) - math.log(9)) < 0.5  # untrained: near the uniform baseline
    assert all(p.grad is not None for p in model.parameters())


def test_user_class_with_kwargs():
    model = build_model("torch.nn:Linear", {"in_features": 3, "out_features": 2}, (3,), 2)
    assert isinstance(model, torch.nn.Linear) and model.out_features == 2


@pytest.mark.parametrize("name,kwargs,message", [
    ("nopkg_zz:Net", {}, "no module named 'nopkg_zz'"),
    ("torch.nn:NoSuchLayer", {}, "module 'torch.nn' has no 'NoSuchLayer'"),
    ("mlp", {"depth": 3}, "model.kwargs {'depth': 3} do not fit model 'mlp'"),
    ("cnn", {}, "needs image inputs"),
    ("torch:zeros", {"size": [2]}, "not a torch.nn.Module"),
    ("resnet", {}, "'resnet' needs image inputs"),
    ("resnet", {"widths": []}, "expected at least one width"),
    ("transformer", {"dim": 30, "heads": 4}, "dim=30 must be a multiple of heads=4"),
])
def test_model_errors(name, kwargs, message):
    shape = {"cnn": (12,), "resnet": (1, 8, 8) if kwargs else (12,)}.get(name, (3,))
    kind = "tokens" if name == "transformer" else "classes"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{")):
        build_model(name, kwargs, shape, 2, kind)


@pytest.mark.parametrize("name,kind,message", [
    ("transformer", "classes", "'transformer' is made for token sequences"),
    ("mlp", "tokens", "'mlp' is made for a label per sample, but this dataset has token "
                      "sequences. HINT: use model.name = one of ['transformer']"),
])
def test_model_made_for_the_other_kind_of_data(name, kind, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model(name, {}, (8,), 5, kind)


def test_failing_import_is_told_apart(monkeypatch):
    monkeypatch.setenv("MPIML_TESTKIT_BREAK_IMPORT", "1")
    with pytest.raises(ConfigError, match="exists but failed to import: ImportError"):
        build_model("mpiml_testkit:FailOnRank", {}, (3,), 2)
