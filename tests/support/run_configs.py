"""Train several configs one after another inside one `mpiexec` job (torch imported once).

    mpiexec -n 2 python tests/support/run_configs.py JOBS_JSON

JOBS_JSON is a list of argument lists for `python -m mpiml.train`. Exits with the first
non-zero exit code, after printing which config it came from.
"""

from __future__ import annotations

import json
import sys

from mpiml.train import main


def run(jobs: list[list[str]]) -> int:
    for argv in jobs:
        code = main(argv)
        if code:
            print(f"run_configs: {argv[0]} exited with {code}", file=sys.stderr, flush=True)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
