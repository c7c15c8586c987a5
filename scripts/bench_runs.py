"""`bench_train.py` run many times, minutes apart: the spread of its figures from run to run.

    python scripts/bench_runs.py [--runs 20] [--np 2] [--pause 5] [-- --models mlp ...]

Why: within one run `bench_train.py` interleaves its contenders and reports medians over
rounds, which cancels noise that lasts seconds. What it cannot cancel is the state of the
machine for the whole run: on the shared 2-core machine, two processes slow each other by
anything from 1% to 13% (the loop with no gradient sync at all against one process alone,
2026-12-05, 36 runs), and that state changes within minutes (`scripts/probe_coherence.py`).
A figure near a threshold then passes in one run and fails in the next, so the claim is the
median over many separate runs, with how many of them passed on their own.

Each run is a fresh `mpiexec -n NP python scripts/bench_train.py ARGS --out FILE`, killed
whole if it outlives `--timeout` (`launch.run_job`); a failed run stops the whole measurement
(its output is shown). Prints one JSON document: per model and figure, every run's value, their
median, minimum and maximum, and how many runs reached the issue's bar (scaling efficiency
0.9, the ratio to DDP 1.0, overlap hiding half the exposed time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launch import run_job

SCRIPT = Path(__file__).resolve().parent / "bench_train.py"

# figure name -> (where bench_train.py puts it, the bar a run should reach)
FIGURES = {
    "scaling_efficiency": (("scaling_efficiency", "mpiml"), 0.9),
    "no_sync_efficiency": (("scaling_efficiency", "local"), 0.9),
    "ratio_mpiml_over_ddp": (("ratio_mpiml_over_ddp",), 1.0),
    "mpiml_vs_no_sync": (("mpiml_vs_no_sync",), 1.0),
    "overlap_hides": (("overlap_hides",), 0.5),
}


def spread(values: list[float], bar: float) -> dict:
    return {"runs": values, "median": round(statistics.median(values), 3),
            "min": min(values), "max": max(values), "bar": bar,
            "runs_at_or_above_bar": sum(v >= bar for v in values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--np", type=int, default=2, help="ranks per run")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("train_args", nargs="*",
                        help="arguments for bench_train.py, after `--` (default: its own)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    per_model: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            if i:
                time.sleep(args.pause)
            out = str(Path(tmp) / f"run{i}.json")
            run_job(args.np, [sys.executable, str(SCRIPT), *args.train_args, "--out", out],
                    args.timeout)
            for result in json.loads(Path(out).read_text())["results"]:
                figures = per_model.setdefault(result["model"], {k: [] for k in FIGURES})
                for name, (path, _) in FIGURES.items():
                    value = result
                    for key in path:
                        value = value[key]
                    figures[name].append(value)
    doc = {"world_size": args.np, "runs": args.runs, "bench_train_args": args.train_args,
           "results": {model: {name: spread(values, FIGURES[name][1])
                               for name, values in figures.items()}
                       for model, figures in per_model.items()}}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
