"""``ps-cluster``: start a scheduler, servers and workers as local processes."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ps-cluster",
        description="Start a whole cluster (scheduler, servers, workers) as local processes. "
        "(Not available yet.)",
    )
    parser.add_argument("command", choices=["up"])
    parser.parse_args(argv)
    print("ps-cluster: not available yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
