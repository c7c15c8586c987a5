"""`python -m mpiml.plot RUN_DIR [RUN_DIR ...] [--out DIR]`: PNGs from metrics.jsonl.

Writes `loss.png` (training loss, and evaluation loss as markers), `accuracy.png` (evaluation
accuracy), `throughput.png` (global samples/s), `lr.png` (learning rate per step) and
`breakdown.png` (where a step's time goes: data, forward/backward, exposed communication,
optimizer, one panel per run, with the slowest rank's step time and the busiest rank's work
per step on top). Several runs are
overlaid, each labelled by its run directory, so two settings compare at a glance.

Uses matplotlib's `Figure` directly (the Agg renderer, no pyplot, no display): it runs on a
login node or in a batch job. Only rank 0 ever wrote metrics.jsonl, so no MPI is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

STAGES = ("data", "forward_backward", "comm_exposed", "optimizer")


@dataclass
class Run:
    label: str
    train: list[dict[str, Any]]  # training records, one per step, in step order
    evals: list[dict[str, Any]]  # evaluation records, in step order


def read_run(run_dir: Path, label: str) -> Run:
    """Records of one run. A resumed run appends records again from its checkpoint's step: the
    newest record of each step wins. A line torn by a crash is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"mpiml.plot: {run_dir} has no metrics.jsonl (is it a run directory, "
                         "i.e. the run.dir of a training job?)")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            print(f"mpiml.plot: {path}:{number}: skipping a line that is not JSON",
                  file=sys.stderr)
            continue
        if "eval_accuracy" in record or "eval_loss" in record:
            evals[record.get("step", 0)] = record
        elif "loss" in record:
            train[record.get("step", 0)] = record
    return Run(label, [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)])


def labels_for(run_dirs: Sequence[Path]) -> list[str]:
    """The shortest distinct labels: folder names, or whole paths when names repeat."""
    names = [p.resolve().name for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _figure(title: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _finish(fig: Figure, ax: Any, path: Path, drew: bool) -> Path:
    if drew:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no records of this kind in these runs", ha="center", va="center",
                transform=ax.transAxes)
    fig.savefig(path)
    return path


def plot_loss(runs: list[Run], out: Path) -> Path:
    fig, ax = _figure("Loss (training: line; evaluation: markers)", "cross-entropy")
    drew = False
    for i, run in enumerate(runs):
        color = f"C{i}"
        steps, values = _series(run.train, "loss")
        if steps:
            ax.plot(steps, values, color=color, label=f"{run.label} train")
            drew = True
        steps, values = _series(run.evals, "eval_loss")
        if steps:
            ax.plot(steps, values, "o--", color=color, label=f"{run.label} eval")
            drew = True
    return _finish(fig, ax, out / "loss.png", drew)


def plot_simple(runs: list[Run], out: Path, name: str, key: str, title: str, ylabel: str,
                evals: bool = False) -> Path:
    fig, ax = _figure(title, ylabel)
    drew = False
    for i, run in enumerate(runs):
        steps, values = _series(run.evals if evals else run.train, key)
        if steps:
            ax.plot(steps, values, "o-" if evals else "-", color=f"C{i}", label=run.label)
            drew = True
    return _finish(fig, ax, out / name, drew)


def plot_breakdown(runs: list[Run], out: Path) -> Path:
    """Stacked stage times per step for each run, and the slowest rank's step time."""
    fig = Figure(figsize=(8, 3.2 * len(runs) + 0.8), dpi=100, layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False, sharex=True)[:, 0]
    for ax, run in zip(axes, runs, strict=True):
        ax.set_title(f"{run.label}: time per step by stage")
        ax.set_ylabel("ms per step")
        ax.grid(True, alpha=0.3)
        records = [r for r in run.train if isinstance(r.get("breakdown_ms"), dict)]
        if not records:
            ax.text(0.5, 0.5, "no breakdown_ms in this run", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        steps = [r["step"] for r in records]
        stacks = [[r["breakdown_ms"].get(stage, 0.0) for r in records] for stage in STAGES]
        ax.stackplot(steps, stacks, labels=[s.replace("_", " ") for s in STAGES], alpha=0.8)
        slow_steps, slowest = _series(records, "slowest_step_ms")
        if slow_steps:
            ax.plot(slow_steps, slowest, "k--", linewidth=1, label="slowest rank's step")
        busy_steps, busiest = _series(records, "busy_ms_max")
        if busy_steps:  # above rank 0's own busy time (the stack without comm): a straggler
            ax.plot(busy_steps, busiest, "k:", linewidth=1.5, label="busiest rank's work")
        ax.legend(fontsize="small", loc="upper right")
    axes[-1].set_xlabel("optimizer step")
    path = out / "breakdown.png"
    fig.savefig(path)
    return path


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Write every figure for `run_dirs` into `out`; return the files written."""
    dirs = [Path(d) for d in run_dirs]
    runs = [read_run(d, label) for d, label in zip(dirs, labels_for(dirs), strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_loss(runs, out),
        plot_simple(runs, out, "accuracy.png", "eval_accuracy", "Evaluation accuracy",
                    "accuracy", evals=True),
        plot_simple(runs, out, "throughput.png", "samples_per_s",
                    "Throughput (all ranks together)", "samples / s"),
        plot_simple(runs, out, "lr.png", "lr", "Learning rate", "learning rate"),
        plot_breakdown(runs, out),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpiml.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (each holds a metrics.jsonl)")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write the PNGs (default: RUN_DIR/plots for one run, "
                             "./plots for several)")
    args = parser.parse_args(argv)
    out = args.out or (Path(args.run_dirs[0]) / "plots" if len(args.run_dirs) == 1 else "plots")
    try:
        written = plot_runs(args.run_dirs, out)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
