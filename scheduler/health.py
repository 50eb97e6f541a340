"""``ps-health HOST:PORT``: exit 0 if the daemon there answers SERVING (container health checks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.security import ClientSecurity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ps-health",
        description="Exit 0 if the daemon at HOST:PORT answers SERVING (container health checks).",
    )
    parser.add_argument("address", help="HOST:PORT of a ps-server or ps-scheduler")
    parser.add_argument("--service", default="", help="service name (default: the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="give up after this long")
    parser.add_argument(
        "--tls-ca", type=Path, help="CA to verify a daemon that serves TLS (the check is open)"
    )
    args = parser.parse_args(argv)
    try:
        with ClientSecurity(tls_ca=args.tls_ca).channel(args.address, []) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
            )
    except grpc.RpcError as e:
        print(f"ps-health: {args.address}: {e.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
