"""References from torch.distributed, measured in the same run: an RPC (TensorPipe) push and
pull of a tensor between two processes, and a gloo all-reduce across N processes; on
loopback, or each process at its own place (:mod:`benchmarks.places`)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Sequence

from benchmarks.places import Place, loopback


def _free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _env(port: int, places: Sequence[Place], rank: int) -> None:
    """Enter this rank's place; rank 0's address is the rendezvous."""
    here = places[rank]
    here.enter()
    os.environ.update(
        MASTER_ADDR=places[0].address,
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        TP_SOCKET_IFNAME=here.ifname,
        GLOO_SOCKET_IFNAME=here.ifname,
    )


_STORED: dict = {}


def _store(tensor):  # runs in the RPC server process
    _STORED["t"] = tensor
    return True


def _fetch():
    return _STORED["t"]


def _rpc_main(rank: int, world: int, port: int, rounds, places, out) -> None:
    _env(port, places, rank)
    import torch
    import torch.distributed.rpc as rpc

    options = rpc.TensorPipeRpcBackendOptions()
    if len({p.netns for p in places}) > 1:
        # Hosts apart: over the network. TensorPipe's shared-memory transport and its
        # cross-memory-attach channel would see one machine through the namespaces.
        options = rpc.TensorPipeRpcBackendOptions(_transports=["uv"], _channels=["basic"])
    rpc.init_rpc(f"p{rank}", rank=rank, world_size=world, rpc_backend_options=options)
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


def measure_rpc(
    rounds: Sequence[tuple[int, int]], places: Sequence[Place] | None = None
) -> dict[int, dict[str, float]]:
    """For each (nbytes, repeats): torch.distributed.rpc moving a float32 tensor of nbytes
    from places[0] to places[1] (push) and back (pull), medians."""
    results = _spawn(_rpc_main, 2, list(rounds), places or loopback(2))
    return {
        nbytes: {
            "push_gbps": nbytes / push / 1e9,
            "pull_gbps": nbytes / pull / 1e9,
            "push_pull_gbps": 2 * nbytes / (push + pull) / 1e9,
        }
        for nbytes, (push, pull) in results.items()
    }


def _gloo_main(rank: int, world: int, port: int, rounds, places, out) -> None:
    _env(port, places, rank)
    import torch
    import torch.distributed as dist

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


def measure_gloo(
    rounds: Sequence[tuple[int, int]], world: int, places: Sequence[Place] | None = None
) -> dict[int, dict[str, float]]:
    """For each (nbytes, repeats): seconds for a gloo all-reduce of a float32 tensor of
    nbytes across world processes, rank r at places[r] (median)."""
    results = _spawn(_gloo_main, world, list(rounds), places or loopback(world))
    return {n: {"processes": world, "allreduce_s": s} for n, s in results.items()}


def _spawn(target, world: int, rounds: list[tuple[int, int]], places: Sequence[Place]) -> dict:
    """Run target(rank, world, port, rounds, places, queue) in world fresh processes; rank
    0's result."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port(places[0].address)
    args = [(r, world, port, rounds, list(places[:world]), out) for r in range(world)]
    procs = [ctx.Process(target=target, args=a) for a in args]
    for p in procs:
        p.start()
    try:
        return out.get(timeout=600)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
