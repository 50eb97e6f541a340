"""torchrun-style start-up: servers, rank, world and token from the environment, read in one
place (ps_worker.environment) by Client, DistributedOptimizer and shard; and each rank's share
of the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from protos.jobspec import variable_of
from protos.security import TOKEN_ENV
from ps_worker import Client, ClientConfig, DistributedOptimizer, InvalidRequestError, shard
from ps_worker.environment import RANK_ENV, SERVERS_ENV, WORLD_ENV, rank_and_world, servers

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(monkeypatch):
    """A clean environment for the variables under test; set them with env(NAME=value)."""
    for name in (SERVERS_ENV, RANK_ENV, WORLD_ENV, TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)

    def set_(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_


def test_the_servers_variable_is_the_one_ps_scheduler_reads():
    assert SERVERS_ENV == variable_of("servers") == "PS_SERVERS"


def test_servers_come_from_the_argument_else_the_environment(env):
    env(PS_SERVERS=" a:1 ,b:2")
    assert servers() == ["a:1", "b:2"]
    assert servers(["c:3"]) == ["c:3"]
    assert servers("c:3,d:4") == ["c:3", "d:4"]  # a string was split into one-letter "servers"


@pytest.mark.parametrize(
    ("given", "variable", "error"),
    [
        (None, None, "no parameter servers: pass servers=.* or set PS_SERVERS=HOST:PORT"),
        (None, "", "PS_SERVERS is empty: give at least one HOST:PORT"),
        (None, " , ", "PS_SERVERS is empty"),
        (None, "a:1,,b:2", "PS_SERVERS 'a:1,,b:2': '' is not HOST:PORT"),
        (None, "localhost", "PS_SERVERS 'localhost': 'localhost' is not HOST:PORT"),
        (None, "127.0.0.1:99999", "'127.0.0.1:99999' has port '99999': a port is a whole number"),
        (None, "a:1,host:abc", "'host:abc' has port 'abc': a port is a whole number from 1"),
        (None, "h:0", "'h:0' has port '0'"),
        (None, "h:1_0", "'h:1_0' has port '1_0'"),
        (None, "h:\u0661", "has port '\u0661'"),
        (None, "http://h:7001", "'http://h:7001' is not HOST:PORT \\(give no scheme"),
        (None, "::1:7001", "is not HOST:PORT \\(an IPv6 host goes in brackets"),
        (["a b:1"], None, "servers \\['a b:1'\\]: 'a b:1' is not HOST:PORT"),
        ([], None, "servers is empty"),
        ([7001], None, "servers must be HOST:PORT addresses, got \\[7001\\]"),
    ],
)
def test_bad_servers_are_refused_naming_where_they_came_from(env, given, variable, error):
    if variable is not None:
        env(PS_SERVERS=variable)
    with pytest.raises(InvalidRequestError, match=error):
        servers(given)
    with pytest.raises(InvalidRequestError, match=error):
        Client(given)


def test_rank_and_world_come_from_the_arguments_else_the_environment(env):
    assert rank_and_world() == (None, None)
    env(RANK="1", WORLD_SIZE="3")
    assert rank_and_world() == (1, 3)
    assert rank_and_world(0, 2) == (0, 2)


@pytest.mark.parametrize(
    ("variables", "given", "error"),
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, {}, "RANK=abc is not a whole number"),
        ({"RANK": "1_0", "WORLD_SIZE": "20"}, {}, "RANK=1_0 is not a whole number"),
        ({"RANK": "\u0661", "WORLD_SIZE": "2"}, {}, "RANK=\u0661 is not a whole number"),
        ({"RANK": "+1", "WORLD_SIZE": "2"}, {}, "RANK=\\+1 is not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "2_0"}, {}, "WORLD_SIZE=2_0 is not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "2.0"}, {}, "WORLD_SIZE=2.0 is not a whole number"),
        ({"RANK": "3", "WORLD_SIZE": "2"}, {}, "RANK 3 >= WORLD_SIZE 2"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, {}, "RANK -1 < 0"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, {}, "WORLD_SIZE 0 < 1"),
        ({"RANK": "1"}, {}, "RANK 1 without a world size: give both"),
        ({"WORLD_SIZE": "2"}, {}, "WORLD_SIZE 2 without a rank"),
        ({"WORLD_SIZE": "2"}, {"rank": 2}, "rank 2 >= WORLD_SIZE 2"),
        ({}, {"rank": 2, "world": 2}, "rank 2 >= world 2: give both, with 0 <= rank < world"),
        ({}, {"rank": "0", "world": 2}, "rank '0' and world 2 must be whole numbers"),
    ],
)
def test_bad_ranks_and_worlds_are_refused_with_one_clear_line(env, variables, given, error):
    env(**variables)
    with pytest.raises(InvalidRequestError, match=error):
        rank_and_world(**given)
    with pytest.raises(InvalidRequestError, match=error):  # before any connection
        DistributedOptimizer(torch.nn.Linear(2, 2), ["127.0.0.1:1"], "j", **given)
    with pytest.raises(InvalidRequestError, match=error):
        shard(10, **given)


def test_a_client_takes_servers_worker_id_and_token_from_the_environment(env):
    env(PS_SERVERS="127.0.0.1:1,127.0.0.1:2", RANK="3", PS_TOKEN="sesame")
    with Client(job_id="j") as client:
        assert client.servers == ["127.0.0.1:1", "127.0.0.1:2"]
        assert client.worker_id == "worker3"  # as DistributedOptimizer names rank 3
        assert client.config.security.token == "sesame"
    with Client(worker_id="mine", config=ClientConfig(security=None)) as client:
        assert client.worker_id == "mine"
    env(RANK="x")
    with pytest.raises(InvalidRequestError, match="RANK=x is not a whole number"):
        Client()


@pytest.mark.parametrize(
    ("variables", "error"),
    [
        ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK 3 >= WORLD_SIZE 2"),
        ({"RANK": "1_0", "WORLD_SIZE": "20"}, "RANK=1_0 is not a whole number"),
        ({"RANK": "\u0661"}, "RANK=\u0661 is not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "x"}, "WORLD_SIZE=x is not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE 0 < 1"),
    ],
)
def test_a_client_checks_its_rank_against_the_world_size(env, variables, error):
    env(PS_SERVERS="127.0.0.1:1", **variables)
    with pytest.raises(InvalidRequestError, match=error):
        Client(job_id="j")


def test_without_a_rank_every_client_gets_its_own_worker_id(env):
    env(PS_SERVERS="127.0.0.1:1")
    with Client() as a, Client() as b:
        assert a.worker_id != b.worker_id and a.session != b.session
        assert a.config.security.token is None


# -------------------------------------------------------------------- shard


@pytest.mark.parametrize("length", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_shards_are_disjoint_cover_everything_and_differ_by_at_most_one(length, world):
    shares = [list(shard(length, rank, world)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(length))
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_keeps_the_type_of_tensors_arrays_and_lists_and_subsets_datasets(env):
    x = torch.arange(10).reshape(5, 2)
    assert torch.equal(shard(x, 1, 2), x[1::2])
    assert shard(np.arange(5), 0, 2).tolist() == [0, 2, 4]
    assert shard(list("abcde"), 1, 2) == ["b", "d"]
    dataset = TensorDataset(torch.arange(5))
    share = shard(dataset, 2, 3)
    assert isinstance(share, Subset) and [share[i][0].item() for i in range(len(share))] == [2]
    env(RANK="1", WORLD_SIZE="2")
    assert shard(5) == range(1, 5, 2)


@pytest.mark.parametrize(
    ("data", "error"),
    [(-1, "a length must be >= 0"), (2.5, "got float"), (None, "got NoneType")],
)
def test_shard_refuses_what_it_cannot_share(data, error):
    with pytest.raises(InvalidRequestError, match=error):
        shard(data, 0, 2)


def test_shard_without_a_rank_says_how_to_give_one(env):
    with pytest.raises(InvalidRequestError, match="pass rank= and world=, or set RANK and"):
        shard(10)
