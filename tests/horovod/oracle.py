"""Rank-dependent inputs every rank can recompute for every other rank, and numpy oracles."""

from __future__ import annotations

import numpy as np
import torch

INT_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def rank_input(rank: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0,
               low: int = -5, high: int = 6) -> torch.Tensor:
    """Deterministic in (rank, seed): any rank can build any other rank's input."""
    gen = torch.Generator().manual_seed(1000 * seed + rank + 1)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    low = max(low, 0) if dtype == torch.uint8 else low
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def all_inputs(size: int, shape, dtype, seed: int = 0, **kw) -> list[torch.Tensor]:
    return [rank_input(r, shape, dtype, seed, **kw) for r in range(size)]


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy() if t.dtype in (torch.bfloat16, torch.float16) \
        else t.numpy()


def reduce_oracle(inputs: list[torch.Tensor], op: str, prescale: float = 1.0,
                  postscale: float = 1.0) -> np.ndarray:
    """What Horovod computes, from every rank's input: float64 for floats; for integers
    int(factor * value) in double precision (truncation toward zero) for every scaling."""
    dtype = inputs[0].dtype
    size = len(inputs)
    if dtype.is_floating_point:
        stack = np.stack([as_np(t).astype(np.float64) * prescale for t in inputs])
    else:
        stack = np.stack([_trunc_scale(t.numpy(), prescale) for t in inputs])
    fn = {"Sum": np.sum, "Average": np.sum, "Min": np.min, "Max": np.max,
          "Product": np.prod}[op]
    out = fn(stack, axis=0)
    if not dtype.is_floating_point:
        out = out.astype(inputs[0].numpy().dtype)  # wraps like the MPI sum in that type
    post = postscale / size if op == "Average" else postscale
    if dtype.is_floating_point:
        return out * post
    return _trunc_scale(out, post)


def _trunc_scale(a: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return a
    return (a.astype(np.float64) * factor).astype(a.dtype)


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.float64: dict(rtol=1e-12, atol=1e-12)}.get(dtype, dict(rtol=0, atol=0))


def assert_matches(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype) -> None:
    assert got.dtype == dtype, (got.dtype, dtype)
    expected = torch.from_numpy(np.asarray(want, dtype=np.float64)).to(dtype) \
        if dtype.is_floating_point else torch.from_numpy(np.asarray(want)).to(dtype)
    torch.testing.assert_close(got, expected.reshape(got.shape), **tolerance(dtype))
