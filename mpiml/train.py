"""`mpirun -np N python -m mpiml.train CONFIG [--set section.key=value ...]`"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mpiml.comm import build_world
from mpiml.comm.world import run_or_abort
from mpiml.config import Config, dump_config, load_config
from mpiml.errors import ConfigError
from mpiml.runlog import RunLog
from mpiml.trainer import Trainer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mpiml.train",
        description="Data-parallel training under mpirun or srun; see README.md.")
    parser.add_argument("config", help="YAML config file (sections train, data, model, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config value (parsed as YAML); repeatable")
    return parser.parse_args(argv)


def open_run_dir(log: RunLog, cfg: Config) -> None:
    try:
        log.open(dump_config(cfg), tensorboard=cfg.log.tensorboard)
    except OSError as err:
        raise ConfigError(f"run.dir = {cfg.run.dir!r} cannot be written: {err.strerror or err}. "
                          "HINT: choose a writable folder with --set run.dir=PATH") from err


def train(args: argparse.Namespace) -> int:
    with build_world() as world:
        cfg = world.root_decides(lambda: load_config(args.config, args.overrides))
        with RunLog(cfg.run.dir, enabled=world.is_root) as log:
            world.root_decides(lambda: open_run_dir(log, cfg))
            with Trainer(cfg, world, log) as trainer:
                trainer.fit()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_or_abort(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
