"""The training loop: data -> forward/backward -> gradient sync -> step -> log -> checkpoint.

Each stage is a short method so the loop in `fit` reads as that sentence. Everything that
crosses ranks goes through the `World` and `GradSync`; everything rank 0 alone does goes
through the `RunLog` and the checkpoint writer, whose outcome is shared with every rank.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import mpiml
from mpiml.checkpoint import check_room, prune_checkpoints, save_checkpoint
from mpiml.comm import World
from mpiml.comm.launcher import slurm_cpus_per_task
from mpiml.comm.sync import GradSync
from mpiml.config import Config, dump_config
from mpiml.data import Dataset, ShardedLoader, build_dataset
from mpiml.errors import CheckpointError, NonFiniteLossError, unwinding_alone
from mpiml.evaluation import eval_batch_size, evaluate_model
from mpiml.heap import keep_freed_memory
from mpiml.losses import cross_entropy
from mpiml.models import build_model
from mpiml.optim import (
    bucket_stepper,
    build_optimizer,
    build_scheduler,
    clip_shards,
    shard_optimizer,
)
from mpiml.resume import ResumePoint, load_resume_state, reseed, rng_state, set_rng_state
from mpiml.runlog import RunLog
from mpiml.signals import StopRequest


def threads_per_rank(local_size: int, requested: int = 0,
                     cpus_per_task: int | None = None) -> int:
    """Torch threads for one rank: the cores this process may use, shared by the node's ranks.

    If the launcher already pinned us to fewer cores than the machine has (srun with
    --cpus-per-task, mpirun --bind-to), those cores are ours alone; Slurm's `--cpus-per-task`
    (SLURM_CPUS_PER_TASK) counts even where it does not pin; otherwise the node's cores
    are split evenly between its ranks so N ranks never run N x cores threads.
    """
    if requested > 0:
        return requested
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = os.cpu_count() or 1
    allowed = allowed or 1
    if cpus_per_task:
        return max(1, min(cpus_per_task, allowed))
    if allowed < total:
        return max(1, allowed)
    return max(1, total // max(1, local_size))


@dataclass
class _Window:
    """What happened since the last training record, on this rank."""

    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    skipped: int = 0  # steps whose update was skipped (non-finite loss, train.nonfinite=skip)
    # Seconds per stage, summed over the window's steps. Only time inside steps counts, so
    # evaluation, logging and checkpoints never inflate step_ms or deflate samples_per_s.
    times: dict[str, float] = field(
        default_factory=lambda: {"data": 0.0, "forward_backward": 0.0, "comm_exposed": 0.0,
                                 "optimizer": 0.0})

    def counts(self) -> dict[str, float | int]:
        """What a checkpoint keeps, so a resumed run logs the same numbers."""
        return {"loss_sum": self.loss_sum, "samples": self.samples, "steps": self.steps,
                "skipped": self.skipped}


class Trainer:
    def __init__(self, cfg: Config, world: World, log: RunLog, stop: StopRequest | None = None,
                 resume: ResumePoint | None = None) -> None:
        self.cfg, self.world, self.log = cfg, world, log
        self.stop = stop or StopRequest()
        self.threads = threads_per_rank(world.local_size, cfg.train.threads,
                                        slurm_cpus_per_task())
        torch.set_num_threads(self.threads)
        self.heap_kept = cfg.train.keep_freed_memory and keep_freed_memory()
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
                             cfg.comm.algorithm, cfg.comm.compression,
                             shard=cfg.comm.shard_optimizer)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters(), world.size)
        if self.sync.sharded:  # this rank steps its share of each bucket
            self.optimizer = shard_optimizer(self.optimizer, self.sync)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.total_steps)
        # Without clipping (which needs every gradient first), and while overlap is on, each
        # bucket is stepped as soon as its average arrives, while later ones are on the wire.
        self.parts = (bucket_stepper(self.optimizer, self.sync)
                      if cfg.optim.clip_grad_norm is None else None)
        self.step = 0
        self.epoch = 0
        self.epoch_step = 0  # optimizer steps done in `epoch`: the data position
        self.complete = False  # the loaded checkpoint was the final one of its run
        self.last_saved: tuple[int, bool] | None = None  # (step, complete) of the last save
        self.last_lr = 0.0
        self.window = _Window()
        self._told_overlap = False  # the overlap tuner's choice is printed once
        n_params = sum(p.numel() for p in self.model.parameters())
        param_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        # model + optimizer state (up to 2x for Adam) + every rank's RNG states (~16 KiB each)
        need = 3 * param_bytes + 16 * 2**10 * world.size + 2**16
        world.root_decides(lambda: check_room(cfg.run.dir, need))
        log.print(f"mpiml {mpiml.__version__}: {world.size} rank(s), {self.threads} torch "
                  f"thread(s) per rank{', freed memory kept' if self.heap_kept else ''}, "
                  f"model {cfg.model.name} ({n_params:,} parameters), "
                  f"data {cfg.data.name} ({len(self.dataset.train):,} train / "
                  f"{len(self.dataset.eval):,} eval), global batch "
                  f"{self.loader.batch_size * world.size}, "
                  f"{self.loader.steps_per_epoch} steps/epoch")
        if resume is not None:
            self.resume_from(resume)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> bool:
        """Train to the end (True), or until a stop signal is agreed on (False, checkpointed)."""
        cfg = self.cfg.train
        if self.complete and self.step >= self.total_steps:
            self.log.print(f"the run already finished at step {self.step}; nothing to do")
            return True
        progress = self.log.start_progress(self.cfg.log.progress, self.total_steps, self.step,
                                           self.cfg.log.lines_every_s)
        for epoch in range(self.epoch, cfg.epochs):
            if epoch != self.epoch:
                self.epoch, self.epoch_step = epoch, 0
            batches = self.loader.epoch(epoch, self.epoch_step)
            while not self.done:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                loss = self.forward_backward(*batch)
                t2 = time.perf_counter()
                exposed = self.sync.stats.exposed_s
                nonfinite, stop, agreed_s = self.sync_and_step(loss)
                t4 = time.perf_counter()
                # Waiting on other ranks is exposed communication; the rest is optimizer work.
                t3 = t2 + self.sync.stats.exposed_s - exposed + agreed_s
                self.count_step(loss, len(batch[1]), nonfinite,
                                (t1 - t0, t2 - t1, t3 - t2, t4 - t3))
                progress.advance(self.step, self.epoch)
                if self.step % cfg.log_every == 0 or self.done:
                    self.log_training(self.window)
                    self.window = _Window()
                self.maybe_checkpoint()
                if stop:
                    progress.close()
                    return self.stop_for_requeue()
            if self.window.steps:  # the epoch's tail, so every step is in some record
                self.log_training(self.window)
                self.window = _Window()
            if (self.epoch + 1) % cfg.eval_every_epochs == 0 or self.done \
                    or self.epoch + 1 == cfg.epochs:
                self.evaluate()
            if self.done:
                break
        progress.close()
        self.save_checkpoint(complete=True)
        return True

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

    def sync_and_step(self, loss: float) -> tuple[bool, bool, float]:
        """Average the gradients and update. Returns whether the loss was non-finite on some
        rank, whether a stop was asked for, and the seconds spent agreeing on that.

        Under train.nonfinite=skip the ranks agree before any parameter moves (the optimizer
        may step bucket by bucket inside `finish`); otherwise after the update, when no
        gradient is in flight. An aborted step's parameters are never checkpointed.
        """
        start = time.perf_counter()
        early = self.agree(loss) if self.cfg.train.nonfinite == "skip" else None
        agreed_s = time.perf_counter() - start
        skip = early is not None and early[0]
        # Bucket by bucket only while buckets can still be on the wire: with overlap off
        # every average is in before the first could be stepped, and one step is cheaper.
        stepped = self.parts is not None and not skip and self.sync.overlap
        self.sync.finish(self.parts.step if stepped else None)
        self.optimizer_step(skip=skip, stepped=stepped)
        if early is None:
            start = time.perf_counter()
            early = self.agree(loss)
            agreed_s = time.perf_counter() - start
        nonfinite, stop = early
        if nonfinite:
            self.handle_nonfinite(loss)  # raises under train.nonfinite = abort
        return nonfinite, stop, agreed_s

    def agree(self, loss: float) -> tuple[bool, bool]:
        """One tiny allreduce per step: is the loss non-finite anywhere, and was a stop asked?

        Both are per-rank facts (a NaN on one shard, a signal delivered to some ranks only);
        acting on them differently would split the ranks, so every rank acts on the maximum.
        """
        flags = self.world.allreduce_max(np.array([0.0 if math.isfinite(loss) else 1.0,
                                                   1.0 if self.stop.requested else 0.0]))
        return bool(flags[0]), bool(flags[1])

    def handle_nonfinite(self, loss: float) -> None:
        """`train.nonfinite`: abort the job (exit 3) or skip this update, on every rank."""
        bad = self.world.allgather_object(not math.isfinite(loss))
        ranks = [r for r, b in enumerate(bad) if b]
        where = f"step {self.step + 1} (epoch {self.epoch})"
        if self.cfg.train.nonfinite == "abort":
            raise NonFiniteLossError(
                f"the loss is not finite (NaN or inf) on rank(s) {ranks} at {where}; "
                "train.nonfinite = abort. The last checkpoint is intact. HINT: lower optim.lr, "
                "set optim.clip_grad_norm, or set train.nonfinite=skip to skip such steps"
            ).agreed()
        self.log.print(f"warning: {where}: the loss is not finite on rank(s) {ranks}; "
                       "skipping this update (train.nonfinite = skip)")
        self.log.record(step=self.step + 1, epoch=self.epoch, event="skipped_step",
                        reason="nonfinite loss", ranks=ranks)

    def optimizer_step(self, skip: bool = False, stepped: bool = False) -> None:
        """Clip and step (unless `finish` stepped each bucket already, or `skip`), schedule,
        zero. A skipped update still advances the schedule, so it stays in step with `step`."""
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # what this step uses, for the log
        if not skip and not stepped:
            clip = self.cfg.optim.clip_grad_norm
            if clip is not None and self.sync.sharded:  # the norm of the node's shares
                clip_shards(self.optimizer, self.sync, clip)
            elif clip is not None:  # gradients are averaged, so every rank clips identically
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped first step makes torch warn of the order
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.sync.zero_grad()

    def count_step(self, loss: float, samples: int, skipped: bool,
                   times: tuple[float, float, float, float]) -> None:
        self.step += 1
        self.epoch_step += 1
        window = self.window
        if skipped:
            window.skipped += 1
        else:
            window.loss_sum += loss * samples
            window.samples += samples
        window.steps += 1
        for key, dt in zip(window.times, times, strict=True):
            window.times[key] += dt

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
        extra = {"skipped_steps": window.skipped} if window.skipped else {}
        if not sums[1]:  # every step of the window was skipped: there is no loss to show
            loss = float("nan")
        self.log.record(step=self.step, epoch=self.epoch,
                        loss=round(float(loss), 6) if sums[1] else None, **extra,
                        samples_per_s=round(float(rate), 1),
                        lr=float(f"{self.last_lr:.6g}"),
                        step_ms=round(step_s / steps * 1e3, 3),
                        slowest_step_ms=round(max(s for s, _ in per_rank) * 1e3, 3),
                        comm_ms=round(comm.comm_s / steps * 1e3, 3),
                        breakdown_ms=ms,
                        busy_ms_max=round(per_rank[slowest_rank][1] * 1e3, 3),
                        busy_ms_min=round(min(b for _, b in per_rank) * 1e3, 3),
                        slowest_rank=slowest_rank, overlap=self.sync.overlap)
        if self.sync.decision is not None and not self._told_overlap:
            self.log.print(self.sync.decision)
            self._told_overlap = True
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

    def stop_for_requeue(self) -> bool:
        """Every rank agreed on a stop signal: checkpoint here and tell the caller to exit 75."""
        self.save_checkpoint()
        self.log.print(f"stopped at step {self.step} on {self.stop.name}: checkpointed, "
                       "exiting 75 so the job can be requeued and resumed (--resume auto)")
        return False

    def save_checkpoint(self, complete: bool = False) -> None:
        """Rank 0 writes; every rank learns whether it worked (a failure is an error on all).

        Besides the model it keeps all a resume needs to continue exactly: optimizer and
        schedule, the data position, every rank's RNG states and unlogged metric sums.
        """
        if self.last_saved == (self.step, complete):
            return
        ranks = self.world.gather_object({"rng": rng_state(), "window": self.window.counts()})
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "ranks": ranks}
        meta = {"epoch": self.epoch, "epoch_step": self.epoch_step,
                "steps_per_epoch": self.loader.steps_per_epoch,
                "global_batch": self.loader.batch_size * self.world.size,
                "complete": complete, "world_size": self.world.size,
                "mpiml_version": mpiml.__version__, "config": self.cfg.to_dict()}
        run_dir, keep = self.cfg.run.dir, self.cfg.checkpoint.keep

        def write() -> str:
            meta["metrics_records"] = self.log.records
            path = save_checkpoint(run_dir, self.step, state, meta,
                                   {"config.yaml": dump_config(self.cfg)})
            if keep is not None:
                prune_checkpoints(run_dir, keep)
            return str(path)

        path = self.world.root_decides(write)
        self.last_saved = (self.step, complete)
        self.log.print(f"saved checkpoint {path}")

    def resume_from(self, point: ResumePoint) -> None:
        """Load a verified checkpoint (read by rank 0, sent to all) and take up its position."""
        state = self.world.root_decides(lambda: load_resume_state(point))

        def apply() -> None:
            try:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            except (RuntimeError, ValueError, KeyError) as err:
                raise CheckpointError(
                    f"{point.path} does not fit this model or optimizer: {err}. HINT: resume "
                    "with the model and optim settings it was saved with (its config.yaml)"
                ) from err

        self.world.run_together(apply)
        meta = point.meta
        if meta["steps_per_epoch"] != self.loader.steps_per_epoch:
            raise CheckpointError(
                f"{point.path} was saved with {meta['steps_per_epoch']} steps per epoch, this "
                f"run has {self.loader.steps_per_epoch}: the training data changed, so the "
                "position in the epoch cannot be kept").agreed()
        self.step, self.epoch, self.epoch_step = meta["step"], meta["epoch"], meta["epoch_step"]
        self.complete = bool(meta.get("complete"))
        if self.complete and self.epoch_step >= self.loader.steps_per_epoch:
            self.epoch, self.epoch_step = self.epoch + 1, 0  # its evaluation is done too
        self.last_saved = (self.step, self.complete)
        saved = state["ranks"]
        if len(saved) == self.world.size:  # same ranks: each continues its own streams
            set_rng_state(saved[self.world.rank]["rng"])
            counts = saved[self.world.rank]["window"]
        else:  # RNG streams do not map onto another rank count: reseed; sums go to rank 0
            reseed(self.cfg.train.seed * 1_000_003 + self.step * 1009 + self.world.rank)
            counts = {key: sum(r["window"][key] for r in saved) if self.world.is_root else 0
                      for key in saved[0]["window"]}
        self.window = _Window(loss_sum=counts["loss_sum"], samples=counts["samples"],
                              steps=counts["steps"], skipped=counts["skipped"])
        # Records logged after the checkpoint are redone; a checkpoint of another run dir
        # (`--resume PATH`) says nothing about this run's metrics.jsonl.
        ours = Path(point.path).resolve().parent.parent == Path(self.cfg.run.dir).resolve()
        dropped = self.log.truncate(int(meta["metrics_records"])) if ours else 0
        self.log.print(f"resumed from {point.path} at step {self.step} (epoch {self.epoch}, "
                       f"step {self.epoch_step} of {self.loader.steps_per_epoch} in it)"
                       + (f"; dropped {dropped} metrics record(s) written after it"
                          if dropped else ""))

    # -- life cycle -----------------------------------------------------------------------------
    def close(self, wait_for_peers: bool = True) -> None:
        self.sync.close(wait=wait_for_peers)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(wait_for_peers=not unwinding_alone(exc))
