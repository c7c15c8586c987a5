"""Your own dataset and model, named in config as `package.module:name` (see README).

    data:  {name: custom, function: "examples.custom:moons", kwargs: {samples: 2000}}
    model: {name: "examples.custom:MoonNet", kwargs: {hidden: 32}}

`python -m mpiml.train` runs from the repository root, which is on `sys.path`, so
`examples.custom` imports without installing anything; for your own code, make its folder
importable (install it, or add it to PYTHONPATH on every node).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def moons(samples: int = 2000, noise: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles: returns arrays (x of shape (n, 2), integer labels y)."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=samples, noise=noise, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


class Rings(torch.utils.data.Dataset):
    """A map-style dataset: sample i is computed when a batch asks for it, never all at once."""

    num_classes = 3  # how mpiml learns the class count without reading every sample

    def __init__(self, samples: int = 3000, seed: int = 0) -> None:
        self.samples, self.seed = samples, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, i])
        label = i % self.num_classes
        angle = rng.uniform(0, 2 * np.pi)
        radius = 1.0 + label + rng.normal(0, 0.1)
        point = np.array([radius * np.cos(angle), radius * np.sin(angle)], dtype=np.float32)
        return torch.from_numpy(point), label


def rings(samples: int = 3000, seed: int = 0) -> Rings:
    """A function returning a map-style dataset (a torch Dataset)."""
    return Rings(samples, seed)


class MoonNet(nn.Module):
    """Any nn.Module works; mpiml passes only model.kwargs, so give it what it needs."""

    def __init__(self, features: int = 2, classes: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
