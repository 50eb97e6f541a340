"""References from torch.distributed, measured in the same run: an RPC (TensorPipe) push and
pull of a tensor between two processes, and a gloo all-reduce across N processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import time


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


def _rpc_main(rank: int, port: int, numel: int, repeats: int, out) -> None:
    import torch
    import torch.distributed.rpc as rpc

    _env(port)
    rpc.init_rpc(f"p{rank}", rank=rank, world_size=2)
    if rank == 0:
        tensor = torch.randn(numel)
        push, pull = [], []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            rpc.rpc_sync("p1", _store, args=(tensor,))
            mid = time.perf_counter()
            rpc.rpc_sync("p1", _fetch)
            push.append(mid - start)
            pull.append(time.perf_counter() - mid)
        out.put((statistics.median(push[1:]), statistics.median(pull[1:])))
    rpc.shutdown()


def measure_rpc(nbytes: int, repeats: int) -> dict:
    """torch.distributed.rpc moving a float32 tensor of nbytes there (push) and back (pull)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rpc_main, args=(r, port, nbytes // 4, repeats, out)) for r in range(2)
    ]
    for p in procs:
        p.start()
    push, pull = out.get(timeout=300)
    for p in procs:
        p.join(60)
    return {
        "push_gbps": nbytes / push / 1e9,
        "pull_gbps": nbytes / pull / 1e9,
        "push_pull_gbps": 2 * nbytes / (push + pull) / 1e9,
    }


def _gloo_main(rank: int, world: int, port: int, numel: int, repeats: int, out) -> None:
    import torch
    import torch.distributed as dist

    _env(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tensor = torch.randn(numel)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(statistics.median(times[1:]))
    dist.destroy_process_group()


def measure_gloo(nbytes: int, world: int, repeats: int) -> dict:
    """Seconds for a gloo all-reduce of a float32 tensor of nbytes across world processes."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_gloo_main, args=(r, world, port, nbytes // 4, repeats, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    seconds = out.get(timeout=300)
    for p in procs:
        p.join(60)
    return {"processes": world, "allreduce_s": seconds}
