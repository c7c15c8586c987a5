"""Where to resume from, and what a checkpoint must hold to continue exactly.

`--resume auto` takes the newest checkpoint of `run.dir` that passes its checks (commit marker,
every file's SHA-256 against the one recorded at save time, the files a resume needs), and
falls back to the one before it, saying which path was bad and why. `--resume PATH` takes that
checkpoint or fails naming it; `--resume none` starts afresh.

Exactness: besides model, optimizer and schedule, a checkpoint holds the step, the epoch and
the step within it, and for every rank its RNG states (Python, numpy, torch) and its share of
the metrics not yet logged. Resumed on the same number of ranks, the run then continues with
the same bits as one that never stopped.

Another number of ranks: the strided loader makes the samples of step `t` the slice
`perm[t*G:(t+1)*G]` of the epoch's permutation, for any split of the global batch `G` over
ranks. Keeping `G` therefore keeps the data position: the resumed run takes the next slice, and
no sample of the epoch is skipped or repeated. `fit_config_to_checkpoint` keeps `G` by
changing `data.batch_size` when only the number of ranks changed, and refuses (saying what to
set) when `G` cannot be kept.

No MPI here: callers run these on rank 0 (`World.root_decides`) and share the verdict.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpiml.checkpoint import list_checkpoints, load_tensors, recover_interrupted, verify_checkpoint
from mpiml.config import Config
from mpiml.errors import CheckpointError, ConfigError

# What a resume reads, beyond meta.json: written by Trainer.save_checkpoint.
RESUME_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "ranks.pt")
RESUME_KEYS = ("step", "epoch", "epoch_step", "steps_per_epoch", "world_size", "global_batch",
               "config", "metrics_records")


@dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint to continue from: its folder and its meta.json."""

    path: str
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def check_resumable(path: str | Path) -> dict[str, Any]:
    """Verify a checkpoint (marker, checksums) and that it holds a resume; return its meta."""
    meta = verify_checkpoint(path)
    missing = [f for f in RESUME_FILES if f not in meta.get("files", {})]
    missing += [k for k in RESUME_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed from: it lacks {', '.join(missing)} "
                              f"(written by mpiml {meta.get('mpiml_version', '?')}, which did "
                              "not save the full training state)")
    return meta


def find_resume_point(spec: str, run_dir: str | Path,
                      say: Callable[[str], None] = print) -> ResumePoint | None:
    """Resolve `--resume auto|none|PATH` against `run_dir`; report bad checkpoints via `say`."""
    if spec == "none":
        return None
    if spec != "auto":
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"--resume {spec}: no such checkpoint folder. HINT: give a "
                                  f"checkpoint such as {Path(run_dir) / 'checkpoints'}/step-N, "
                                  "or --resume auto")
        return ResumePoint(str(path), check_resumable(path))
    for line in recover_interrupted(run_dir):
        say(f"mpiml: checkpoints: {line}")
    found = list_checkpoints(run_dir)
    bad: list[str] = []
    for path in reversed(found):
        try:
            return ResumePoint(str(path), check_resumable(path))
        except CheckpointError as err:
            bad.append(str(path))
            say(f"mpiml: checkpoint {path} is not usable, falling back to the previous one: "
                f"{err}")
    if bad:
        raise CheckpointError(
            f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: all {len(bad)} failed "
            "their checks (see above). HINT: --resume none starts over (earlier checkpoints "
            "of the same step are then overwritten)")
    return None


def fit_config_to_checkpoint(cfg: Config, point: ResumePoint | None,
                             world_size: int) -> tuple[Config, list[str]]:
    """Return the config to resume with (the global batch kept) and notes for the user."""
    if point is None:
        return cfg, []
    meta, notes = point.meta, []
    saved = meta["config"]
    global_batch = int(meta["global_batch"])
    b, acc = cfg.data.batch_size, cfg.train.accumulate_steps
    now = b * acc * world_size
    if now != global_batch:
        untouched = (b == saved["data"]["batch_size"]
                     and acc == saved["train"]["accumulate_steps"])
        per_rank, rest = divmod(global_batch, acc * world_size)
        if untouched and rest == 0:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                    batch_size=per_rank))
            notes.append(f"resuming on {world_size} rank(s) from a checkpoint of "
                         f"{meta['world_size']}: data.batch_size {b} -> {per_rank} keeps the "
                         f"global batch of {global_batch}")
        else:
            fits = [n for n in range(1, 1 + global_batch // acc)
                    if (global_batch // acc) % n == 0 and global_batch % acc == 0]
            raise ConfigError(
                f"{point.path} was trained with a global batch of {global_batch} "
                f"({saved['data']['batch_size']} x {saved['train']['accumulate_steps']} "
                f"micro-batch(es) x {meta['world_size']} rank(s)); {world_size} rank(s) with "
                f"data.batch_size={b} and train.accumulate_steps={acc} make {now}. An exact "
                "resume keeps the global batch. HINT: run on a number of ranks in "
                f"{fits[:12]}, or choose data.batch_size x train.accumulate_steps x ranks = "
                f"{global_batch}")
    mine = cfg.to_dict()
    for key in _differences(saved, mine):
        if key not in ("run.dir", "data.batch_size"):
            notes.append(f"note: {key} differs from the checkpoint's config "
                         f"({_get(saved, key)!r} -> {_get(mine, key)!r})")
    return cfg, notes


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys
                for k in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def load_resume_state(point: ResumePoint) -> dict[str, Any]:
    """The tensors of a checkpoint, each file read with `weights_only=True`."""
    return {stem.removesuffix(".pt"): load_tensors(point.path, stem.removesuffix(".pt"))
            for stem in RESUME_FILES}


# -- per-rank RNG state, in a form `torch.load(weights_only=True)` accepts -----------------------

def rng_state() -> dict[str, Any]:
    """This process's Python, numpy (legacy global) and torch RNG states as tensors and ints."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


def reseed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (when no saved state fits this rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
