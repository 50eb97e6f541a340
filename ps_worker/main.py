"""``ps-worker``: the worker daemon (training loop driven by the scheduler)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ps-worker",
        description="Lease data shards from the scheduler, pull weights, compute gradients "
        "with PyTorch and push them. (The daemon arrives with the scheduler; today use the "
        "client library: `from ps_worker import Client`.)",
    )
    parser.add_argument("--scheduler", required=True, help="scheduler address HOST:PORT")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.parse_args(argv)
    print(
        "ps-worker: the worker daemon is not available yet; use the client library "
        "(ps_worker.Client) in your own training loop",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
