"""Models by name: built-ins (`mlp`, `cnn`, `resnet`, `transformer`) or `package.module:Class`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mpiml.errors import ConfigError
from mpiml.plugins import import_object
from mpiml.zoo import CausalTransformer, ResNet


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


BUILTIN: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet,
                                       "transformer": CausalTransformer}
TOKEN_MODELS = {"transformer"}  # built-ins that take token ids and predict one per position


def build_model(name: str, kwargs: dict[str, Any], input_shape: Sequence[int],
                num_classes: int, kind: str = "classes") -> nn.Module:
    """Built-ins get the dataset's shape and class count; user classes get only `kwargs`.

    `kind` is the dataset's: "classes" (a label per sample) or "tokens" (a target per position);
    a built-in made for the other kind is a config error, not a shape error mid-step.
    """
    if name in BUILTIN:
        if (name in TOKEN_MODELS) != (kind == "tokens"):
            wants = "token sequences (data.name = 'text')" if name in TOKEN_MODELS else \
                "a label per sample"
            fits = sorted(TOKEN_MODELS if kind == "tokens" else set(BUILTIN) - TOKEN_MODELS)
            raise ConfigError(f"model.name = {name!r} is made for {wants}, but this dataset "
                              f"has {'token sequences' if kind == 'tokens' else 'class labels'}."
                              f" HINT: use model.name = one of {fits}, or a "
                              "'package.module:Class'")
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
