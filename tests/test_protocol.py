"""The client's protocol state without sockets: the headers it writes, what replies mean."""

from __future__ import annotations

import pytest

from protos import ps_pb2
from ps_worker.protocol import ProtocolState, PushSummary


def pushed(version: int, **fields) -> ps_pb2.PushResponse:
    return ps_pb2.PushResponse(applied=True, version=version, **fields)


def pulled(version: int, worker_clock: int = 0) -> ps_pb2.PullHeader:
    return ps_pb2.PullHeader(version=version, worker_clock=worker_clock)


def test_a_new_worker_pulls_version_zero_at_clock_zero():
    state = ProtocolState("job", "w", 2)
    assert (state.clock, state.next_clock, state.pulled_versions) == (0, 1, [0, 0])
    assert state.pull_request(1) == ps_pb2.PullRequest(job_id="job", worker_id="w")
    assert state.push_header(0, 1) == ps_pb2.PushHeader(job_id="job", worker_id="w", clock=1)


def test_a_pull_records_each_servers_version_and_the_clock_they_know():
    state = ProtocolState("job", "w", 2)
    state.after_pull([pulled(4, worker_clock=3), pulled(7, worker_clock=2)])
    assert state.pulled_versions == [4, 7] and state.clock == 3  # a restarted worker catches up
    assert state.push_header(1, 4) == ps_pb2.PushHeader(
        job_id="job", worker_id="w", clock=4, pulled_version=7
    )
    assert state.pull_request(0) == ps_pb2.PullRequest(
        job_id="job", worker_id="w", clock=3, min_version=4
    )
    state.after_pull([pulled(5, worker_clock=1), pulled(8)])
    assert state.clock == 3  # the clock never goes back


def test_a_push_sums_up_the_replies_and_the_next_pull_waits_for_the_next_step():
    state = ProtocolState("job", "w", 2)
    state.after_pull([pulled(2), pulled(5)])
    summary = state.after_push(
        state.next_clock,
        [pushed(3, staleness=1, lr=0.1), pushed(6, duplicate=True, dropped=True, lr=0.2)],
    )
    assert summary == PushSummary(
        clock=1,
        applied=True,
        duplicate=False,
        dropped=True,
        staleness=(1, 0),
        lr=(0.1, 0.2),
        versions=(3, 6),
    )
    assert state.clock == 1 and state.pulled_versions == [2, 5]  # a push pulls nothing
    assert [state.pull_request(i).min_version for i in range(2)] == [3, 6]  # sync: next step
    assert [state.pull_request(i).clock for i in range(2)] == [1, 1]
    assert state.after_push(2, [pushed(4, duplicate=True), pushed(7, duplicate=True)]).duplicate


def test_an_observing_pull_asks_without_waiting_and_changes_nothing():
    state = ProtocolState("job", "w", 1)
    state.after_pull([pulled(2, worker_clock=1)])
    state.after_push(2, [pushed(3)])
    request = state.pull_request(0, observe=True)
    assert request.observe and request.clock == 2 and request.min_version == 3
    state.after_pull([pulled(9, worker_clock=8)], observe=True)
    assert (state.clock, state.pulled_versions, state.min_versions) == (2, [2], [3])


def test_a_step_pushes_at_the_next_clock_and_pulls_the_version_after_the_last_pulled():
    state = ProtocolState("job", "w", 2)
    state.after_pull([pulled(4), pulled(1)])
    clock = state.next_clock
    header = state.step_header(1, clock)
    assert header == ps_pb2.StepHeader(
        push=ps_pb2.PushHeader(job_id="job", worker_id="w", clock=1, pulled_version=1),
        pull=ps_pb2.PullRequest(job_id="job", worker_id="w", clock=1, min_version=2),
    )
    replies = [pulled(5, worker_clock=1), pulled(2, worker_clock=1)]
    for reply, version in zip(replies, (5, 2), strict=True):
        reply.push.CopyFrom(pushed(version))
    summary = state.after_push(clock, [r.push for r in replies])
    state.after_pull(replies)
    assert summary.versions == (5, 2) and summary.clock == 1
    assert (state.clock, state.pulled_versions, state.min_versions) == (1, [5, 2], [5, 2])
    assert state.step_header(0, state.next_clock).pull.min_version == 6


def test_a_reply_missing_for_a_server_is_an_error():
    state = ProtocolState("job", "w", 2)
    with pytest.raises(ValueError, match="1 pull headers for 2 servers"):
        state.after_pull([pulled(1)])
    assert state.pulled_versions == [0, 0]


def test_every_header_but_an_observing_pulls_carries_the_session_and_makes_a_member():
    """The session lets a server refuse a second live client under the same worker id; an
    observing pull never joins, so it carries none and leaves the client a non-member."""
    state = ProtocolState("job", "w", 2, session="abc")
    assert state.pull_request(0, observe=True).session == "" and not state.member
    assert state.pull_request(0).session == "abc" and state.member
    state = ProtocolState("job", "w", 2, session="abc")
    assert state.push_header(1, 1).session == "abc" and state.member
    step = ProtocolState("job", "w", 2, session="abc").step_header(0, 1)
    assert step.push.session == step.pull.session == "abc"
    assert state.leave_request() == ps_pb2.LeaveRequest(job_id="job", worker_id="w", session="abc")
