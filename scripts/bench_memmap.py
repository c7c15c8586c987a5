"""Per-rank peak memory when training on an `npy` dataset far bigger than one batch.

    python scripts/bench_memmap.py [--gb 2] [--np 2] [--steps 300] [--features 1024]

Writes a dataset folder of `--gb` GiB in /tmp (float32 rows, labels from a random linear
teacher so there is something to learn), trains `configs/npy_mlp.yaml` on it with
`mpiexec -n NP` for `--steps` steps, and prints one JSON document: the dataset size, each
rank's peak resident memory (VmHWM), the bytes it read from the dataset files (its own rows,
its share of the eval split and one pass over the labels) and all bytes it read through system
calls (`rchar` in /proc/self/io: also Python modules imported while training). The folder is
deleted afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mpiml.data.npyfile import NpyWriter  # noqa: E402
from mpiml.data.store import write_sidecar  # noqa: E402

CLASSES = 10


def make_dataset(folder: Path, gib: float, features: int, seed: int = 0) -> dict:
    """Stream a (rows, features) float32 dataset of `gib` GiB into `folder`, 64 MiB at a time."""
    rows = int(gib * 2**30) // (features * 4)
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((features, CLASSES)).astype(np.float32)
    chunk = max(1, (64 << 20) // (features * 4))
    folder.mkdir(parents=True)
    with NpyWriter(folder / "train_x.npy", np.float32, (rows, features)) as wx, \
            NpyWriter(folder / "train_y.npy", np.int64, (rows,)) as wy:
        for start in range(0, rows, chunk):
            x = rng.standard_normal((min(chunk, rows - start), features), dtype=np.float32)
            wx.write(x)
            wy.write(np.argmax(x @ teacher, axis=1))
    write_sidecar(folder, {"train_x": (np.dtype(np.float32), (rows, features)),
                           "train_y": (np.dtype(np.int64), (rows,))}, CLASSES,
                  {"source": "scripts/bench_memmap.py"})
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"path": str(folder), "bytes": size, "gib": round(size / 2**30, 3), "rows": rows,
            "features": features}


def proc_field(path: str, name: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(name):
                return int(line.split()[1])
    return -1


def worker(result_path: str, train_argv: list[str]) -> int:
    """Run under mpiexec: train, then gather each rank's peak RSS and bytes read."""
    import os

    from mpiml.comm import World
    from mpiml.train import main

    dataset_bytes = [0]
    preadv = os.preadv

    def counting_preadv(fd: int, buffers: list, offset: int) -> int:  # every dataset read
        n = preadv(fd, buffers, offset)
        dataset_bytes[0] += n
        return n

    os.preadv = counting_preadv  # type: ignore[assignment]
    read_before = proc_field("/proc/self/io", "rchar:")
    start = time.perf_counter()
    code = main(train_argv)
    seconds = time.perf_counter() - start
    mine = {"peak_rss_mb": round(proc_field("/proc/self/status", "VmHWM:") / 1024, 1),
            "dataset_read_mb": round(dataset_bytes[0] / 2**20, 1),
            "all_reads_mb": round((proc_field("/proc/self/io", "rchar:") - read_before) / 2**20,
                                  1),
            "train_seconds": round(seconds, 1), "exit": code}
    with World() as world:
        everyone = world.allgather_object(mine)
        if world.is_root:
            Path(result_path).write_text(json.dumps(everyone))
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="dataset size in GiB")
    parser.add_argument("--np", type=int, default=2, help="ranks")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--keep", action="store_true", help="keep the dataset folder")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker[0], args.worker[1:])

    tmp = Path(tempfile.mkdtemp(prefix="mpiml-bench-memmap-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        dataset = make_dataset(tmp / "ds", args.gb, args.features)
        dataset["write_seconds"] = round(time.perf_counter() - t0, 1)
        result_path = tmp / "ranks.json"
        train_argv = [str(REPO / "configs/npy_mlp.yaml"), "--set", f"data.path={tmp / 'ds'}",
                      "--set", f"data.batch_size={args.batch}",
                      "--set", "data.eval_fraction=0.01", "--set", "model.kwargs={hidden: [256]}",
                      "--set", f"train.max_steps={args.steps}", "--set", "train.epochs=1",
                      "--set", "train.log_every=50", "--set", "train.threads=1",
                      "--set", f"run.dir={tmp / 'run'}"]
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
        cmd = [mpiexec, "-n", str(args.np), sys.executable, str(Path(__file__).resolve()),
               "--worker", str(result_path), *train_argv]
        job = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if job.returncode != 0:
            sys.stderr.write(job.stdout + job.stderr)
            return job.returncode
        ranks = json.loads(result_path.read_text())
        records = [json.loads(line) for line in (tmp / "run/metrics.jsonl").open()]
        losses = [r["loss"] for r in records if "loss" in r]
        peak = max(r["peak_rss_mb"] for r in ranks)
        print(json.dumps({
            "dataset": dataset, "ranks": args.np, "steps": args.steps,
            "batch_per_rank": args.batch,
            "rows_per_rank_per_step_mb": round(args.batch * args.features * 4 / 2**20, 3),
            "per_rank": ranks,
            "max_peak_rss_mb": peak,
            "max_peak_rss_over_dataset": round(peak * 2**20 / dataset["bytes"], 3),
            "loss_first_last": [losses[0], losses[-1]] if losses else None,
        }, indent=2))
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
