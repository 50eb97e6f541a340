"""After EndJob and a new Init with the same job id, the clients of the ended job are refused
(NOT_FOUND, "was ended") instead of pushing into the new one; a client that ended the job
itself carries on in the new one. On the store, then with real Clients and ps-servers."""

from __future__ import annotations

import pytest
import torch

from ps_server.errors import NotFound
from ps_worker import Client
from ps_worker.errors import UnknownJobError
from scheduler.launch import servers
from tests.storekit import chunks_for, initial_values, new_store, push

ENDED = "job 'job' was ended on this server; this client took part in it"


@pytest.mark.timeout(30)
def test_the_clients_of_an_ended_job_are_refused_in_a_new_job_with_its_id():
    store, job = new_store("async", workers=["a"])
    push(store, job, "a", 1, 1.0, session="sa")
    store.pull("job", "b", session="sb")
    store.leave("job", "c", "sc")
    assert store.end("job")
    assert store.initialise(job, chunks_for(job, initial_values()))
    before = store.view()
    for session, worker in (("sa", "a"), ("sb", "b"), ("sc", "c")):
        with pytest.raises(NotFound, match=ENDED):
            push(store, job, worker, 2, 1.0, session=session)
        with pytest.raises(NotFound, match=ENDED):
            store.pull_decision("job", worker, 0, 0, session)
        with pytest.raises(NotFound, match=ENDED):
            store.pull("job", worker, session=session)
        with pytest.raises(NotFound, match=ENDED):
            store.leave("job", worker, session)
        with pytest.raises(NotFound, match=ENDED):
            store.check_contact("job", worker, session)
    assert store.view() == before  # nothing changed
    store.pull("job", "a", observe=True)  # an observing pull carries no session: served
    assert push(store, job, "a", 1, 1.0, session="new").applied  # a new client of a: welcome


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_client_of_an_ended_job_does_not_push_into_the_next_job_with_its_id(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    with servers(2, tmp_path) as daemons:
        addresses = [d.address for d in daemons]
        with Client(addresses, "j", "w0") as old, Client(addresses, "j", "admin") as admin:
            old.init(model, mode="async")
            assert old.push_from(model).applied
            assert admin.init(model, mode="async") is False
            assert admin.push_from(model).applied  # admin took part in the job it ends
            assert admin.end_job() == [True, True]
            with pytest.raises(UnknownJobError, match="job 'j' was ended"):
                old.push_from(model)
            with Client(addresses, "j", "w1") as new:
                assert new.init(model, mode="async")  # the job 'j' again, created afresh
                with pytest.raises(UnknownJobError, match="this client took part in it"):
                    old.push_from(model)
                assert new.push_from(model).applied
                # the client that ended the job starts a new session: it takes part again
                assert admin.init(model, mode="async") is False
                assert admin.push_from(model).applied
                assert [s.updates_applied for s in new.status()] == [2, 2]
