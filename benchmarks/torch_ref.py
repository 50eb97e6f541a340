"""References from torch.distributed, measured in the same run: an RPC (TensorPipe) push and
pull of a tensor between two processes, and a gloo all-reduce across N processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Sequence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        TP_SOCKET_IFNAME="lo",
        GLOO_SOCKET_IFNAME="lo",
    )


_STORED: dict = {}


def _store(tensor):  # runs in the RPC server process
    _STORED["t"] = tensor
    return True


def _fetch():
    return _STORED["t"]


def _rpc_main(rank: int, world: int, port: int, rounds: list[tuple[int, int]], out) -> None:
    import torch
    import torch.distributed.rpc as rpc

    _env(port)
    rpc.init_rpc(f"p{rank}", rank=rank, world_size=world)
    if rank == 0:
        results = {}
        for nbytes, repeats in rounds:
            tensor = torch.randn(nbytes // 4)
            push, pull = [], []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                rpc.rpc_sync("p1", _store, args=(tensor,))
                mid = time.perf_counter()
                rpc.rpc_sync("p1", _fetch)
                push.append(mid - start)
                pull.append(time.perf_counter() - mid)
            results[nbytes] = (statistics.median(push[1:]), statistics.median(pull[1:]))
        out.put(results)
    rpc.shutdown()


def measure_rpc(rounds: Sequence[tuple[int, int]]) -> dict[int, dict[str, float]]:
    """For each (nbytes, repeats): torch.distributed.rpc moving a float32 tensor of nbytes
    there (push) and back (pull), medians."""
    results = _spawn(_rpc_main, 2, list(rounds))
    return {
        nbytes: {
            "push_gbps": nbytes / push / 1e9,
            "pull_gbps": nbytes / pull / 1e9,
            "push_pull_gbps": 2 * nbytes / (push + pull) / 1e9,
        }
        for nbytes, (push, pull) in results.items()
    }


def _gloo_main(rank: int, world: int, port: int, rounds: list[tuple[int, int]], out) -> None:
    import torch
    import torch.distributed as dist

    _env(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for nbytes, repeats in rounds:
        tensor = torch.randn(nbytes // 4)
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        results[nbytes] = statistics.median(times[1:])
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def measure_gloo(rounds: Sequence[tuple[int, int]], world: int) -> dict[int, dict[str, float]]:
    """For each (nbytes, repeats): seconds for a gloo all-reduce of a float32 tensor of
    nbytes across world processes (median)."""
    results = _spawn(_gloo_main, world, list(rounds))
    return {n: {"processes": world, "allreduce_s": s} for n, s in results.items()}


def _spawn(target, world: int, rounds: list[tuple[int, int]]) -> dict:
    """Run target(rank, world, port, rounds, queue) in world fresh processes; rank 0's result."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, rounds, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return out.get(timeout=600)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
