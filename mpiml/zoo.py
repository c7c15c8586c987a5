"""The larger built-in models: a small ResNet for images and a small causal transformer for text.

Both avoid batch norm on purpose: its running statistics are per-rank buffers that gradient
averaging never touches, so ranks would drift apart and N ranks would no longer train the same
model as one big-batch process. Group norm and layer norm normalise within a sample instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpiml.errors import ConfigError


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (a 1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                      _norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    """A ResNet for small (C, H, W) images: a 3x3 stem, stages of basic blocks, each stage after
    the first halving the resolution, then global average pooling and a linear classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 widths: Sequence[int] = (16, 32, 64), blocks: int = 1) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"model.name = 'resnet' needs image inputs (channels, height, "
                              f"width); this dataset's inputs have shape {tuple(input_shape)}")
        if not widths or blocks < 1:
            raise ConfigError(f"model.kwargs for 'resnet': widths={list(widths)} and "
                              f"blocks={blocks}; expected at least one width and blocks >= 1")
        widths = [int(w) for w in widths]
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
                                  _norm(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """A GPT-style character model: (batch, T) token ids -> (batch, T, vocab) next-token logits.

    `input_shape` is (T,), the context length; `num_classes` is the vocabulary size. Position
    `t` sees only positions <= t. Dropout defaults to 0 so ranks stay bit-comparable.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, dim: int = 128,
                 depth: int = 4, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ConfigError(f"model.name = 'transformer' needs token sequences (T,); this "
                              f"dataset's inputs have shape {tuple(input_shape)}. HINT: use "
                              "data.name = 'text'")
        if dim % heads:
            raise ConfigError(f"model.kwargs for 'transformer': dim={dim} must be a multiple of "
                              f"heads={heads}")
        self.context = int(input_shape[0])
        self.tokens = nn.Embedding(num_classes, dim)
        self.positions = nn.Embedding(self.context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context {self.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tokens(idx) + self.positions(pos))
        return self.head(self.norm(self.blocks(x)))
