"""Throughput of a Horovod-style script on mpiml.horovod against mpiml's own trainer.

    python scripts/bench_horovod.py [--np 2] [--rounds 5] [--epochs 15] [--out FILE]

Both train the same MLP (64-256-256-10) on scikit-learn's digits with SGD (momentum 0.9),
batch 32 per rank, one torch thread per rank, N ranks under mpiexec:

- ``horovod_style``: examples/horovod_style_mnist_like.py (DataLoader + DistributedSampler,
  DistributedOptimizer), samples/s per epoch counted by the script over its training loop;
- ``mpiml_trainer``: ``python -m mpiml.train configs/digits_mlp.yaml``, samples/s from the
  training records of metrics.jsonl (time inside steps, the slowest rank's).

The first epoch (or record) of every run is dropped as warm-up. Runs alternate between the two
so machine noise hits both alike; the JSON printed gives the median of each run and the median
over runs. A third job measures the latency of ``hvd.allreduce_`` on 4 float32 (16 bytes)
next to a bare mpi4py ``Allreduce`` of the same 16 bytes in the same job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launch import run_job


def horovod_style(np_: int, epochs: int, tmp: Path) -> float:
    out = tmp / "hvd.json"
    run_job(np_, [sys.executable, "examples/horovod_style_mnist_like.py", "--epochs",
                  str(epochs), "--quiet", "--metrics-json", str(out)])
    rates = json.loads(out.read_text())["samples_per_s_by_epoch"][1:]
    return statistics.median(rates)


def mpiml_trainer(np_: int, epochs: int, tmp: Path) -> float:
    run_dir = tmp / f"trainer-{time.monotonic_ns()}"
    run_job(np_, [sys.executable, "-m", "mpiml.train", "configs/digits_mlp.yaml",
                  "--set", f"train.epochs={epochs}", "--set", "checkpoint.every_steps=null",
                  "--set", "log.progress='off'", "--set", f"run.dir={run_dir}"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    return statistics.median(rates)


LATENCY = """
import json, statistics, time, numpy, torch
from mpi4py import MPI
import mpiml.horovod.torch as hvd
hvd.init()
comm = MPI.COMM_WORLD.Dup()
t, a = torch.ones(4), numpy.ones(4, dtype=numpy.float32)
calls = {"hvd": lambda: hvd.allreduce_(t, op=hvd.Sum),
         "mpi": lambda: comm.Allreduce(MPI.IN_PLACE, a)}
samples = {k: [] for k in calls}
for _ in range(7):  # interleaved, so load hits both alike
    for key, call in calls.items():
        for _ in range(100):
            call()
        start = time.perf_counter()
        for _ in range(1000):
            call()
        samples[key].append((time.perf_counter() - start) / 1000 * 1e6)
if hvd.rank() == 0:
    print(json.dumps({k: statistics.median(v) for k, v in samples.items()}))
"""

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2, help="ranks")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"horovod_style": [], "mpiml_trainer": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for _ in range(args.rounds):
            runs["horovod_style"].append(horovod_style(args.np, args.epochs, tmp))
            runs["mpiml_trainer"].append(mpiml_trainer(args.np, args.epochs, tmp))
        latency_out = run_job(args.np, [sys.executable, "-c", LATENCY])
        latency = json.loads(latency_out.strip().splitlines()[-1])
    med = {k: statistics.median(v) for k, v in runs.items()}
    doc = {
        "world_size": args.np, "rounds": args.rounds, "epochs": args.epochs,
        "model": "MLP 64-256-256-10, digits, SGD momentum 0.9, batch 32 per rank, 1 thread",
        "samples_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "samples_per_s_runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "horovod_style_over_trainer": round(med["horovod_style"] / med["mpiml_trainer"], 3),
        "allreduce_16B_latency_us": {"hvd.allreduce_": round(latency["hvd"], 1),
                                     "mpi4py Allreduce": round(latency["mpi"], 1)},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
