"""Ranks that disagree on the world (the initially active workers of an Init) are refused at
once, instead of both being accepted and then waiting for a worker that never comes."""

from __future__ import annotations

import pytest
import torch

from ps_server import checkpoint
from ps_server.errors import AlreadyExists
from ps_server.store import ParameterStore
from ps_worker import ConflictError, DistributedOptimizer
from scheduler.launch import servers
from tests.storekit import chunks_for, initial_values, make_job, new_store

WORLD_2 = ["worker0", "worker1"]
DISAGREES = r"differs in: workers \(held: worker0, worker1; asked: worker0, worker1, worker2\)"


def init(store: ParameterStore, workers) -> bool:
    job = make_job("sync", workers=workers)
    return store.initialise(job, chunks_for(job, initial_values()))


def test_an_init_with_another_world_conflicts_naming_the_workers():
    store, _ = new_store("sync", workers=WORLD_2)
    assert not init(store, ["worker1", "worker0"])  # the same world, in another order
    assert not init(store, [])  # a worker daemon's Init: the scheduler sets its membership
    with pytest.raises(AlreadyExists, match=DISAGREES):
        init(store, [*WORLD_2, "worker2"])
    with pytest.raises(AlreadyExists, match=r"differs in: workers \(held: worker0, worker1; "):
        init(store, ["worker0"])
    assert store.active_workers() == WORLD_2
    daemons, _ = new_store("sync")  # held without workers: a rank's Init is the same job
    assert not init(daemons, WORLD_2)


def test_a_restored_job_keeps_its_world(tmp_path):
    store, _ = new_store("sync", workers=WORLD_2)
    checkpoint.write(checkpoint.snapshot(store), tmp_path)
    copy = ParameterStore()
    checkpoint.restore(copy, checkpoint.read(tmp_path))
    assert not init(copy, WORLD_2)  # the ranks coming back after a restart
    with pytest.raises(AlreadyExists, match=DISAGREES):
        init(copy, [*WORLD_2, "worker2"])


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_rank_with_another_world_is_refused_at_once(tmp_path):
    model = torch.nn.Linear(4, 2)
    with (
        servers(1, tmp_path) as (server,),
        DistributedOptimizer(model, [server.address], "w", 0, 2, mode="sync"),
        pytest.raises(ConflictError, match=DISAGREES),  # not a wait for worker2
    ):
        DistributedOptimizer(model, [server.address], "w", 1, 3, mode="sync")
