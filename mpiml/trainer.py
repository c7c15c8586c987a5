"""The training loop: data -> forward/backward -> gradient sync -> step -> log -> checkpoint.

Each stage is a short method so the loop in `fit` reads as that sentence. Everything that
crosses ranks goes through the `World` and `GradSync`; everything rank 0 alone does goes
through the `RunLog` and the checkpoint writer, whose outcome is shared with every rank.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

import mpiml
from mpiml.checkpoint import prune_checkpoints, save_checkpoint
from mpiml.comm import World
from mpiml.comm.sync import GradSync
from mpiml.config import Config, dump_config
from mpiml.data import Dataset, ShardedLoader, build_dataset
from mpiml.evaluation import eval_batch_size, evaluate_model
from mpiml.losses import cross_entropy
from mpiml.models import build_model
from mpiml.optim import PartStepper, build_optimizer, build_scheduler
from mpiml.runlog import RunLog


def threads_per_rank(local_size: int, requested: int = 0) -> int:
    """Torch threads for one rank: the cores this process may use, shared by the node's ranks.

    If the launcher already pinned us to fewer cores than the machine has (srun with
    --cpus-per-task, mpirun --bind-to), those cores are ours alone; otherwise the node's cores
    are split evenly between its ranks so N ranks never run N x cores threads.
    """
    if requested > 0:
        return requested
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = os.cpu_count() or 1
    allowed = allowed or 1
    if allowed < total:
        return max(1, allowed)
    return max(1, total // max(1, local_size))


@dataclass
class _Window:
    """What happened since the last training record, on this rank."""

    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    # Seconds per stage, summed over the window's steps. Only time inside steps counts, so
    # evaluation, logging and checkpoints never inflate step_ms or deflate samples_per_s.
    times: dict[str, float] = field(
        default_factory=lambda: {"data": 0.0, "forward_backward": 0.0, "comm_exposed": 0.0,
                                 "optimizer": 0.0})


class Trainer:
    def __init__(self, cfg: Config, world: World, log: RunLog) -> None:
        self.cfg, self.world, self.log = cfg, world, log
        self.threads = threads_per_rank(world.local_size, cfg.train.threads)
        torch.set_num_threads(self.threads)
        torch.manual_seed(cfg.train.seed)  # rank 0's initial weights are broadcast anyway

        self.dataset: Dataset = world.run_together(
            lambda: build_dataset(cfg.data, cfg.train.seed))
        # A step takes `accumulate_steps` micro-batches, so the loader hands out all of them
        # at once: the same samples one rank with batch `k * b` would take.
        self.micro_batches = cfg.train.accumulate_steps
        self.loader = world.run_together(lambda: ShardedLoader(
            self.dataset.train, cfg.data.batch_size * self.micro_batches, world.rank, world.size,
            cfg.train.seed, prefetch=cfg.data.prefetch))
        self.model = world.run_together(lambda: build_model(
            cfg.model.name, cfg.model.kwargs, self.dataset.input_shape, self.dataset.num_classes,
            self.dataset.kind))
        self.sync = GradSync(world, self.model, cfg.comm.bucket_mb, cfg.comm.overlap,
                             cfg.comm.algorithm, cfg.comm.compression)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters(), world.size)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.total_steps)
        # Without clipping (which needs every gradient first) each bucket is stepped as soon
        # as its average arrives, while later buckets are still on the wire.
        self.parts = (PartStepper(self.optimizer, [b.params for b in self.sync.buckets])
                      if cfg.optim.clip_grad_norm is None else None)
        self.step = 0
        self.epoch = 0
        self.last_saved_step = -1
        self.last_lr = 0.0
        n_params = sum(p.numel() for p in self.model.parameters())
        log.print(f"mpiml {mpiml.__version__}: {world.size} rank(s), {self.threads} torch "
                  f"thread(s) per rank, model {cfg.model.name} ({n_params:,} parameters), "
                  f"data {cfg.data.name} ({len(self.dataset.train):,} train / "
                  f"{len(self.dataset.eval):,} eval), global batch "
                  f"{self.loader.batch_size * world.size}, "
                  f"{self.loader.steps_per_epoch} steps/epoch")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg.train
        progress = self.log.start_progress(self.cfg.log.progress, self.total_steps, self.step,
                                           self.cfg.log.lines_every_s)
        window = _Window()
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch
            batches = self.loader.epoch(epoch)
            while not self.done:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                loss = self.forward_backward(*batch)
                t2 = time.perf_counter()
                exposed = self.sync.stats.exposed_s
                self.sync.finish(self.parts.step if self.parts is not None else None)
                self.optimizer_step()
                t4 = time.perf_counter()
                t3 = t2 + self.sync.stats.exposed_s - exposed  # the rest is optimizer work
                self.step += 1
                progress.advance(self.step, self.epoch)
                window.loss_sum += loss * len(batch[1])
                window.samples += len(batch[1])
                window.steps += 1
                for key, dt in zip(window.times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    window.times[key] += dt
                if self.step % cfg.log_every == 0 or self.done:
                    self.log_training(window)
                    window = _Window()
                self.maybe_checkpoint()
            if window.steps:  # the epoch's tail, so every step is in some record
                self.log_training(window)
                window = _Window()
            if (self.epoch + 1) % cfg.eval_every_epochs == 0 or self.done \
                    or self.epoch + 1 == cfg.epochs:
                self.evaluate()
            if self.done:
                break
        progress.close()
        self.save_checkpoint()

    @property
    def total_steps(self) -> int:
        planned = self.cfg.train.epochs * self.loader.steps_per_epoch
        cap = self.cfg.train.max_steps
        return planned if cap is None else min(planned, cap)

    @property
    def done(self) -> bool:
        cap = self.cfg.train.max_steps
        return cap is not None and self.step >= cap

    # -- stages -----------------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean loss over the rank's batch; with accumulation, one backward per micro-batch.

        Only the last micro-batch's backward triggers communication (the others run under
        `no_sync`); each micro-batch's loss is weighted by its share of the batch, so the
        accumulated gradient is that of the mean over all of them.
        """
        self.model.train()
        total = 0.0
        pieces = list(zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches), strict=True))
        for i, (xs, ys) in enumerate(pieces):
            last = i == len(pieces) - 1
            with nullcontext() if last else self.sync.no_sync():
                loss = cross_entropy(self.model(xs), ys) * (len(ys) / len(y))
                loss.backward()  # bucket allreduces start from hooks as gradients get ready
            total += float(loss.detach())
        return total

    def optimizer_step(self) -> None:
        """Clip and step (unless `finish` stepped each bucket already), schedule, zero."""
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # what this step uses, for the log
        if self.parts is None:
            clip = self.cfg.optim.clip_grad_norm
            if clip is not None:  # gradients are averaged, so every rank clips identically
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
            self.optimizer.step()
        self.scheduler.step()
        self.sync.zero_grad()

    def log_training(self, window: _Window) -> None:
        """Record loss averaged over every rank's samples, the stage times and the stragglers.

        Steps are synchronised, so every rank's wall time per step is about the same: a slow
        rank makes the others wait in `comm_exposed`. What tells the slow rank apart is its
        *busy* time, the step without that wait; the record names the busiest rank.
        """
        steps = max(1, window.steps)
        step_s = sum(window.times.values())
        busy_s = step_s - window.times["comm_exposed"]
        sums = self.world.allreduce_sum(np.array([window.loss_sum, window.samples]))
        per_rank = self.world.allgather_object((step_s / steps, busy_s / steps))
        slowest_rank = max(range(len(per_rank)), key=lambda r: per_rank[r][1])
        loss = sums[0] / max(1.0, sums[1])
        # Global samples per second of training: the slowest rank's step time sets the pace.
        rate = sums[1] / max(max(s for s, _ in per_rank) * steps, 1e-9)
        comm = self.sync.reset_stats()
        ms = {k: round(v / steps * 1e3, 3) for k, v in window.times.items()}
        self.log.record(step=self.step, epoch=self.epoch, loss=round(float(loss), 6),
                        samples_per_s=round(float(rate), 1),
                        lr=float(f"{self.last_lr:.6g}"),
                        step_ms=round(step_s / steps * 1e3, 3),
                        slowest_step_ms=round(max(s for s, _ in per_rank) * 1e3, 3),
                        comm_ms=round(comm.comm_s / steps * 1e3, 3),
                        breakdown_ms=ms,
                        busy_ms_max=round(per_rank[slowest_rank][1] * 1e3, 3),
                        busy_ms_min=round(min(b for _, b in per_rank) * 1e3, 3),
                        slowest_rank=slowest_rank)
        self.log.progress.report(self.epoch, self.step, float(loss), float(rate))

    def evaluate(self) -> None:
        """Each rank evaluates its share of the held-out split; sums and counts are reduced."""
        result = evaluate_model(self.model, self.dataset.eval, self.world,
                                eval_batch_size(self.cfg.data.batch_size))
        if result is None:
            return
        self.log.record(step=self.step, epoch=self.epoch, eval_loss=round(result.loss, 6),
                        eval_accuracy=round(result.accuracy, 6))
        self.log.print(f"epoch {self.epoch:>3}  eval loss {result.loss:.4f}  "
                       f"accuracy {result.accuracy:.2%}  ({result.samples} samples)")

    def maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint.every_steps
        if every is not None and self.step % every == 0:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Rank 0 writes; every rank learns whether it worked (a failure is an error on all)."""
        if self.step == self.last_saved_step:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        meta = {"epoch": self.epoch, "world_size": self.world.size,
                "mpiml_version": mpiml.__version__, "config": self.cfg.to_dict()}
        run_dir, keep = self.cfg.run.dir, self.cfg.checkpoint.keep

        def write() -> str:
            path = save_checkpoint(run_dir, self.step, state, meta)
            (path / "config.yaml").write_text(dump_config(self.cfg))
            if keep is not None:
                prune_checkpoints(run_dir, keep)
            return str(path)

        path = self.world.root_decides(write)
        self.last_saved_step = self.step
        self.log.print(f"saved checkpoint {path}")

    # -- life cycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self.sync.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
