"""``ps-scheduler``: owns the job, worker membership and the data-shard task queue."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ps-scheduler",
        description="Own a training job: its spec, the worker membership and the task queue "
        "that hands out data shards as leases. (Not available yet.)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.parse_args(argv)
    print("ps-scheduler: not available yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
