"""`python -m mpiml.data`: make dataset folders that `data.name: npy` trains on.

    python -m mpiml.data convert train.csv DIR [--eval test.csv] [--label-column label]
    python -m mpiml.data convert mnist.npz DIR            # x/y (+ x_test/y_test) arrays
    python -m mpiml.data info DIR                          # check a folder, print its header
    python -m mpiml.data export-digits digits.csv          # a real CSV to try it on
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from mpiml.data.convert import convert
from mpiml.data.samples import scan_labels
from mpiml.data.store import open_store
from mpiml.errors import MpimlError


def _convert(args: argparse.Namespace) -> dict:
    label = args.label_column
    keys = {"x": args.x_key, "y": args.y_key, "eval_x": args.eval_x_key,
            "eval_y": args.eval_y_key}
    return convert(args.source, args.out, eval_source=args.eval, dtype=args.dtype,
                   delimiter=args.delimiter, label_column=label, keys=keys, force=args.force)


def _info(args: argparse.Namespace) -> dict:
    store = open_store(args.folder, "folder")
    low, high = scan_labels(store.train_y, str(store.train_y.path))
    meta = dict(store.meta)
    meta["checked"] = (f"headers match; train labels {low}..{high} of {store.num_classes} "
                       "classes")
    return meta


def _export_digits(args: argparse.Namespace) -> dict:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    table = np.column_stack([bunch.data.astype(np.int64), bunch.target.astype(np.int64)])
    header = ",".join([f"pixel{i}" for i in range(bunch.data.shape[1])] + ["label"])
    np.savetxt(args.out, table, fmt="%d", delimiter=",", header=header, comments="")
    return {"written": args.out, "rows": int(len(table)), "columns": int(table.shape[1])}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpiml.data",
                                     description="Dataset folders for data.name: npy.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="CSV or .npz -> dataset folder (streamed, bounded memory)")
    c.add_argument("source", help="a .csv (one sample per line) or .npz file")
    c.add_argument("out", help="the dataset folder to create")
    c.add_argument("--eval", help="CSV of the held-out split (same columns)")
    c.add_argument("--label-column", default=None,
                   help="CSV label column: index (negative from the end) or header name; "
                        "default: the last")
    c.add_argument("--delimiter", default=",", help="CSV field separator (default ',')")
    c.add_argument("--dtype", default=None,
                   help="stored input dtype, e.g. float32 (CSV default), float16, uint8; .npz "
                        "default: as stored")
    for key in ("x", "y", "eval-x", "eval-y"):
        c.add_argument(f"--{key}-key", default=None, help=f".npz array holding {key}")
    c.add_argument("--force", action="store_true", help="replace an existing folder")
    c.set_defaults(run=_convert)
    i = sub.add_parser("info", help="check a dataset folder and print its header")
    i.add_argument("folder")
    i.set_defaults(run=_info)
    d = sub.add_parser("export-digits", help="write scikit-learn's digits as a CSV file")
    d.add_argument("out")
    d.set_defaults(run=_export_digits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except MpimlError as err:
        print(f"mpiml.data: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
