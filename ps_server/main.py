"""``ps-server``: the parameter-server daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from protos import listen, observability, parent, security
from protos.limits import Limits
from protos.orphans import SOCKET_PREFIX, SOCKET_SUFFIX, owned_name, remove_orphans
from protos.shm import SEGMENT_PREFIX, default_dir
from ps_server.bulk import BulkConfig, BulkPlane
from ps_server.checkpoint import Checkpointer, CheckpointError, Every
from ps_server.metrics import ServerMetrics
from ps_server.service import ServiceConfig, start_server
from ps_server.store import ParameterStore

log = logging.getLogger("ps_server")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of ps-server, each with its help."""
    parser = argparse.ArgumentParser(
        prog="ps-server",
        description="Hold a partition of a model's parameters and optimizer state, and apply "
        "sync, async or bounded-staleness (ssp) updates pushed by workers.",
    )
    listen.add_arguments(parser)
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        default=ServiceConfig.chunk_bytes,
        help="bytes of tensor data per pull message (default 1 MiB)",
    )
    parser.add_argument(
        "--max-wait-s",
        type=float,
        default=ServiceConfig.max_wait_s,
        help="longest a pull without a deadline waits for the barrier or bound, in seconds "
        f"(default {ServiceConfig.max_wait_s:g})",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="accept NaN/Inf gradients (rejected by default)",
    )
    parser.add_argument(
        "--max-model-bytes",
        type=int,
        default=Limits.max_model_bytes,
        help="refuse jobs whose model is larger (default 64 GiB)",
    )
    parser.add_argument(
        "--unix-socket",
        default=os.environ.get("PS_UNIX_SOCKET", "auto"),
        help="also listen on this Unix socket, which clients on this host use instead of TCP; "
        "'auto' (default) picks one in the temp directory, 'none' turns it off",
    )
    parser.add_argument(
        "--shm-dir",
        default=os.environ.get("PS_SHM_DIR", "auto"),
        help="directory where clients on this host put shared-memory segments, so tensor data "
        "skips the socket; 'auto' (default) uses /dev/shm, 'none' turns it off",
    )
    parser.add_argument(
        "--bulk-port",
        default=os.environ.get("PS_BULK_PORT", "auto"),
        help="TCP port of the bulk data plane, over which clients on other hosts move tensor "
        "data beside gRPC; 'auto' (default) or 0 takes a free port (Status advertises the "
        "port), 'none' turns it off (clients then use gRPC streams)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=os.environ.get("PS_CHECKPOINT_DIR") or None,
        help="write checkpoints here (and on SIGTERM), and restore the latest one on start",
    )
    parser.add_argument(
        "--checkpoint-every",
        default=os.environ.get("PS_CHECKPOINT_EVERY", "30s"),
        help="how often: seconds ('30s'), versions applied ('500'), or both ('30s,500'); "
        "default 30s",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=5.0,
        help="seconds in-flight calls get to finish on SIGTERM (default 5)",
    )
    security.add_arguments(parser, serves=True, connects=False)
    observability.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chunk_bytes < 1024:
        parser.error("--chunk-bytes must be at least 1024")
    try:
        args.checkpoint_every = Every.parse(args.checkpoint_every)
    except ValueError as e:
        parser.error(f"--checkpoint-every: {e}")
    try:
        args.security = security.server_security(args)
        args.tls = args.security.ssl_context()
    except security.SecurityError as e:
        parser.error(str(e))
    args.bulk_port = bulk_port(parser, args.bulk_port)
    return args


def bulk_port(parser: argparse.ArgumentParser, choice: str) -> int | None:
    """--bulk-port: None for 'none', 0 (a free port) for 'auto' or 0, else the port."""
    if choice in ("none", "auto"):
        return None if choice == "none" else 0
    if not choice.isdigit() or int(choice) > 65535:
        parser.error(
            f"--bulk-port must be 'auto', 'none' or a port (0: a free one), not {choice!r}"
        )
    return int(choice)


async def serve(args: argparse.Namespace) -> int:
    address = f"{args.host}:{args.port}"
    if busy := listen.cannot_listen("ps-server", args.host, args.port):  # before anything
        print(busy, file=sys.stderr)
        return 2
    store = ParameterStore(reject_nonfinite=not args.allow_nonfinite)
    checkpointer = None
    if args.checkpoint_dir:
        checkpointer = Checkpointer(store, args.checkpoint_dir, args.checkpoint_every)
        try:
            restored = checkpointer.restore_if_any()
        except CheckpointError as e:
            print(f"ps-server: {e}", file=sys.stderr)
            return 1
        if restored is not None:
            log.info(
                "restored job %s at version %d from %s",
                restored.manifest["job_id"],
                restored.version,
                args.checkpoint_dir,
            )
    socket_path = unix_socket_path(args.unix_socket)
    segments_dir = shm_dir(args.shm_dir)
    sweep(socket_path, segments_dir)
    plane = None
    if args.bulk_port is not None:
        try:
            plane = BulkPlane(BulkConfig(args.host, args.bulk_port), args.security.token, args.tls)
        except OSError as e:
            print(listen.cannot_listen("ps-server", args.host, args.bulk_port, e), file=sys.stderr)
            return 2
    config = ServiceConfig(
        chunk_bytes=args.chunk_bytes,
        max_wait_s=args.max_wait_s,
        unix_socket=f"unix:{socket_path}" if socket_path else "",
        shm_dir=segments_dir,
        limits=Limits(max_model_bytes=args.max_model_bytes),
    )
    metrics = None
    if args.metrics_port is not None:
        age = (lambda: time.monotonic() - checkpointer.written_at) if checkpointer else None
        metrics = ServerMetrics(age)
        metrics_port = observability.serve_metrics(
            metrics.registry, args.metrics_port, args.host, "ps-server"
        )
        log.info("metrics on http://%s:%d/metrics", args.host, metrics_port)
    try:
        on_end = (lambda _job_id: checkpointer.discard()) if checkpointer else None
        on_init = first_checkpoint(checkpointer) if checkpointer else None
        server, port, health_servicer = await start_server(
            store, address, config, args.security, metrics, on_end, on_init, plane
        )
    except RuntimeError as e:  # taken meanwhile, or not an address of this host
        print(listen.cannot_listen("ps-server", args.host, args.port, e), file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ps-server listening on {args.host}:{port}", flush=True)
    if metrics is not None:
        print(f"ps-server metrics on {args.host}:{metrics_port}", flush=True)
    log.info("serving on %s:%d (pid %d)", args.host, port, os.getpid())
    if plane is not None:
        log.info("bulk data plane on %s:%d", args.host, plane.port)
    periodic = asyncio.create_task(checkpoint_loop(checkpointer, stop)) if checkpointer else None
    await stop.wait()
    log.info("shutting down")
    if plane is not None:
        plane.close()  # no bulk call applies anything after this: the checkpoint holds all
    await health_servicer.enter_graceful_shutdown()
    await server.stop(args.grace_s)
    if checkpointer is not None:
        assert periodic is not None
        await periodic
        snap = checkpointer.snapshot()  # every acknowledged push is in it: no call runs now
        if snap is not None:
            log.info("checkpoint at version %d: %s", snap.version, checkpointer.save(snap))
    if socket_path:
        socket_path.unlink(missing_ok=True)
    return 0


def first_checkpoint(checkpointer: Checkpointer) -> Callable[[], Awaitable[None]]:
    """What an Init awaits before its answer: a job without a checkpoint yet gets one, so a
    server killed at any moment after an acknowledged Init comes back holding the job (the
    periodic checkpoints start only after the first update)."""
    lock = asyncio.Lock()

    async def first() -> None:
        async with lock:  # concurrent Inits of one job: one writes, all wait for it
            if checkpointer.written_version is None:
                await save_checkpoint(checkpointer)

    return first


async def save_checkpoint(checkpointer: Checkpointer) -> None:
    """Snapshot the store on the event loop, between two requests, so it is consistent;
    write the file on a thread while the server goes on (an error is logged)."""
    snap = checkpointer.snapshot()
    if snap is None:
        return
    try:
        path = await asyncio.to_thread(checkpointer.save, snap)
    except OSError as e:
        log.error("checkpoint failed: %s", e)
        return
    if path is not None:  # None: the job was ended meanwhile
        log.info("checkpoint at version %d: %s", snap.version, path)


async def checkpoint_loop(checkpointer: Checkpointer, stop: asyncio.Event) -> None:
    """Write a checkpoint whenever one is due, until stopped."""
    every = checkpointer.every.seconds
    poll = min(1.0, every) if every else 1.0  # a checkpoint is never later than its interval
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
        if not stop.is_set() and checkpointer.due():
            await save_checkpoint(checkpointer)


def unix_socket_path(choice: str) -> Path | None:
    """The socket to listen on: a fresh one in the temp directory for 'auto'."""
    if choice == "none":
        return None
    if choice == "auto":
        return Path(tempfile.gettempdir()) / owned_name(SOCKET_PREFIX, SOCKET_SUFFIX, 8)
    return Path(choice)


def sweep(socket_path: Path | None, segments_dir: str) -> None:
    """Remove what killed servers and clients left: sockets beside ours (and in the temp
    directory), segments in the shared-memory directory we offer."""
    dirs = {tempfile.gettempdir(), *([str(socket_path.parent)] if socket_path else [])}
    removed = [p for d in dirs for p in remove_orphans(d, SOCKET_PREFIX, SOCKET_SUFFIX)]
    if segments_dir:
        removed += remove_orphans(segments_dir, SEGMENT_PREFIX)
    if removed:
        log.info("removed %d file(s) dead processes left: %s", len(removed), ", ".join(removed))


def shm_dir(choice: str) -> str:
    """The shared-memory directory to offer: /dev/shm (or the temp directory) for 'auto'."""
    if choice == "none":
        return ""
    if choice == "auto":
        return default_dir()
    if not os.path.isdir(choice):
        raise SystemExit(f"ps-server: --shm-dir {choice} is not a directory")
    return os.path.abspath(choice)


def main(argv: list[str] | None = None) -> int:
    parent.die_with_launcher()  # a launcher's child ends with it
    args = parse_args(argv)
    observability.configure_logging(args)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
