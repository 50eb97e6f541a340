"""``ps-data``: prepare a dataset as shard files for a job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ps_worker.data import DATASETS, MANIFEST, DataError, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ps-data", description="Prepare data shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write a dataset as N shards, a test file and a manifest")
    p.add_argument("--dataset", choices=DATASETS, required=True, help="data set to prepare")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--shards", type=int, default=16, help="training shards (default 16)")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples to generate, train and test together (mnist1d default 25000)",
    )
    p.add_argument("--seed", type=int, default=0, help="generation and shuffling (default 0)")
    p.add_argument(
        "--if-missing", action="store_true", help="do nothing if OUT already holds a manifest"
    )
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < 10:
        parser.error("--samples must be at least 10")
    if args.if_missing and (args.out / MANIFEST).exists():
        print(f"{args.out} already holds prepared data")
        return 0
    try:
        m = prepare(args.dataset, args.out, args.shards, args.samples, args.seed)
    except (DataError, OSError) as e:
        print(f"ps-data: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {len(m.shards)} shards ({m.train_samples} training samples) and "
        f"{m.test.samples} test samples of {m.dataset} to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
