"""Every collective of mpiml.horovod.torch against numpy oracles built from all ranks' inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import (
    FLOAT_TYPES,
    INT_TYPES,
    all_inputs,
    assert_matches,
    rank_input,
    reduce_oracle,
)

import mpiml.horovod.torch as hvd

OPS = {"Sum": hvd.Sum, "Average": hvd.Average, "Min": hvd.Min, "Max": hvd.Max,
       "Product": hvd.Product}
REDUCIBLE = INT_TYPES + FLOAT_TYPES
SHAPE = (3, 5)  # 15 elements: odd, and more than the world size
# Up to 256 bytes travel with the signature and are reduced locally; larger ones go to MPI.
SHAPES = {"small": SHAPE, "large": (41, 7)}


def test_basics():
    n, r = hvd.size(), hvd.rank()
    assert hvd.is_initialized() and 0 <= r < n
    assert hvd.local_size() == n and hvd.local_rank() == r  # one node here
    assert hvd.cross_size() == 1 and hvd.cross_rank() == 0
    assert hvd.is_homogeneous()
    assert hvd.mpi_enabled() and hvd.mpi_built() and hvd.mpi_threads_supported()
    assert not (hvd.gloo_enabled() or hvd.gloo_built() or hvd.nccl_built() or hvd.cuda_built())
    assert (hvd.Average, hvd.Sum, hvd.Adasum, hvd.Min, hvd.Max, hvd.Product) == (0, 1, 2, 3, 4, 5)


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("dtype", REDUCIBLE, ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_allreduce_every_op_and_dtype(op, dtype, size):
    inputs = all_inputs(hvd.size(), SHAPES[size], dtype, seed=1)
    mine = inputs[hvd.rank()].clone()
    got = hvd.allreduce(mine, op=OPS[op])
    assert torch.equal(mine, inputs[hvd.rank()])  # out of place: input untouched
    assert_matches(got, reduce_oracle(inputs, op), dtype)


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float16, torch.uint8],
                         ids=str)
def test_prescale_and_postscale(dtype, size):
    inputs = all_inputs(hvd.size(), SHAPES[size], dtype, seed=2)
    for op in ("Sum", "Average"):
        got = hvd.allreduce(inputs[hvd.rank()], op=OPS[op], prescale_factor=0.5,
                            postscale_factor=3.0)
        assert_matches(got, reduce_oracle(inputs, op, 0.5, 3.0), dtype)


@pytest.mark.parametrize("dtype,shape", [(torch.float64, (70_001,)),   # 560 KB: staged
                                         (torch.float32, (300, 1001))])  # 1.2 MB: tuned
def test_large_float_allreduce_through_mpimls_allreducer(dtype, shape):
    """Float buffers from 128 KiB go through an `Allreducer` (staged, or timed against the
    ring): thirty calls, past its tuning round (up to 3 algorithms x 9 calls), each against
    the oracle."""
    for call in range(30):
        inputs = all_inputs(hvd.size(), shape, dtype, seed=100 + call)
        op = ("Sum", "Average")[call % 2]
        assert_matches(hvd.allreduce(inputs[hvd.rank()], op=OPS[op]),
                       reduce_oracle(inputs, op), dtype)


def test_integer_average_truncates_toward_zero_as_horovod():
    n, r = hvd.size(), hvd.rank()
    mine = torch.tensor([r + 1, -(r + 1), 7 * r, 0], dtype=torch.int64)
    got = hvd.allreduce(mine, op=hvd.Average)
    s = n * (n + 1) // 2
    want = [int(s / n), -int(s / n), int(7 * (n * (n - 1) // 2) / n), 0]
    assert got.tolist() == want
    if n == 2:
        assert got.tolist() == [1, -1, 3, 0]  # 3/2 -> 1, -3/2 -> -1, 7/2 -> 3


def test_average_is_the_default_and_average_flag_is_deprecated():
    inputs = all_inputs(hvd.size(), (4,), torch.float64, seed=3)
    assert_matches(hvd.allreduce(inputs[hvd.rank()]), reduce_oracle(inputs, "Average"),
                   torch.float64)
    with pytest.warns(DeprecationWarning):
        got = hvd.allreduce(inputs[hvd.rank()], average=False)
    assert_matches(got, reduce_oracle(inputs, "Sum"), torch.float64)
    with pytest.raises(ValueError, match="supersedes"):
        hvd.allreduce(inputs[hvd.rank()], average=True, op=hvd.Sum)
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.allreduce(inputs[hvd.rank()], op=hvd.Adasum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.bfloat16], ids=str)
def test_in_place_async_poll_and_synchronize(dtype):
    inputs = all_inputs(hvd.size(), SHAPE, dtype, seed=4)
    want = reduce_oracle(inputs, "Sum")
    t = inputs[hvd.rank()].clone()
    assert_matches(hvd.allreduce_(t, op=hvd.Sum), want, dtype)
    assert_matches(t, want, dtype)

    t = inputs[hvd.rank()].clone()
    handle = hvd.allreduce_async_(t, op=hvd.Sum)
    out = hvd.synchronize(handle)
    assert out is t
    assert_matches(t, want, dtype)

    src = inputs[hvd.rank()].clone()
    handles = [hvd.allreduce_async(src, op=hvd.Sum, name=f"async.{i}") for i in range(4)]
    while not all(hvd.poll(h) for h in handles):
        pass
    for h in handles:
        assert_matches(hvd.synchronize(h), want, dtype)
    assert torch.equal(src, inputs[hvd.rank()])
    assert hvd.synchronize(handles[0]) is None  # already synchronized: Horovod returns None
    with pytest.raises(ValueError, match="not created"):
        hvd.poll(handles[0])


def test_async_ops_of_every_kind_complete_in_order():
    n, r = hvd.size(), hvd.rank()
    a = rank_input(r, (6,), torch.float32, seed=5)
    b = torch.arange(r + 1, dtype=torch.int32).view(-1, 1)
    c = torch.full((2,), float(r))
    h1 = hvd.allreduce_async(a, op=hvd.Max)
    h2 = hvd.allgather_async(b)
    h3 = hvd.broadcast_async(c, n - 1)
    h4 = hvd.broadcast_async_(c, 0)
    h5 = hvd.alltoall_async(torch.arange(2 * n, dtype=torch.float32) + 100 * r)
    h6 = hvd.reducescatter_async(torch.ones(n + 1, 2), op=hvd.Sum)
    assert_matches(hvd.synchronize(h1),
                   reduce_oracle(all_inputs(n, (6,), torch.float32, seed=5), "Max"),
                   torch.float32)
    assert hvd.synchronize(h2).view(-1).tolist() == [i for k in range(n) for i in range(k + 1)]
    assert hvd.synchronize(h3).tolist() == [float(n - 1)] * 2
    assert hvd.synchronize(h4).tolist() == [0.0, 0.0] and c.tolist() == [0.0, 0.0]
    out, received = hvd.synchronize(h5)
    assert out.tolist() == [float(2 * r + j + 100 * s) for s in range(n) for j in range(2)]
    assert received.dtype == torch.int32 and received.tolist() == [2] * n
    rows = (n + 1) // n + (1 if r < (n + 1) % n else 0)
    assert hvd.synchronize(h6).tolist() == [[float(n)] * 2] * rows


@pytest.mark.parametrize("in_place", [False, True])
def test_grouped_allreduce_mixed_dtypes(in_place):
    n, r = hvd.size(), hvd.rank()
    specs = [((3,), torch.float32), ((2, 2), torch.int32), ((5,), torch.float64), ((1,),
             torch.float32)]
    everyone = [[rank_input(k, s, d, seed=6 + i) for i, (s, d) in enumerate(specs)]
                for k in range(n)]
    mine = [t.clone() for t in everyone[r]]
    if in_place:
        got = hvd.grouped_allreduce_(mine, op=hvd.Sum)
        assert all(g is m for g, m in zip(got, mine, strict=True))
    else:
        got = hvd.synchronize(hvd.grouped_allreduce_async(mine, op=hvd.Sum))
    for i, (_, dtype) in enumerate(specs):
        assert_matches(got[i], reduce_oracle([e[i] for e in everyone], "Sum"), dtype)
    avg = hvd.grouped_allreduce(everyone[r])
    for i, (_, dtype) in enumerate(specs):
        assert_matches(avg[i], reduce_oracle([e[i] for e in everyone], "Average"), dtype)


def test_compression_fp16_in_allreduce():
    inputs = all_inputs(hvd.size(), (64,), torch.float32, seed=7)
    got = hvd.allreduce(inputs[hvd.rank()], op=hvd.Sum, compression=hvd.Compression.fp16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(reduce_oracle(inputs, "Sum")).float(),
                               rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize("op", ["Sum", "Average"])
def test_gradient_through_allreduce_is_the_reduced_gradient(op):
    """L = sum over ranks of (w_r * allreduce(x)).sum(): dL/dx_r = reduce over s of w_s."""
    n, r = hvd.size(), hvd.rank()
    x = rank_input(r, (4,), torch.float64, seed=8).requires_grad_()
    w = all_inputs(n, (4,), torch.float64, seed=9)
    y = hvd.allreduce(x, op=OPS[op])
    (y * w[r]).sum().backward()
    want = sum(w) / (n if op == "Average" else 1)
    torch.testing.assert_close(x.grad, want)


def test_gradient_through_grouped_allreduce():
    n, r = hvd.size(), hvd.rank()
    xs = [rank_input(r, (3,), torch.float64, seed=10 + i).requires_grad_() for i in range(2)]
    ys = hvd.grouped_allreduce(xs, op=hvd.Sum)
    (ys[0] * 2 + ys[1] * (r + 1)).sum().backward()
    torch.testing.assert_close(xs[0].grad, torch.full((3,), 2.0 * n, dtype=torch.float64))
    torch.testing.assert_close(xs[1].grad,
                               torch.full((3,), n * (n + 1) / 2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", REDUCIBLE + (torch.bool,), ids=str)
def test_allgather_with_different_first_dimensions(dtype):
    n, r = hvd.size(), hvd.rank()
    everyone = [rank_input(k, (k + 1, 2, 3), dtype, seed=11) for k in range(n)]
    got = hvd.allgather(everyone[r])
    assert got.dtype == dtype and torch.equal(got, torch.cat(everyone))
    got = hvd.grouped_allgather([everyone[r], everyone[r][:1].to(torch.float64)])
    assert torch.equal(got[0], torch.cat(everyone))
    assert torch.equal(got[1], torch.cat([e[:1].to(torch.float64) for e in everyone]))


def test_allgather_zero_rows_on_some_ranks():
    n, r = hvd.size(), hvd.rank()
    mine = torch.full((r % 2, 3), float(r))
    got = hvd.allgather(mine)
    assert torch.equal(got, torch.cat([torch.full((k % 2, 3), float(k)) for k in range(n)]))


def test_gradient_through_allgather():
    """Each rank's rows get the average over ranks of the gradient flowing into them."""
    n, r = hvd.size(), hvd.rank()
    x = rank_input(r, (r + 1, 2), torch.float64, seed=12).requires_grad_()
    total = n * (n + 1) // 2
    weights = [rank_input(k, (total, 2), torch.float64, seed=13) for k in range(n)]
    (hvd.allgather(x) * weights[r]).sum().backward()
    offset = r * (r + 1) // 2
    want = sum(weights)[offset:offset + r + 1] / n
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.bfloat16, torch.bool,
                                   torch.uint8, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 3), (30, 11)])
def test_broadcast_from_every_root(dtype, shape):
    n, r = hvd.size(), hvd.rank()
    for root in range(n):
        everyone = all_inputs(n, shape, dtype, seed=14 + root)
        mine = everyone[r].clone()
        out = hvd.broadcast(mine, root)
        assert torch.equal(out, everyone[root]) and torch.equal(mine, everyone[r])
        hvd.broadcast_(mine, root_rank=root)
        assert torch.equal(mine, everyone[root])
        mine = everyone[r].clone()
        assert torch.equal(hvd.synchronize(hvd.broadcast_async(mine, root)), everyone[root])


def test_broadcast_of_a_non_contiguous_tensor_in_place():
    n, r = hvd.size(), hvd.rank()
    base = torch.full((4, 4), float(r))
    view = base.t()[1:3]
    hvd.broadcast_(view, n - 1)
    assert torch.equal(base.t()[1:3], torch.full((2, 4), float(n - 1)))
    assert (base.t()[0] == r).all()


def test_gradient_through_broadcast():
    n, r = hvd.size(), hvd.rank()
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    (hvd.broadcast(x, 0) * (r + 1)).sum().backward()
    want = (n + 1) / 2 if r == 0 else 0.0
    torch.testing.assert_close(x.grad, torch.full((3,), want, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.float16], ids=str)
def test_alltoall_with_splits(dtype):
    n, r = hvd.size(), hvd.rank()

    def splits_of(k: int) -> list[int]:
        return [(k + d) % 3 for d in range(n)]  # includes zero-row messages

    def tensor_of(k: int) -> torch.Tensor:
        rows = sum(splits_of(k))
        return (torch.arange(rows * 2).view(rows, 2) + 1000 * k).to(dtype)

    out, received = hvd.alltoall(tensor_of(r), splits=splits_of(r))
    pieces = []
    for k in range(n):
        start = sum(splits_of(k)[:r])
        pieces.append(tensor_of(k)[start:start + splits_of(k)[r]])
    assert torch.equal(out, torch.cat(pieces))
    assert received.tolist() == [splits_of(k)[r] for k in range(n)]
    out2, received2 = hvd.alltoall(tensor_of(r), splits=torch.tensor(splits_of(r)))
    assert torch.equal(out2, out) and torch.equal(received2, received)


def test_alltoall_equal_split_and_gradient():
    n, r = hvd.size(), hvd.rank()
    x = (torch.arange(2 * n, dtype=torch.float64) + 10 * r).requires_grad_()
    out = hvd.alltoall(x)
    assert out.tolist() == [float(2 * r + j + 10 * k) for k in range(n) for j in range(2)]
    (out * (torch.arange(2 * n) + 1)).sum().backward()
    # Row j*? of x went to rank j // 2 at position 2*r + j % 2: its gradient is that weight.
    want = [float(2 * r + j % 2 + 1) for j in range(2 * n)]
    assert x.grad.tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["Sum", "Average", "Max"])
def test_reducescatter_uneven_rows(dtype, op):
    n, r = hvd.size(), hvd.rank()
    rows = 2 * n + 1
    inputs = all_inputs(n, (rows, 3), dtype, seed=15)
    full = reduce_oracle(inputs, op)
    counts = [rows // n + (1 if k < rows % n else 0) for k in range(n)]
    start = sum(counts[:r])
    got = hvd.reducescatter(inputs[r], op=OPS[op])
    assert got.shape == (counts[r], 3)
    assert_matches(got, full[start:start + counts[r]], dtype)


def test_reducescatter_fewer_rows_than_ranks_and_grouped():
    n, r = hvd.size(), hvd.rank()
    got = hvd.reducescatter(torch.ones(1, 2) * (r + 1), op=hvd.Sum)
    want_rows = 1 if r == 0 else 0
    assert got.shape == (want_rows, 2)
    if want_rows:
        assert got.tolist() == [[n * (n + 1) / 2] * 2]
    a, b = hvd.grouped_reducescatter([torch.ones(n, 1), torch.ones(2 * n) * r], op=hvd.Sum)
    assert a.tolist() == [[float(n)]] and b.tolist() == [float(n * (n - 1) / 2)] * 2


def test_gradient_through_reducescatter():
    n, r = hvd.size(), hvd.rank()
    x = torch.ones(n, 2, dtype=torch.float64, requires_grad=True)
    (hvd.reducescatter(x, op=hvd.Average) * (r + 1)).sum().backward()
    want = torch.tensor([[k + 1.0] * 2 for k in range(n)], dtype=torch.float64) / n
    torch.testing.assert_close(x.grad, want)


def test_barrier_and_join_with_uneven_work():
    """Rank r has r + 1 batches; joined ranks contribute zeros to the others' allreduces."""
    n, r = hvd.size(), hvd.rank()
    hvd.barrier()
    for step in range(r + 1):
        got = hvd.allreduce(torch.ones(3), op=hvd.Sum)
        active = sum(1 for k in range(n) if step < k + 1)
        assert got.tolist() == [float(active)] * 3
        avg = hvd.allreduce(torch.ones(2, dtype=torch.float64))
        assert avg.tolist() == [active / n] * 2  # Average divides by every rank, as Horovod
    assert hvd.join() == n - 1
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == n  # all back to normal


def test_object_collectives():
    n, r = hvd.size(), hvd.rank()
    for root in range(n):
        obj = {"rank": r, "payload": list(range(r + 3)), "nested": ("x" * r, {r: r})}
        got = hvd.broadcast_object(obj if r == root else None, root_rank=root)
        assert got == {"rank": root, "payload": list(range(root + 3)),
                       "nested": ("x" * root, {root: root})}
    gathered = hvd.allgather_object({"r": r, "arr": np.arange(r)})
    assert [g["r"] for g in gathered] == list(range(n))
    assert all(np.array_equal(g["arr"], np.arange(k)) for k, g in enumerate(gathered))
