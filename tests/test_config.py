"""Config: closed, typed, validated; overrides parsed as YAML."""

from __future__ import annotations

import pytest

from mpiml.config import Config, config_from_dict, dump_config, load_config
from mpiml.errors import ConfigError


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = load_config("configs/digits_mlp.yaml", ["optim.lr=0.2", "model.kwargs={hidden: [8]}"])
    assert cfg.optim.lr == 0.2 and cfg.model.kwargs == {"hidden": [8]}
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_ints_are_accepted_for_floats_but_not_bools_for_ints():
    assert config_from_dict({"optim": {"lr": 1}}).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs = True has the wrong type"):
        config_from_dict({"train": {"epochs": True}})


@pytest.mark.parametrize("data,message", [
    ({"optim": {"momentun": 0.9}}, "unknown config key 'optim.momentun'. Did you mean 'momentum'?"),
    ({"optimizer": {}}, "unknown config key 'optimizer'. Did you mean 'optim'?"),
    ({"train": {"max_steps": 0}}, "train.max_steps = 0 is invalid"),
    ({"data": {"name": "mnist"}}, "data.name = 'mnist' is not one of the choices: 'digits'"),
    ({"data": {"name": "npy"}}, "data.x_path = None is invalid"),
    ({"optim": {"betas": [0.9]}}, "optim.betas = [0.9] has the wrong type"),
    ({"optim": {"nesterov": True, "momentum": 0.0}}, "optim.nesterov = True is invalid"),
    ({"train": 3}, "train must be a mapping"),
])
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.optim.lr = 3  # type: ignore[misc]


@pytest.mark.parametrize("assignment,message", [
    ("optim.lr", "expected section.key=value"),
    ("optim.lr=[", "not valid YAML"),
    ("optim.lr.x=1", "'lr' is not a section"),
])
def test_bad_overrides(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [assignment] if "lr.x" not in assignment else ["optim.lr=1", assignment])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
