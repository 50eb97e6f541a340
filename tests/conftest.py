"""Suite-wide settings, applied before any test module imports torch.

The suite runs two test processes (``make test``) on a machine of two cores, and each test
starts several daemons of its own. Torch's default of one OpenMP thread per core made every
process's threads busy-wait for cores the other processes held: the two-worker example took
38 s of CPU with the default against 17 s with one thread. ps-cluster gives its children one
thread for the same reason (``scheduler.launch.SHARED_CORES_ENV``); this gives it to the test
processes and to every daemon a test starts itself. A value already in the environment wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from scheduler.launch import SHARED_CORES_ENV, servers

for _name, _value in SHARED_CORES_ENV.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="module")
def _module_servers(tmp_path_factory) -> Iterator[list[str]]:
    with servers(2, tmp_path_factory.mktemp("shared-servers")) as daemons:
        yield [d.address for d in daemons]


@pytest.fixture
def shared_servers(_module_servers) -> Iterator[list[str]]:
    """Two real servers shared by the tests of a module (two processes fewer to start for
    each test), the job a test left on them ended after it, so the next starts on empty
    servers. For tests that only act as clients: one that stops or restarts a server, or
    starts one with its own flags, starts its own."""
    yield _module_servers
    from ps_worker import Client

    with Client(_module_servers) as observer:
        held = {s.config.job_id for s in observer.status() if s.initialised}
    for job_id in held:
        with Client(_module_servers, job_id=job_id) as ender:
            ender.end_job()
    with Client(_module_servers) as observer:
        assert not any(s.initialised for s in observer.status()), "a job outlived its test"
