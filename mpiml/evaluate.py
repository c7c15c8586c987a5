"""`[mpirun -np N] python -m mpiml.evaluate CHECKPOINT [--split eval|train] [--set k=v ...]`

Evaluates a saved model on the split it was trained with: the config comes from the checkpoint
itself (`config.yaml` beside `model.pt`), so the dataset, its held-out split and the model are
rebuilt exactly; `--set` can point the data elsewhere (say `data.x_path` on another machine).
The weights are read with `torch.load(weights_only=True)`: a checkpoint never runs code. Under
`mpirun` each rank evaluates its strided share and the sums are reduced, so the numbers do not
depend on the number of ranks. CHECKPOINT is a `step-<N>` folder or a run directory (its newest
committed checkpoint is taken).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mpiml.checkpoint import load_tensors, resolve_checkpoint, verify_checkpoint
from mpiml.comm import World, build_world
from mpiml.comm.world import run_or_abort
from mpiml.config import Config, load_config
from mpiml.data import build_dataset
from mpiml.errors import CheckpointError
from mpiml.evaluation import EvalResult, eval_batch_size, evaluate_model
from mpiml.models import build_model
from mpiml.trainer import threads_per_rank


def _open(path: str | Path, overrides: Sequence[str]) -> tuple[Path, Config, int]:
    folder = resolve_checkpoint(path)
    meta = verify_checkpoint(folder)  # marker and checksums: never evaluate a torn file
    cfg = load_config(folder / "config.yaml", overrides)
    return folder, cfg, int(meta.get("step", -1))


def evaluate_checkpoint(world: World, path: str | Path, split: str = "eval",
                        overrides: Sequence[str] = ()) -> tuple[Path, int, EvalResult | None]:
    """Rebuild the checkpoint's dataset and model, load its weights, evaluate across `world`."""
    folder, cfg, step = world.root_decides(lambda: _open(path, overrides))
    torch.set_num_threads(threads_per_rank(world.local_size, cfg.train.threads))
    dataset = world.run_together(lambda: build_dataset(cfg.data, cfg.train.seed))
    model = world.run_together(lambda: build_model(
        cfg.model.name, cfg.model.kwargs, dataset.input_shape, dataset.num_classes,
        dataset.kind))

    def load() -> None:
        state = load_tensors(folder, "model")
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{folder}/model.pt does not fit model {cfg.model.name!r} "
                                  f"built from its config: {err}") from err

    world.run_together(load)
    data = dataset.eval if split == "eval" else dataset.train
    result = evaluate_model(model, data, world, eval_batch_size(cfg.data.batch_size))
    return folder, step, result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpiml.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-<N>, or RUN_DIR")
    parser.add_argument("--split", choices=("eval", "train"), default="eval",
                        help="which split of the checkpoint's dataset (default: eval)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override the stored config's value")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead")
    args = parser.parse_args(argv)

    def run() -> int:
        with build_world() as world:
            folder, step, result = evaluate_checkpoint(world, args.checkpoint, args.split,
                                                       args.overrides)
            if world.is_root:
                print(_report(folder, step, args.split, result, world.size, args.json),
                      flush=True)
        return 0

    return run_or_abort(run)


def _report(folder: Path, step: int, split: str, result: EvalResult | None, ranks: int,
            as_json: bool) -> str:
    if as_json:
        fields = {"checkpoint": str(folder), "step": step, "split": split, "ranks": ranks}
        if result is not None:
            fields.update(loss=round(result.loss, 6), accuracy=round(result.accuracy, 6),
                          samples=result.samples)
        return json.dumps(fields)
    if result is None:
        return f"{folder} (step {step}): the {split} split is empty"
    return (f"{folder} (step {step}): {split} loss {result.loss:.4f}  accuracy "
            f"{result.accuracy:.2%}  ({result.samples} samples, {ranks} rank(s))")


if __name__ == "__main__":
    sys.exit(main())
