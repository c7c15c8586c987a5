"""Allreduce side by side: mpiml's Allreducer, MPI's own Allreduce and torch.distributed gloo.

    mpiexec -n 2 python scripts/bench_allreduce.py [--sizes 4K,64K,1M] [--repeats 50]
        [--out bench.json] [--ring-segments 256K,1M] [--no-gloo]

For each float32 size, every candidate runs on the *same* preallocated buffer (gloo through a
torch view of it), interleaved within each repeat in a random order (the same on every rank)
so that background load hits all of them alike. A repeat is: barrier, time one call on every
rank, keep the slowest rank's time. Reported: the median over repeats (after warmup),
algorithm bandwidth (bytes / time), bus bandwidth (algbw * 2(N-1)/N, the per-link traffic of
a ring) and the ratios
mpiml/MPI and mpiml/gloo (< 1 means mpiml is faster). "mpiml" is the `Allreducer` as callers
get it (``algorithm="auto"``); "mpiml_ring" and "mpiml_staged" (when every rank shares one
node) force one algorithm at every size. "mpiml_shared" (when the ranks share
nodes, see `mpiml/comm/shm.py`) is the path gradients take under `comm.algorithm: auto`: a
bucket that lives in node-shared memory, averaged in place (it includes the division); it
cannot take an arbitrary buffer, so it is timed on its own bucket of the same size. "mpi" is
`Allreduce(IN_PLACE, buf)`, the same in-place contract as mpiml; "mpi_out" is
`Allreduce(buf, out)` into a second preallocated buffer; `ratio_vs_mpi` compares mpiml
against the faster of the two.

Rank 0 prints one JSON document on stdout (and writes it to --out). Buffers hold zeros while
timed, so repeated in-place sums neither overflow nor hit denormals; each candidate's result is
checked against MPI's on random data before timing.

Before each call every rank writes the buffer the call reads (zeros, not timed), as backward
writes the gradients an allreduce then sums. Reused as the previous candidate left it, a
buffer's cache lines may sit in the peer's cache, written there by that candidate's kernel
copies, and whoever comes next pays for fetching them back: at 1 MiB, N = 2, five candidates
in random order (2026-12-04), staged took 710-816 us right after MPI's in-place call and
305 us right after recursive doubling (4 MiB: 1829 and 849 us) while MPI's own time moved by
less than 7% with what came before; with the buffer written first, staged's moved by less than
10% (118-129 us, in another run). `--stale-buffers` times the old way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI  # the benchmark measures MPI itself; the library keeps it in mpiml.comm

from mpiml.comm import shm
from mpiml.comm.allreduce import (
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SMALL_THRESHOLD_BYTES,
    Allreducer,
)
from mpiml.comm.shm import SharedBuckets
from mpiml.comm.world import build_world, run_or_abort

DEFAULT_SIZES = [4 << 10 << k for k in range(15)]  # 4 KiB .. 64 MiB, powers of two
# Untimed calls per candidate and size, as in OSU's and nccl-tests' warm-up iterations: more
# than the Allreducer's tuning round (up to 3 algorithms x 9 calls per size class, see
# `allreduce._Tuner`), so what is timed is how each candidate runs once settled, as in a job
# that repeats a size thousands of times (the tuner re-times every 512 calls).
WARMUP = 32


def parse_bytes(text: str) -> int:
    """'4K', '1M', '65536' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def init_gloo(comm: MPI.Comm) -> None:
    """torch.distributed over gloo, rendezvous on a port rank 0 picked and broadcast."""
    port = 0
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size())


def candidates(comm: MPI.Comm, buf: np.ndarray, out: np.ndarray, reducers: dict[str, Allreducer],
               gloo: bool) -> dict[str, Callable[[], None]]:
    """Zero-argument calls, each one allreduce of `buf` (in place unless stated)."""
    calls: dict[str, Callable[[], None]] = {
        name: (lambda r=r: r(buf)) for name, r in reducers.items()}
    calls["mpi"] = lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    calls["mpi_out"] = lambda: comm.Allreduce(buf, out, op=MPI.SUM)
    if gloo:
        tensor = torch.from_numpy(buf)
        calls["gloo"] = lambda: dist.all_reduce(tensor)
    return calls


def check_results(comm: MPI.Comm, buf: np.ndarray, calls: dict[str, Callable[[], None]],
                  out: np.ndarray, shared: np.ndarray | None = None) -> None:
    """Every candidate must give MPI's answer (to float32 rounding) on random data."""
    data = np.random.default_rng(comm.Get_rank()).standard_normal(buf.size).astype(np.float32)
    expected = np.empty_like(data)
    comm.Allreduce(data, expected, op=MPI.SUM)
    for name, call in calls.items():
        target = shared if name == "mpiml_shared" else buf
        np.copyto(target, data)
        call()
        got = out if name == "mpi_out" else target
        if name == "mpiml_shared":  # it averages
            got = got * comm.Get_size()
        if not np.allclose(got, expected, rtol=1e-5, atol=1e-5 * comm.Get_size()):
            raise RuntimeError(f"{name} gave a wrong sum at {buf.nbytes} bytes")


def time_size(comm: MPI.Comm, calls: dict[str, Callable[[], None]], repeats: int,
              seed: tuple[int, ...], inputs: dict[str, np.ndarray] | None = None
              ) -> dict[str, float]:
    """Median over repeats of the slowest rank's time per call, candidates interleaved.

    With `inputs`, every rank writes the buffer a call reads (`inputs[name]`, zeros, not
    timed) before the call: why, in the module docstring."""
    names = list(calls)
    mine = np.zeros((len(names), repeats))
    for rep in range(WARMUP + repeats):
        # A fresh order each repeat, the same on every rank: whatever a call leaves behind
        # (gloo's threads waking up, pages a peer has just read through MPI) lands on all
        # candidates alike. Seeded by the run, the size and the repeat: seeded by the repeat
        # alone, every size and run had the same orders: `mpiml` followed `mpi_out` in 11 of 41
        # timed repeats (`mpiml_staged` in 7), and `mpiml` measured 5-25% slower than
        # `mpiml_staged`, the same code there, in 26 of 91 size-runs.
        order = np.random.default_rng([*seed, rep]).permutation(len(names))
        for k in order:
            call = calls[names[k]]
            if inputs is not None:
                inputs[names[k]].fill(0.0)
            comm.Barrier()
            t0 = time.perf_counter()
            call()
            elapsed = time.perf_counter() - t0
            if rep >= WARMUP:
                mine[k, rep - WARMUP] = elapsed
    slowest = np.empty_like(mine)
    comm.Allreduce(mine, slowest, op=MPI.MAX)
    return {name: statistics.median(slowest[k]) for k, name in enumerate(names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None,
                        help="comma-separated byte sizes, e.g. 4K,1M,64M (default 4K..64M, x2)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--segment-bytes", default=str(DEFAULT_SEGMENT_BYTES))
    parser.add_argument("--threshold-bytes", default=str(DEFAULT_SMALL_THRESHOLD_BYTES))
    parser.add_argument("--ring-segments", default="",
                        help="extra ring candidates with these segment sizes, e.g. 256K,1M")
    parser.add_argument("--no-gloo", action="store_true")
    parser.add_argument("--out", default=None, help="also write the JSON here (rank 0)")
    parser.add_argument("--stale-buffers", action="store_true",
                        help="time each call on the buffer as the previous candidate left it "
                             "(the method before 2026-12-04), not freshly written")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the candidates' orders (default: a fresh one per run)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    sizes = [parse_bytes(s) for s in args.sizes.split(",")] if args.sizes else DEFAULT_SIZES
    sizes = [s - s % 4 for s in sizes]
    segment, threshold = parse_bytes(args.segment_bytes), parse_bytes(args.threshold_bytes)
    world = build_world()
    comm = world.comm
    run_seed = args.seed
    if run_seed is None:  # one fresh seed, the same on every rank
        run_seed = comm.bcast(int(np.random.SeedSequence().entropy % 2**63), root=0)
    if not args.no_gloo:
        init_gloo(comm)
    max_elements = max(sizes) // 4
    reducers = {
        "mpiml": Allreducer(comm, max_elements, "float32", algorithm="auto",
                            segment_bytes=segment, small_threshold_bytes=threshold),
        "mpiml_ring": Allreducer(comm, max_elements, "float32", algorithm="ring",
                                 segment_bytes=segment),
    }
    if world.size & (world.size - 1) == 0:
        reducers["mpiml_doubling"] = Allreducer(comm, max_elements, "float32",
                                                algorithm="doubling", segment_bytes=segment)
    if world.size > 1 and world.node_comm.Get_size() == world.size:  # one node: any size
        reducers["mpiml_staged"] = Allreducer(comm, max_elements, "float32", algorithm="staged")
    for text in filter(None, args.ring_segments.split(",")):
        reducers[f"ring@{text}"] = Allreducer(comm, max_elements, "float32", algorithm="ring",
                                              segment_bytes=parse_bytes(text))
    shared = None
    if shm.usable(comm, world.node_comm):  # one shared bucket per size, as gradients have
        shared = SharedBuckets(comm, world.node_comm, [s // 4 for s in sizes], "float32")
    big = np.zeros(max_elements, dtype=np.float32)
    big_out = np.zeros_like(big)

    n = world.size
    results = []
    for nbytes in sizes:
        buf, out = big[: nbytes // 4], big_out[: nbytes // 4]
        calls = candidates(comm, buf, out, reducers, not args.no_gloo)
        bucket = None
        if shared is not None:
            index = sizes.index(nbytes)
            bucket = shared.tensors[index].numpy()
            calls["mpiml_shared"] = lambda i=index: shared.reduce(i)
        check_results(comm, buf, calls, out, bucket)
        buf.fill(0.0)
        if bucket is not None:
            bucket.fill(0.0)
        inputs = None if args.stale_buffers else {
            name: bucket if name == "mpiml_shared" else buf for name in calls}
        medians = time_size(comm, calls, args.repeats, (run_seed, nbytes), inputs)
        best_mpi = min(medians["mpi"], medians["mpi_out"])
        entry = {
            "bytes": nbytes,
            "size": human(nbytes),
            "auto_algorithm": reducers["mpiml"].algorithm_for(nbytes),
            "median_us": {k: round(v * 1e6, 2) for k, v in medians.items()},
            "algbw_GBps": {k: round(nbytes / v / 1e9, 3) for k, v in medians.items()},
            "busbw_GBps": {k: round(nbytes / v / 1e9 * 2 * (n - 1) / n, 3)
                           for k, v in medians.items()},
            "ratio_vs_mpi": round(medians["mpiml"] / best_mpi, 3),
            "ratio_ring_vs_mpi": round(medians["mpiml_ring"] / best_mpi, 3),
        }
        if "mpiml_staged" in medians:
            entry["ratio_staged_vs_mpi"] = round(medians["mpiml_staged"] / best_mpi, 3)
        if "mpiml_shared" in medians:
            entry["ratio_shared_vs_mpi"] = round(medians["mpiml_shared"] / best_mpi, 3)
        if "gloo" in medians:
            entry["ratio_vs_gloo"] = round(medians["mpiml"] / medians["gloo"], 3)
        results.append(entry)
        if world.is_root:
            print(f"{human(nbytes):>8}: mpiml {medians['mpiml'] * 1e6:9.1f} us, "
                  f"mpi {medians['mpi'] * 1e6:9.1f} us, ratio {entry['ratio_vs_mpi']:.3f}",
                  file=sys.stderr, flush=True)

    if not args.no_gloo:
        dist.destroy_process_group()
    document = {
        "benchmark": "allreduce",
        "world_size": n,
        "dtype": "float32",
        "repeats": args.repeats,
        "warmup": WARMUP,
        "order_seed": run_seed,
        "inputs": "as the previous candidate left them" if args.stale_buffers
                  else "written by their rank before each call",
        "statistic": "median over repeats of the slowest rank's time per call",
        "segment_bytes": segment,
        "small_threshold_bytes": threshold,
        "mpi_library": MPI.Get_library_version().splitlines()[0].strip(),
        "mpi4py": __import__("mpi4py").__version__,
        "torch": torch.__version__,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "command": " ".join(["mpiexec", "-n", str(n), "python"] + sys.argv),
        "results": results,
    }
    if world.is_root:
        text = json.dumps(document, indent=1)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    if shared is not None:
        shared.close()
    for reducer in reducers.values():
        reducer.close()
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_or_abort(main))
