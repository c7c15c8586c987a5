"""Peak resident memory per rank: mpiml's gradient sync against plain one-process PyTorch.

    python scripts/bench_memory.py [--model wide] [--steps 5] [--np 2]

Launches three worker jobs one after another (each a fresh process, so peaks do not mix) and
prints one JSON document: each worker's peak RSS (VmHWM) and end-of-training PSS per rank, and
mpiml's growth over plain PyTorch in units of the model's gradient size (the issue's budget is
about two). Peak RSS counts a page of node-shared memory in every rank that read it; PSS
splits it between them.

- ``plain``: one process, the same loop with no communication at all;
- ``mpiml``: ``mpiexec -n NP``, as the trainer runs it (freed memory kept for reuse,
  `mpiml/heap.py`): GradSync with fused buckets in shared memory and the parameters in it
  too (in each rank's buckets for small models, else once per node), each rank stepping its
  share (``optim.shard_optimizer``, so each holds 1/NP of the momentum);
- ``mpiml_unsharded``: the same with ``comm.shard_optimizer: false``;
- ``ddp``: ``mpiexec -n NP``, PyTorch DDP on gloo, for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train import build, init_gloo  # noqa: E402

from mpiml.heap import keep_freed_memory  # noqa: E402
from mpiml.optim import shard_optimizer  # noqa: E402

KINDS = ("plain", "mpiml", "mpiml_unsharded", "ddp")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pss_mb() -> float:
    """Proportional set size: shared pages split between the processes that map them.

    Peak RSS counts a shared page in full in every rank that touched it, and mpiml's buckets
    live in node-shared memory that each rank reads from its peers: PSS is the honest
    per-rank share of physical memory.
    """
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def worker(kind: str, model_name: str, steps: int, batch: int) -> None:
    torch.set_num_threads(1)
    factory, shape = build(model_name)
    torch.manual_seed(0)
    model = factory()
    grad_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    world = sync = None
    step_model: nn.Module = model
    if kind != "plain":
        from mpiml.comm import World
        from mpiml.comm.sync import GradSync

        world = World()
        if kind.startswith("mpiml"):
            keep_freed_memory()  # as the trainer does by default (train.keep_freed_memory)
            sync = GradSync(world, model, shard=kind == "mpiml")
        else:
            init_gloo(world)
            step_model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    if sync is not None and sync.sharded:
        opt = shard_optimizer(opt, sync)
    for _ in range(steps):
        nn.functional.cross_entropy(step_model(x), y).backward()
        if sync is not None:
            sync.finish()
        opt.step()
        if sync is not None:
            sync.zero_grad()
        else:
            opt.zero_grad()  # PyTorch's default: .grad = None, fresh gradients each step
    peaks, pss = [peak_rss_mb()], [pss_mb()]  # PSS at the end of training, with buckets live
    if world is not None:
        peaks = world.allgather_object(peaks[0])
        pss = world.allgather_object(pss[0])
        if sync is not None:
            sync.close()
        if kind == "ddp":
            torch.distributed.destroy_process_group()
    if world is None or world.is_root:
        print(json.dumps({"kind": kind, "peak_rss_mb": [round(p, 1) for p in peaks],
                          "pss_mb": [round(p, 1) for p in pss], "grad_mb": round(grad_mb, 1)}))
    if world is not None:
        world.close()


def launch(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--steps",
           str(args.steps), "--batch", str(args.batch)]
    if kind != "plain":
        mpiexec = Path(sys.executable).parent / "mpiexec"
        cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(args.np)] + cmd
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wide")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--worker", choices=list(KINDS))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.steps, args.batch)
        return 0
    runs = {kind: launch(kind, args) for kind in KINDS}
    plain = runs["plain"]["peak_rss_mb"][0]
    grad = runs["plain"]["grad_mb"]
    report = {"model": args.model, "ranks": args.np, "grad_mb": grad,
              "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in runs.items()},
              "growth_over_plain_in_gradient_sizes": {
                  k: round((max(runs[k]["peak_rss_mb"]) - plain) / grad, 2)
                  for k in KINDS[1:]},
              "pss_mb": {k: v["pss_mb"] for k, v in runs.items()},
              "pss_growth_over_plain_in_gradient_sizes": {
                  k: round((max(runs[k]["pss_mb"]) - runs["plain"]["pss_mb"][0]) / grad, 2)
                  for k in KINDS[1:]}}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
