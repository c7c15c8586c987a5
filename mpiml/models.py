"""Models by name: the built-in `mlp` and `cnn`, or any `package.module:Class`."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mpiml.errors import ConfigError


class MLP(nn.Module):
    """Flatten, then `hidden` ReLU layers, then a linear classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two 3x3 conv blocks and a linear head: small enough for CPUs, for (C, H, W) inputs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 32,
                 hidden: int = 128) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"model.name = 'cnn' needs image inputs (channels, height, width); "
                              f"this dataset's inputs have shape {tuple(input_shape)}")
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d((max(1, h // 2), max(1, w // 2))),
        )
        flat = 2 * channels * max(1, h // 2) * max(1, w // 2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


BUILTIN = {"mlp": MLP, "cnn": CNN}


def import_object(spec: str, key: str) -> Any:
    """Resolve 'package.module:Name', telling a failing import apart from a missing name."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ConfigError(f"{key} = {spec!r}: no module named '{module_name}' (HINT: is its "
                              "package installed, or its folder on PYTHONPATH?)") from err
        raise ConfigError(f"{key} = {spec!r}: module '{module_name}' exists but failed to import: "
                          f"{type(err).__name__}: {err}") from err
    except Exception as err:
        raise ConfigError(f"{key} = {spec!r}: module '{module_name}' exists but failed to import: "
                          f"{type(err).__name__}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key} = {spec!r}: module '{module_name}' has no '{attr}'") from None


def build_model(name: str, kwargs: dict[str, Any], input_shape: Sequence[int],
                num_classes: int) -> nn.Module:
    """Built-ins get the dataset's shape and class count; user classes get only `kwargs`."""
    if name in BUILTIN:
        factory, args = BUILTIN[name], (tuple(input_shape), num_classes)
    else:
        factory, args = import_object(name, "model.name"), ()
    try:
        model = factory(*args, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs {kwargs!r} do not fit model {name!r}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = {name!r} built a {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model
