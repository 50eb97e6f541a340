"""The reference: raw loopback TCP moving the same bytes between two processes."""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import time

import numpy as np


def _echo_server(port_queue: mp.Queue, nbytes: int, repeats: int) -> None:
    """Receive nbytes, then send them back, repeats times (a push then a pull)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_queue.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            buf = memoryview(bytearray(nbytes))
            for _ in range(repeats):
                _recv_exact(conn, buf)
                conn.sendall(buf)


def _recv_exact(conn: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = conn.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed early")
        got += n


def measure_raw_tcp(nbytes: int, repeats: int) -> dict[str, float]:
    """Seconds for nbytes one way and back over loopback TCP; median of repeats."""
    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_echo_server, args=(ports, nbytes, repeats + 1), daemon=True)
    proc.start()
    try:
        port = ports.get(timeout=60)
        payload = memoryview(np.random.default_rng(0).bytes(nbytes))
        back = memoryview(bytearray(nbytes))
        times = []
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(repeats + 1):  # the first round warms up
                start = time.perf_counter()
                conn.sendall(payload)
                _recv_exact(conn, back)
                times.append(time.perf_counter() - start)
        median = statistics.median(times[1:])
        return {"round_trip_s": median, "gbps": 2 * nbytes / median / 1e9}
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
