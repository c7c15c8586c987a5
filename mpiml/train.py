"""`mpirun -np N python -m mpiml.train CONFIG [--set section.key=value ...] [--resume auto]`"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from mpiml.config import Config, add_override_option, dump_config, load_config
from mpiml.errors import ConfigError, MpimlError
from mpiml.runlog import RunLog
from mpiml.signals import StopRequest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mpiml.train",
        description="Data-parallel training under mpirun or srun; see README.md.")
    parser.add_argument("config", help="YAML config file (sections train, data, model, ...)")
    add_override_option(parser)
    parser.add_argument("--resume", default="none", metavar="auto|PATH|none",
                        help="auto: continue from the newest valid checkpoint of run.dir (or "
                             "start fresh if there is none); PATH: from that checkpoint "
                             "folder; none: start fresh (default)")
    return parser.parse_args(argv)


def open_run_dir(log: RunLog, cfg: Config) -> None:
    try:
        log.open(dump_config(cfg), tensorboard=cfg.log.tensorboard)
    except OSError as err:
        raise ConfigError(f"run.dir = {cfg.run.dir!r} cannot be written: {err.strerror or err}. "
                          "HINT: choose a writable folder with --set run.dir=PATH") from err


def say(line: str) -> None:
    """Rank 0's remarks on the way in (bad checkpoints skipped, folders tidied)."""
    print(line, file=sys.stderr, flush=True)


def train(args: argparse.Namespace, stop: StopRequest) -> int:
    # Imported here, once the signal handlers are in place: torch takes seconds to import.
    from mpiml.comm import build_world
    from mpiml.comm.launcher import check_launcher
    from mpiml.comm.world import EXIT_OK, EXIT_REQUEUE, mpi_library_version
    from mpiml.resume import find_resume_point, fit_config_to_checkpoint
    from mpiml.trainer import Trainer

    with build_world() as world:
        # Each process of a launch that did not wire up MPI sees a world of one: it is its
        # own rank 0, so raising here ends each of them cleanly with the same message.
        try:
            check_launcher(world.size, mpi_library=mpi_library_version())
        except MpimlError as err:
            raise err.agreed() from None
        cfg = world.root_decides(lambda: load_config(args.config, args.overrides))
        world.start_watchdog(cfg.comm.timeout_s)
        point = world.root_decides(lambda: find_resume_point(args.resume, cfg.run.dir, say))
        cfg, notes = world.root_decides(lambda: fit_config_to_checkpoint(cfg, point, world.size))
        where = world.allgather_object((socket.gethostname(), os.getpid()))
        with RunLog(cfg.run.dir, enabled=world.is_root) as log:
            world.root_decides(lambda: open_run_dir(log, cfg))
            # A launcher that kills the job when a rank dies names its PID: this maps it.
            log.print("ranks: " + ", ".join(f"{r}=pid {pid}@{host}"
                                            for r, (host, pid) in enumerate(where[:64]))
                      + (f", ... ({len(where)} in all)" if len(where) > 64 else ""))
            for line in notes:
                log.print(line)
            with Trainer(cfg, world, log, stop=stop, resume=point) as trainer:
                finished = trainer.fit()
    return EXIT_OK if finished else EXIT_REQUEUE


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # First thing: a SIGUSR1/SIGTERM from Slurm during start-up must not kill the rank.
    stop = StopRequest().install()
    from mpiml.comm.world import run_or_abort

    code = run_or_abort(lambda: train(args, stop))
    stop.ignore_from_now()
    return code


if __name__ == "__main__":
    sys.exit(main())
