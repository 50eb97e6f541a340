"""What every daemon shares for being watched: log flags and format, and /metrics.

``--log-level`` and ``--log-format text|json`` (env ``PS_LOG_LEVEL``,
``PS_LOG_FORMAT``) configure the root logger on stderr. JSON lines carry
``time``, ``level``, ``logger`` and ``message``, plus any ``extra=`` fields a
call passes (``worker``, ``epoch``, ...), so a log shipper can index them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from prometheus_client import CollectorRegistry, start_http_server
from pythonjsonlogger.json import JsonFormatter

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_arguments(parser: argparse.ArgumentParser, metrics: bool = True) -> None:
    """Add --log-level, --log-format and (with ``metrics``) --metrics-port."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=os.environ.get("PS_LOG_LEVEL", "INFO").upper(),
        help="least severe level logged (env PS_LOG_LEVEL; default INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get("PS_LOG_FORMAT", "text"),
        help="text, or json: one JSON object a line (env PS_LOG_FORMAT; default text)",
    )
    if metrics:
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=int(os.environ["PS_METRICS_PORT"])
            if os.environ.get("PS_METRICS_PORT")
            else None,
            help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port; "
            "env PS_METRICS_PORT)",
        )


def configure_logging(args: argparse.Namespace) -> None:
    """Send the root logger's records to stderr at ``args.log_level`` in ``args.log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=args.log_level, handlers=[handler], force=True)


def serve_metrics(registry: CollectorRegistry, port: int, host: str, prog: str) -> int:
    """Serve ``registry`` at http://host:port/metrics on a thread and return the port (0
    picks a free one); exit with a clear error if it cannot."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise SystemExit(f"{prog}: cannot serve metrics on {host}:{port}: {e}") from e
    return server.server_port
