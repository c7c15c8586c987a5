"""`python -m mpiml.check_config CONFIG [--set section.key=value ...] [--ranks N]`

Validates a config exactly as `mpiml.train` would, but on a login node: no MPI is imported (a
test makes sure), nothing is written. On success it prints the resolved config (every key, as
YAML that `mpiml.train` accepts back) and what follows from it for N ranks; on error it prints
the message naming the key and exits 2, the same code `mpiml.train` uses for bad input.

With `--build` it also opens the dataset and builds the model, as every rank will (this imports
torch): missing or malformed data files, a model that does not import or whose `model.kwargs`
do not fit, and a training split too small for N ranks are caught before the job is queued.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mpiml.config import Config, add_override_option, dump_config, load_config, scaled_lr
from mpiml.errors import MpimlError

EXIT_USAGE = 2  # as mpiml.comm.world.EXIT_USAGE, without importing MPI for it


def summary(cfg: Config, ranks: int) -> str:
    """Derived numbers people get wrong: the global batch and the learning rate after scaling."""
    per_step = cfg.data.batch_size * cfg.train.accumulate_steps
    lines = [f"with {ranks} rank(s): global batch {per_step * ranks} "
             f"({ranks} x data.batch_size {cfg.data.batch_size}"
             + (f" x train.accumulate_steps {cfg.train.accumulate_steps}"
                if cfg.train.accumulate_steps > 1 else "") + ")",
             f"peak learning rate {scaled_lr(cfg.optim, ranks):g} (optim.lr {cfg.optim.lr:g}, "
             f"lr_scaling {cfg.optim.lr_scaling})"]
    if cfg.train.max_steps is not None:
        lines.append(f"stops after at most {cfg.train.max_steps} optimizer steps")
    return "".join(f"# {line}\n" for line in lines)


def build(cfg: Config, ranks: int) -> str:
    """Open the data and build the model as rank 0 of `ranks` would; describe what was built."""
    from mpiml.data import ShardedLoader, build_dataset  # torch: only when asked
    from mpiml.models import build_model

    dataset = build_dataset(cfg.data, cfg.train.seed)
    loader = ShardedLoader(dataset.train, cfg.data.batch_size * cfg.train.accumulate_steps, 0,
                           ranks, cfg.train.seed)
    model = build_model(cfg.model.name, cfg.model.kwargs, dataset.input_shape,
                        dataset.num_classes, dataset.kind)
    params = sum(p.numel() for p in model.parameters())
    return (f"# built: data {cfg.data.name} ({len(dataset.train):,} train / "
            f"{len(dataset.eval):,} eval, inputs {tuple(dataset.input_shape)}, "
            f"{dataset.num_classes} classes), {loader.steps_per_epoch} steps/epoch at "
            f"{ranks} rank(s); model {cfg.model.name} ({params:,} parameters)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpiml.check_config",
        description="Validate a config without MPI and print it resolved (exit 2 if invalid).")
    parser.add_argument("config", help="YAML config file")
    add_override_option(parser)
    parser.add_argument("--ranks", type=int, default=1, metavar="N",
                        help="world size to show the global batch and scaled lr for (default 1)")
    parser.add_argument("--build", action="store_true",
                        help="also open the dataset and build the model (imports torch)")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks {args.ranks}: expected an integer >= 1")
    try:
        cfg = load_config(args.config, args.overrides)
        built = build(cfg, args.ranks) if args.build else ""
    except MpimlError as err:
        print(f"mpiml: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(f"# {args.config}: valid\n" + summary(cfg, args.ranks) + built
                     + dump_config(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
