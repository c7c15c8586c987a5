"""One bad input per check in mpiml/config.py; each message must name the key, the value and
what would be accepted. A new `_require` without a row here fails `test_every_rule_is_tested`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mpiml.config import config_from_dict, load_config, sections
from mpiml.errors import ConfigError

# (section, {key: bad value, plus any keys the combination needs}, culprit key, accepted text)
OUT_OF_RANGE = [
    ("train", {"seed": -1}, "seed", "an integer >= 0"),
    ("train", {"epochs": 0}, "epochs", "an integer >= 1"),
    ("train", {"max_steps": 0}, "max_steps", "null or an integer >= 1"),
    ("train", {"accumulate_steps": 0}, "accumulate_steps", "an integer >= 1"),
    ("train", {"log_every": 0}, "log_every", "an integer >= 1"),
    ("train", {"eval_every_epochs": 0}, "eval_every_epochs", "an integer >= 1"),
    ("train", {"threads": -2}, "threads", "0 (auto) or a positive integer"),
    ("data", {"batch_size": 0}, "batch_size", "an integer >= 1"),
    ("data", {"eval_fraction": 1.0}, "eval_fraction", "a number in [0, 1)"),
    ("data", {"eval_fraction": -0.1}, "eval_fraction", "a number in [0, 1)"),
    ("data", {"split_seed": -5}, "split_seed", "an integer >= 0"),
    ("data", {"samples": 0}, "samples", "an integer >= 1"),
    ("data", {"features": 0}, "features", "an integer >= 1"),
    ("data", {"classes": 1}, "classes", "an integer >= 2"),
    ("data", {"noise": -1.0}, "noise", "a number >= 0"),
    ("data", {"name": "npy", "y_path": "y.npy"}, "x_path",
     "a path to a .npy file when data.name is 'npy'"),
    ("data", {"name": "npy", "x_path": "x.npy"}, "y_path",
     "a path to a .npy file when data.name is 'npy'"),
    ("data", {"name": "npy", "x_path": "x.npy", "y_path": "y.npy", "eval_x_path": "ex.npy"},
     "eval_x_path", "to be given together with data.eval_y_path"),
    ("data", {"x_path": "x.npy"}, "x_path", "null unless data.name is 'npy'"),
    ("data", {"name": "synthetic", "eval_y_path": "ey.npy"}, "eval_y_path",
     "null unless data.name is 'npy' (data.name is 'synthetic')"),
    ("data", {"prefetch": -1}, "prefetch", "an integer >= 0"),
    ("data", {"num_classes": 0}, "num_classes", "null or an integer >= 1"),
    ("data", {"block_size": 0}, "block_size", "an integer >= 1"),
    ("data", {"stride": 0}, "stride", "null or an integer >= 1"),
    ("data", {"name": "npy", "path": "ds", "x_path": "x.npy", "y_path": "y.npy"}, "path",
     "null when data.x_path/data.y_path are given"),
    ("data", {"path": "ds"}, "path", "null unless data.name is 'npy' (data.name is 'digits')"),
    ("data", {"name": "custom"}, "function",
     "'package.module:function' when data.name is 'custom'"),
    ("data", {"name": "custom", "function": "nomodule"}, "function",
     "'package.module:function' when data.name is 'custom'"),
    ("data", {"function": "m:f"}, "function",
     "null, and data.kwargs empty, unless data.name is 'custom' (data.name is 'digits')"),
    ("model", {"name": "resnet9000"}, "name",
     "'mlp', 'cnn', 'resnet', 'transformer' or 'package.module:Class'"),
    ("model", {"name": "pkg.mod:"}, "name",
     "'mlp', 'cnn', 'resnet', 'transformer' or 'package.module:Class'"),
    ("optim", {"lr": 0.0}, "lr", "a number > 0"),
    ("optim", {"lr": -0.1}, "lr", "a number > 0"),
    ("optim", {"momentum": 1.0}, "momentum", "a number in [0, 1)"),
    ("optim", {"weight_decay": -1e-4}, "weight_decay", "a number >= 0"),
    ("optim", {"betas": [0.9, 1.0]}, "betas", "two numbers in [0, 1)"),
    ("optim", {"eps": 0.0}, "eps", "a number > 0"),
    ("optim", {"clip_grad_norm": 0.0}, "clip_grad_norm", "null or a number > 0"),
    ("optim", {"warmup_steps": -1}, "warmup_steps", "an integer >= 0"),
    ("optim", {"step_every": 0}, "step_every", "an integer >= 1"),
    ("optim", {"step_gamma": 0.0}, "step_gamma", "a number in (0, 1]"),
    ("optim", {"step_gamma": 1.5}, "step_gamma", "a number in (0, 1]"),
    ("optim", {"nesterov": True, "momentum": 0.0}, "nesterov",
     "false unless sgd with momentum > 0"),
    ("optim", {"nesterov": True, "name": "adam"}, "nesterov",
     "false unless sgd with momentum > 0"),
    ("comm", {"bucket_mb": 0.0}, "bucket_mb", "a number > 0"),
    ("comm", {"timeout_s": 0.0}, "timeout_s", "null or a number of seconds > 0"),
    ("comm", {"compression": "bf16", "algorithm": "mpi"}, "compression",
     "'none' when comm.algorithm is 'mpi'"),
    ("checkpoint", {"every_steps": 0}, "every_steps", "null or an integer >= 1"),
    ("checkpoint", {"keep": 0}, "keep", "null or an integer >= 1"),
    ("run", {"dir": ""}, "dir", "a non-empty path"),
    ("log", {"lines_every_s": -1.0}, "lines_every_s", "a number >= 0"),
]


@pytest.mark.parametrize("section,values,key,accepted", OUT_OF_RANGE,
                         ids=[f"{s}.{k}={v.get(k)!r}" for s, v, k, _ in OUT_OF_RANGE])
def test_out_of_range_and_impossible_combinations_name_key_value_and_choices(
        section, values, key, accepted):
    with pytest.raises(ConfigError) as err:
        config_from_dict({section: values})
    value = values.get(key)
    if key == "betas":
        value = tuple(value)
    assert f"{section}.{key} = {value!r} is invalid: expected {accepted}" in str(err.value)


def test_every_rule_is_tested():
    """Each constant key named by a `_require(...)` in mpiml/config.py has a bad-input row."""
    tree = ast.parse(Path("mpiml/config.py").read_text())
    checked = {node.args[1].value for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_require"
               and isinstance(node.args[1], ast.Constant)}
    tested = {f"{section}.{key}" for section, _, key, _ in OUT_OF_RANGE}
    assert checked - tested == set(), "add a row to OUT_OF_RANGE for these keys"


# (data, exact fragment): wrong types, choices of a closed set, non-finite numbers
WRONG_TYPE = [
    ({"train": {"epochs": 2.5}}, "train.epochs = 2.5 has the wrong type: expected int"),
    ({"train": {"epochs": True}}, "train.epochs = True has the wrong type: expected int"),
    ({"train": {"max_steps": "10"}},
     "train.max_steps = '10' has the wrong type: expected int or null"),
    ({"data": {"batch_size": "32"}}, "data.batch_size = '32' has the wrong type: expected int"),
    ({"data": {"name": "mnist"}},
     "data.name = 'mnist' is not one of the choices: 'digits', 'synthetic', 'npy'"),
    ({"data": {"x_path": 3}}, "data.x_path = 3 has the wrong type: expected str or null"),
    ({"model": {"kwargs": [1, 2]}}, "model.kwargs = [1, 2] has the wrong type: expected a mapping"),
    ({"model": {"name": None}}, "model.name = None has the wrong type: expected str"),
    ({"optim": {"name": "lbfgs"}},
     "optim.name = 'lbfgs' is not one of the choices: 'sgd', 'adam', 'adamw'"),
    ({"optim": {"lr_scaling": "quadratic"}},
     "optim.lr_scaling = 'quadratic' is not one of the choices: 'none', 'linear', 'sqrt'"),
    ({"optim": {"schedule": "linear"}},
     "optim.schedule = 'linear' is not one of the choices: 'constant', 'cosine', 'step'"),
    ({"optim": {"lr": "fast"}}, "optim.lr = 'fast' has the wrong type: expected float"),
    ({"optim": {"lr": float("inf")}}, "optim.lr = inf is invalid: expected a finite number"),
    ({"optim": {"weight_decay": float("nan")}},
     "optim.weight_decay = nan is invalid: expected a finite number"),
    ({"optim": {"betas": [0.9]}}, "optim.betas = [0.9] has the wrong type: expected a list of 2"),
    ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1] = 'x' has the wrong type: expected float"),
    ({"optim": {"nesterov": "yes"}}, "optim.nesterov = 'yes' has the wrong type: expected bool"),
    ({"comm": {"algorithm": "tree"}},
     "comm.algorithm = 'tree' is not one of the choices: 'auto', 'ring', 'mpi'"),
    ({"comm": {"compression": "int8"}},
     "comm.compression = 'int8' is not one of the choices: 'none', 'fp16', 'bf16'"),
    ({"comm": {"overlap": 1}}, "comm.overlap = 1 has the wrong type: expected bool"),
    ({"checkpoint": {"keep": 1.5}}, "checkpoint.keep = 1.5 has the wrong type"),
    ({"run": {"dir": 7}}, "run.dir = 7 has the wrong type: expected str"),
    ({"log": {"progress": "fancy"}},
     "log.progress = 'fancy' is not one of the choices: 'auto', 'bar', 'lines', 'off'"),
    ({"log": {"tensorboard": "on"}}, "log.tensorboard = 'on' has the wrong type: expected bool"),
    ({"train": 3}, "train must be a mapping of keys to values, got 3"),
]


@pytest.mark.parametrize("data,message", WRONG_TYPE, ids=[m.split(" ")[0] for _, m in WRONG_TYPE])
def test_wrong_types_and_choices_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


@pytest.mark.parametrize("data,message", [
    ({"optim": {"momentun": 0.9}}, "'optim.momentun'. Did you mean 'momentum'?"),
    ({"optimizer": {}}, "'optimizer'. Did you mean 'optim'?"),
    ({"train": {"lr": 0.1}}, "'train.lr'. Did you mean 'optim.lr'?"),  # right key, wrong section
    ({"log": {"tensorbord": True}}, "'log.tensorbord'. Did you mean 'tensorboard'?"),
    ({"data": {"zzz": 1}}, "unknown config key 'data.zzz'. Valid keys here: name, batch_size"),
])
def test_unknown_keys_suggest_the_nearest(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_log_section_is_set_from_the_command_line():
    cfg = load_config(None, ["log.progress=lines", "log.tensorboard=true"])
    assert cfg.log.progress == "lines" and cfg.log.tensorboard is True
    assert list(sections()) == ["train", "data", "model", "optim", "comm", "checkpoint", "run",
                                "log"]
