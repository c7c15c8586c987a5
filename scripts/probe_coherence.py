"""What a write to node-shared memory costs, by who touched the lines last (two ranks, one node).

    mpiexec -n 2 python scripts/probe_coherence.py [--mb 3.8] [--repeats 120] [--out F]

Why: where `mpiml.comm.shm` puts gradients and parameters decides which core writes which cache
lines after which other core read or wrote them, and on the 2-core test machine that moves a
step by milliseconds. Rank 0 times one write of `--mb` of shared memory (a copy into it) after
each history below, in rounds that interleave the histories; rank 1 acts only in the
histories. Reports the median milliseconds per history as JSON, with a private buffer as the
reference.

The histories (``peer``: rank 1, ``me``: rank 0; ``r``: reads the lines, ``w``: writes them):

- ``peer:w``: the peer wrote last;
- ``peer:r``: the peer read last;
- ``peer:w me:r``: the peer wrote, then I read (a sum writing its result over its input);
- ``me:w peer:r``: I wrote, the peer read (a parameter the owner updates after a forward);
- ``me:w peer:r peer:w``: the peer wrote after reading;
- ``peer:w peer:r``: the peer wrote, then read its own writes.

On 2026-12-05 the machine was in one of two states, flipping within minutes: a write after
any history whose last access by the peer was a read took 1.2-1.6 ms for 3.8 MB, against
0.1-0.2 ms after the peer's write; in the other state 0.18 against 0.09.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch
from mpi4py import MPI  # it probes shared windows; the library keeps MPI in mpiml.comm

from mpiml.comm import World
from mpiml.comm.world import run_or_abort

HISTORIES: dict[str, list[tuple[int, str]]] = {
    "peer:w": [(1, "w")],
    "peer:r": [(1, "r")],
    "peer:w me:r": [(1, "w"), (0, "r")],
    "me:w peer:r": [(0, "w"), (1, "r")],
    "me:w peer:r peer:w": [(0, "w"), (1, "r"), (1, "w")],
    "peer:w peer:r": [(1, "w"), (1, "r")],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=3.8, help="megabytes written")
    parser.add_argument("--repeats", type=int, default=120)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    with World() as world:
        if world.size != 2 or world.local_size != 2:
            if world.is_root:
                sys.stderr.write("probe_coherence: run it with two ranks on one node "
                                 "(mpiexec -n 2)\n")
            return 2
        torch.set_num_threads(1)
        probe(world.node_comm, world.local_rank, args)
    return 0


def probe(node: MPI.Comm, rank: int, args: argparse.Namespace) -> None:
    n = int(args.mb * 1e6 / 4)
    win = MPI.Win.Allocate_shared(n * 4 if rank == 0 else 0, 4, comm=node)
    memory, _ = win.Shared_query(0)
    shared = torch.from_numpy(np.frombuffer(memory, dtype=np.float32, count=n))
    source, private = torch.randn(n), torch.zeros(n)

    def act(op: str) -> None:
        if op == "w":
            shared.copy_(source)
        else:
            float(shared.sum())

    times: dict[str, list[float]] = {k: [] for k in (*HISTORIES, "private")}
    for _ in range(args.repeats):
        for key in times:
            for who, op in HISTORIES.get(key, []):
                node.Barrier()
                if rank == who:
                    act(op)
            node.Barrier()
            if rank == 0:
                start = MPI.Wtime()
                (private if key == "private" else shared).copy_(source)
                times[key].append(MPI.Wtime() - start)
    if rank == 0:
        skip = args.repeats // 6  # first touches, page faults
        text = json.dumps({"mb": args.mb, "repeats": args.repeats, "median_ms": {
            k: round(statistics.median(v[skip:]) * 1e3, 3) for k, v in times.items()}},
            indent=1)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    node.Barrier()
    win.Free()


if __name__ == "__main__":
    sys.exit(run_or_abort(main))  # an exception on one rank ends the job, not just that rank
