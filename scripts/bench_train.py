"""Training throughput: mpiml's gradient sync against PyTorch DDP (gloo), in the same run.

    mpiexec -n 2 python scripts/bench_train.py [--models mlp,cnn,wide] [--steps 5] [--repeats 21]

Every rank trains the same model on the same synthetic batches with the same thread count, in
rounds that interleave the contenders, in a fresh order each round (so machine noise hits all
of them alike). Each round gives a contender two warm-up steps and `--steps` timed ones; the
median over `--repeats` rounds is reported. A first round runs every contender untimed: in
four runs of the wide MLP without it, 13 of the 17 steps where a rank waited 119-653 ms for a
stalled peer fell in the first two rounds. Short rounds, many of them: on the shared 2-core
machine, with about as many steps run in all (154 per contender as 7 rounds of 20, 147 as 21
rounds of 5), the one-process baseline's median was 10.9-22.2 ms over eight runs of the MLP
with long rounds and 11.6-13.8 ms with short ones; two contenders running the same algorithm
(``mpiml`` once its tuner chose off, and ``mpiml_sync``) differed by 2.3% against 1.0%
(median over those runs).

- ``mpiml``: the loop of mpiml's trainer with its defaults: GradSync (fused buckets in
  node-shared memory, ``overlap="auto"``: its first steps time overlap on and off and keep the
  faster; those steps run before the timed rounds), parameters in node-shared
  memory with each rank stepping its share (``shard=True``, `optim.shard_optimizer`),
  bucket by bucket as averages arrive while overlap is on (`optim.PartStepper`), in one
  step when it is off;
- ``mpiml_overlap``: the same with overlap forced on;
- ``mpiml_sync``: overlap off and one optimizer step after the whole sync, whose wait is the
  whole communication time;
- ``mpiml_unsharded``: like ``mpiml`` but every rank steps every parameter
  (``comm.shard_optimizer: false``);
- ``ddp``: torch DistributedDataParallel on gloo;
- ``local``: the same loop with no gradient sync at all (every rank at once);
- ``single``: rank 0 alone while the others wait (plain one-process PyTorch on one core).

The process keeps freed memory for reuse, as the trainer does by default (`mpiml/heap.py`;
``--glibc-malloc-defaults`` turns it off), so every contender runs with it.

Rank 0 prints one JSON document: median step times, samples/s, the ratio mpiml/DDP, scaling
efficiency (per-rank throughput over ``single``), and exposed communication per step (time a
rank waited for the sync, in finish() and at the update fence), in four forms:

- ``exposed_comm_ms_per_step``: like the step times, the median over rounds of the round's
  mean (over every rank's timed steps). Now and then a rank stalls for hundreds of
  milliseconds, whatever the contender (above), and its peers wait that long in their sync:
  one such step moves the mean of a whole run by milliseconds, but the median over rounds
  hardly. ``overlap_hides`` compares these;
- ``exposed_comm_ms_pooled_mean``: the plain mean over every step and rank, stalls included
  (``overlap_hides_pooled_mean``);
- ``exposed_comm_ms_median_step``: the median over every step and rank;
- ``exposed_comm_ms_last_rank``: the mean over steps of the least any rank waited (the last
  rank to finish backward: what the sync added to the step once every rank had computed).

The pooled mean is exactly the last rank's wait plus ``late_peer_wait_ms_per_step``: what ranks
waited beyond it, for a peer still computing (load imbalance, which comes with overlap on or
off; with one core per rank overlap adds to it, as the thread's sums lengthen the backward of
whichever rank is late).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from mpiml.comm import World
from mpiml.comm.sync import GradSync
from mpiml.comm.world import run_or_abort
from mpiml.heap import keep_freed_memory
from mpiml.optim import bucket_stepper, shard_optimizer


def build(name: str) -> tuple[Callable[[], nn.Module], tuple[int, ...]]:
    if name == "mlp":  # 1.9 M parameters: the FIELD-NOTES' MLP 784-1024-1024-10
        return (lambda: nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                      nn.ReLU(), nn.Linear(1024, 10))), (784,)
    if name == "wide":  # 25 M parameters: communication-heavy
        return (lambda: nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096),
                                      nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(),
                                      nn.Linear(1024, 10))), (1024,)
    if name == "cnn":  # about 0.5 M parameters, compute-bound
        def cnn() -> nn.Module:
            def block(i: int, o: int) -> nn.Module:
                return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(o, o, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.Flatten(),
                                 nn.Linear(128 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))
        return cnn, (3, 32, 32)
    raise SystemExit(f"unknown model {name!r}: choose from mlp, cnn, wide")


def init_gloo(world: World) -> None:
    port = None
    if world.is_root:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast_object(port)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=world.rank, world_size=world.size)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)


def timed_steps(model: nn.Module, batches: list, steps: int, sync_and_step: Callable[[], None],
                zero: Callable[[], None]) -> float:
    loss_fn = nn.CrossEntropyLoss()
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        x, y = batches[i % len(batches)]
        loss_fn(model(x), y).backward()
        sync_and_step()
        zero()
    return (time.perf_counter() - start) / steps


def median_of_round_means(per_rank: list[list[float]], steps: int) -> float:
    """The median over rounds of each round's mean over every rank's steps in it, where each
    rank's list holds its timed steps round after round, `steps` per round."""
    rounds = len(per_rank[0]) // steps
    return statistics.median(
        statistics.mean(x for mine in per_rank for x in mine[j * steps : (j + 1) * steps])
        for j in range(rounds))


def run(world: World, name: str, steps: int, repeats: int, batch: int, bucket_mb: float) -> dict:
    factory, shape = build(name)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(world.rank)
    batches = [(torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,),
                                                                        generator=gen))
               for _ in range(4)]
    mine = ("mpiml", "mpiml_overlap", "mpiml_sync", "mpiml_unsharded")
    models = {key: factory() for key in (*mine, "ddp", "local")}
    n_params = sum(p.numel() for p in models["local"].parameters())
    overlap = {"mpiml": "auto", "mpiml_overlap": True, "mpiml_sync": False,
               "mpiml_unsharded": "auto"}
    syncs = {key: GradSync(world, models[key], bucket_mb, overlap=overlap[key],
                           shard=key != "mpiml_unsharded") for key in mine}
    ddp = nn.parallel.DistributedDataParallel(models["ddp"])
    opts = {key: sgd(model) for key, model in models.items()}
    for key in mine:  # as the trainer does: sharded wherever the layout allows it
        if syncs[key].sharded:
            opts[key] = shard_optimizer(opts[key], syncs[key])
    # mpiml as its trainer runs it: with overlap on, each bucket stepped as soon as its average
    # arrives; mpiml_sync: the plain synchronous path, all of the sync and then one step.
    parts = {key: bucket_stepper(opts[key], syncs[key])
             for key in ("mpiml", "mpiml_overlap", "mpiml_unsharded")}

    def as_trainer(key: str) -> Callable[[], None]:
        """The trainer's update: bucket by bucket while overlap is on, else one step."""
        sync, opt, stepper = syncs[key], opts[key], parts[key]

        def update() -> None:
            if sync.overlap:
                sync.finish(stepper.step)
            else:
                sync.finish()
                opt.step()
        return update

    step_fn = {
        "mpiml": as_trainer("mpiml"),
        "mpiml_overlap": as_trainer("mpiml_overlap"),
        "mpiml_sync": lambda: (syncs["mpiml_sync"].finish(), opts["mpiml_sync"].step()),
        "mpiml_unsharded": as_trainer("mpiml_unsharded"),
        "ddp": opts["ddp"].step,
        "local": opts["local"].step,
    }

    # Plain PyTorch as it is written: zero_grad() sets .grad to None (its default since 2.0),
    # so the next backward hands over fresh gradients instead of adding to zeroed ones.
    def ddp_opt_zero() -> None:
        opts["ddp"].zero_grad()

    def local_zero() -> None:
        opts["local"].zero_grad()

    times: dict[str, list[float]] = {k: [] for k in (*mine, "ddp", "local", "single")}
    exposed: dict[str, list[float]] = {k: [] for k in mine}  # per step, timed steps only

    def contend(key: str) -> None:
        """One repeat of `key`'s timed steps (rank 0 alone for "single")."""
        if key in mine:
            sync, mine_steps = syncs[key], exposed[key]

            def zero(sync: GradSync = sync, out: list[float] = mine_steps) -> None:
                sync.zero_grad()  # the step's last wait (the update fence) happens here
                out.append(sync.reset_stats().exposed_s)

            times[key].append(timed_steps(models[key], batches, steps, step_fn[key], zero))
            del mine_steps[-steps - 2:-steps]  # the two warm-up steps
        elif key == "ddp":
            times[key].append(timed_steps(ddp, batches, steps, step_fn[key], ddp_opt_zero))
        elif key == "local" or world.is_root:  # "single": rank 0 while the others wait
            times[key].append(timed_steps(models["local"], batches, steps, step_fn["local"],
                                          local_zero))

    # comm.overlap auto: let the tuner decide before anything is timed, as it has long
    # before the steady state of a real run (it takes 51 steps); the decision is reported.
    for key in ("mpiml", "mpiml_unsharded"):
        while syncs[key].tuning:
            world.barrier()
            timed_steps(models[key], batches, 1, step_fn[key], syncs[key].zero_grad)
        syncs[key].reset_stats()
    for rep in range(-1, repeats):
        # A fresh order every repeat, the same on every rank (seeded by the repeat): whoever
        # runs first after rank 0's solo run, or right after a contender that leaves threads
        # behind, is not always the same one.
        for key in random.Random(rep).sample(list(times), len(times)):
            world.barrier()
            contend(key)
        world.barrier()
        if rep == -1:  # an untimed first round: see the module docstring
            for kept_values in (*times.values(), *exposed.values()):
                kept_values.clear()
    chosen = syncs["mpiml"].decision
    syncs_sharded = syncs["mpiml"].sharded
    for sync in syncs.values():
        sync.close()
    med = {k: statistics.median(v) for k, v in times.items() if v}
    med = world.bcast_object(med)
    # Exposed time per step comes in three shapes: a few milliseconds; now and then tens of
    # milliseconds when one rank's backward ran late and the others waited for it (load
    # imbalance, which the machine's noise causes in either mode); and rarely hundreds of
    # milliseconds, a stalled peer. The round's mean charges the first two,
    # and the median over rounds keeps a stall to its own round, as for the step times. The
    # median step shows what the sync itself leaves exposed. Every rank's steps count: a late
    # rank makes its peers wait, not itself.
    # The last rank to finish its backward waits least: its wait is what is left of the sync
    # once every rank has computed, the step's critical path, with no peer's lateness in it.
    by_rank = {k: world.allgather_object(v) for k, v in exposed.items()}
    exp_round = {k: median_of_round_means(v, steps) for k, v in by_rank.items()}
    exposed = {k: [x for steps_of in v for x in steps_of] for k, v in by_rank.items()}
    exp = {k: statistics.mean(v) for k, v in exposed.items()}
    exp_median = {k: statistics.median(v) for k, v in exposed.items()}
    exp_last = {k: statistics.mean(map(min, zip(*v, strict=True))) for k, v in by_rank.items()}
    per_rank = {k: batch / v for k, v in med.items()}
    return {
        "model": name, "parameters": n_params, "per_rank_batch": batch,
        "step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
        "samples_per_s": {k: round(v * (world.size if k != "single" else 1), 1)
                          for k, v in per_rank.items()},
        "ratio_mpiml_over_ddp": round(med["ddp"] / med["mpiml"], 3),
        "mpiml_overlap_choice": chosen,
        "scaling_efficiency": {k: round(per_rank[k] / per_rank["single"], 3)
                               for k in (*mine, "ddp", "local")},
        "mpiml_vs_no_sync": round(med["local"] / med["mpiml"], 3),
        "sharded": syncs_sharded,
        "comm_ms_per_step": round(exp_round["mpiml_sync"] * 1e3, 2),
        "exposed_comm_ms_per_step": {
            "mpiml": round(exp_round["mpiml"] * 1e3, 2),
            "mpiml_overlap": round(exp_round["mpiml_overlap"] * 1e3, 2),
            "mpiml_no_overlap": round(exp_round["mpiml_sync"] * 1e3, 2),
            "ddp_estimate": round(max(0.0, med["ddp"] - med["local"]) * 1e3, 2),
        },
        "exposed_comm_ms_pooled_mean": {
            "mpiml": round(exp["mpiml"] * 1e3, 2),
            "mpiml_overlap": round(exp["mpiml_overlap"] * 1e3, 2),
            "mpiml_no_overlap": round(exp["mpiml_sync"] * 1e3, 2),
        },
        "exposed_comm_ms_median_step": {
            "mpiml": round(exp_median["mpiml"] * 1e3, 2),
            "mpiml_overlap": round(exp_median["mpiml_overlap"] * 1e3, 2),
            "mpiml_no_overlap": round(exp_median["mpiml_sync"] * 1e3, 2),
        },
        "exposed_comm_ms_last_rank": {
            "mpiml": round(exp_last["mpiml"] * 1e3, 2),
            "mpiml_overlap": round(exp_last["mpiml_overlap"] * 1e3, 2),
            "mpiml_no_overlap": round(exp_last["mpiml_sync"] * 1e3, 2),
        },
        # The pooled mean, split exactly: what the last rank waited (the sync) plus, over
        # every rank and step, how much longer than the last rank it waited (a late peer).
        "late_peer_wait_ms_per_step": {
            "mpiml": round((exp["mpiml"] - exp_last["mpiml"]) * 1e3, 2),
            "mpiml_overlap": round((exp["mpiml_overlap"] - exp_last["mpiml_overlap"]) * 1e3, 2),
            "mpiml_no_overlap": round((exp["mpiml_sync"] - exp_last["mpiml_sync"]) * 1e3, 2),
        },
        "overlap_hides": round(
            1 - exp_round["mpiml_overlap"] / max(exp_round["mpiml_sync"], 1e-12), 3),
        "overlap_hides_pooled_mean": round(
            1 - exp["mpiml_overlap"] / max(exp["mpiml_sync"], 1e-12), 3),
        "overlap_hides_last_rank": round(
            1 - exp_last["mpiml_overlap"] / max(exp_last["mpiml_sync"], 1e-12), 3),
        "overlap_hides_median_step": round(
            1 - exp_median["mpiml_overlap"] / max(exp_median["mpiml_sync"], 1e-12), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,wide")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=21, help="rounds (medians over them)")
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="do not keep freed memory for reuse (train.keep_freed_memory: false)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # As the trainer does by default; process-wide, so every contender runs with it.
    kept = not args.glibc_malloc_defaults and keep_freed_memory()
    with World() as world:
        init_gloo(world)
        results = [run(world, m, args.steps, args.repeats, args.batch, args.bucket_mb)
                   for m in args.models.split(",")]
        dist.destroy_process_group()
        if world.is_root:
            doc = {"world_size": world.size, "threads_per_rank": args.threads,
                   "keep_freed_memory": kept,
                   "steps": args.steps, "repeats": args.repeats, "results": results}
            text = json.dumps(doc, indent=1)
            print(text)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_or_abort(main))  # an exception on one rank ends the job, not just that rank
