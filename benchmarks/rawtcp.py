"""The reference: raw TCP moving the same bytes between two processes (on loopback, or from
this namespace to a host's: :mod:`benchmarks.places`)."""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import struct
import time
from collections.abc import Sequence

import numpy as np

from benchmarks.places import Place

_LENGTH = struct.Struct("<Q")


def _echo_server(port_queue: mp.Queue, there: Place) -> None:
    """Per round: read a length, receive that many bytes, send them back (a push, a pull)."""
    there.enter()
    with socket.create_server((there.address, 0)) as listener:
        port_queue.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            buf = bytearray()
            head = memoryview(bytearray(_LENGTH.size))
            while True:
                try:
                    _recv_exact(conn, head)
                except ConnectionError:
                    return
                (n,) = _LENGTH.unpack(head)
                if len(buf) < n:
                    buf = bytearray(n)
                view = memoryview(buf)[:n]
                _recv_exact(conn, view)
                conn.sendall(view)


def _recv_exact(conn: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = conn.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed early")
        got += n


def measure_raw_tcp(
    rounds: Sequence[tuple[int, int]], there: Place | None = None
) -> dict[int, dict[str, float]]:
    """For each (nbytes, repeats): the median seconds to send nbytes over TCP to a process
    ``there`` (default: on loopback) and receive them back, and the GB/s that makes (both
    directions counted)."""
    there = there or Place()
    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_echo_server, args=(ports, there), daemon=True)
    proc.start()
    out = {}
    try:
        port = ports.get(timeout=60)
        with socket.create_connection((there.address, port)) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for nbytes, repeats in rounds:
                payload = memoryview(np.random.default_rng(0).bytes(nbytes))
                back = memoryview(bytearray(nbytes))
                times = []
                for _ in range(repeats + 1):  # the first round warms up
                    start = time.perf_counter()
                    conn.sendall(_LENGTH.pack(nbytes))
                    conn.sendall(payload)
                    _recv_exact(conn, back)
                    times.append(time.perf_counter() - start)
                median = statistics.median(times[1:])
                out[nbytes] = {"round_trip_s": median, "gbps": 2 * nbytes / median / 1e9}
        return out
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
