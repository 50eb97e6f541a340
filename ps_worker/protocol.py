"""A worker's side of the protocol as a plain object: no sockets, no threads, no tensors.

It holds what the worker knows between calls (its clock, the version of each
server's weights it last pulled, the step a sync pull waits for, whether it
has taken part in the job), writes the headers and requests a push, a pull or
a fused step sends to each server, and reads what the servers' replies mean.
The transports only carry them. Every header but an observing pull's carries
the client's session, by which a server tells two live clients with one
worker id apart; :func:`first_contact` lets a client refused at its first
contact wait for a crashed predecessor's session to go quiet.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from protos import ps_pb2
from ps_worker.errors import WorkerIdInUseError

T = TypeVar("T")
log = logging.getLogger("ps_worker")


@dataclass(frozen=True)
class PushSummary:
    """What the servers did with one push."""

    clock: int
    applied: bool  # applied (or, in sync, accumulated) by every server
    duplicate: bool  # a retry every server had already processed
    dropped: bool  # sync: too late for its step on some server
    staleness: tuple[int, ...]  # per server
    lr: tuple[float, ...]  # per server
    versions: tuple[int, ...]  # each server's version after this push


class ProtocolState:
    """The clock and per-server versions of one worker in one job."""

    def __init__(self, job_id: str, worker_id: str, servers: int, session: str = "") -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.session = session  # this client's random id, on every push and joining pull
        self.member = False  # has pushed or pulled as a worker: the servers count it
        self.started = False  # a push or joining pull went through: the id is this session's
        self.unsure_clock = False  # it joined by a push: the servers may have moved its clock
        self.told_waiting = False  # logged that it waits for its id's previous client
        self.clock = 0  # iterations this worker has pushed
        self.pulled_versions = [0] * servers  # each server's version last pulled
        self.min_versions = [0] * servers  # sync: the step the next pull waits for

    @property
    def next_clock(self) -> int:
        """The clock of the next push."""
        return self.clock + 1

    def push_header(self, server: int, clock: int) -> ps_pb2.PushHeader:
        self.member = True
        return ps_pb2.PushHeader(
            job_id=self.job_id,
            worker_id=self.worker_id,
            clock=clock,
            pulled_version=self.pulled_versions[server],
            session=self.session,
        )

    def pull_request(self, server: int, observe: bool = False) -> ps_pb2.PullRequest:
        """A pull; ``observe`` reads without waiting and without taking part."""
        return self._pull(self.clock, self.min_versions[server], observe)

    def step_header(self, server: int, clock: int) -> ps_pb2.StepHeader:
        """A push at ``clock`` and the pull of the version that follows it."""
        pull = self._pull(clock, self.pulled_versions[server] + 1, False)
        return ps_pb2.StepHeader(push=self.push_header(server, clock), pull=pull)

    def after_push(self, clock: int, replies: Sequence[ps_pb2.PushResponse]) -> PushSummary:
        """Record a push every server answered; what it did."""
        self.unsure_clock = self.unsure_clock or not self.started
        self.started = True
        self.clock = clock
        self.min_versions = [v + 1 for v in self.pulled_versions]  # sync: the next step
        return PushSummary(
            clock=clock,
            applied=all(r.applied for r in replies),
            duplicate=all(r.duplicate for r in replies),
            dropped=any(r.dropped for r in replies),
            staleness=tuple(r.staleness for r in replies),
            lr=tuple(r.lr for r in replies),
            versions=tuple(r.version for r in replies),
        )

    def after_pull(self, headers: Sequence[ps_pb2.PullHeader], observe: bool = False) -> None:
        """Record the versions every server sent (an observing pull changes nothing)."""
        if observe:
            return
        self.started = True
        self.unsure_clock = False
        if len(headers) != len(self.pulled_versions):
            raise ValueError(f"{len(headers)} pull headers for {len(self.pulled_versions)} servers")
        self.pulled_versions = [h.version for h in headers]
        self.min_versions = list(self.pulled_versions)
        self.clock = max([self.clock, *(h.worker_clock for h in headers)])

    def adopt_clock(
        self, summary: PushSummary, statuses: Sequence[ps_pb2.StatusResponse]
    ) -> PushSummary:
        """After a push that joined the job (no pull before): take the servers' clock for
        this worker (a joining push lands at the slowest active worker's), as a pull does."""
        clocks = (w.clock for s in statuses for w in s.workers if w.worker_id == self.worker_id)
        self.clock = max(self.clock, *clocks)
        self.unsure_clock = False
        return dataclasses.replace(summary, clock=self.clock)

    def _pull(self, clock: int, min_version: int, observe: bool) -> ps_pb2.PullRequest:
        """A pull request; one that does not observe joins the job (and carries the session)."""
        self.member = self.member or not observe
        return ps_pb2.PullRequest(
            job_id=self.job_id,
            worker_id=self.worker_id,
            clock=clock,
            min_version=min_version,
            observe=observe,
            session="" if observe else self.session,
        )

    def leave_request(self) -> ps_pb2.LeaveRequest:
        """This worker is done: it stops counting for the sync barrier and the ssp bound."""
        return ps_pb2.LeaveRequest(
            job_id=self.job_id, worker_id=self.worker_id, session=self.session
        )


def first_contact(
    call: Callable[[], T], state: ProtocolState, wait_s: float, closed: threading.Event
) -> T:
    """``call()``, retried while a server refuses it as WORKER_ID_IN_USE at this client's
    first contact (nothing done yet with its session), for up to ``wait_s``: a restarted
    process's predecessor, killed a moment ago, still holds the id until its session goes
    quiet. A live duplicate still fails, with the server's error, after ``wait_s``; a
    client that already took part fails at once (another client took its id over)."""
    deadline = None
    while True:
        try:
            return call()
        except WorkerIdInUseError as e:
            if state.started or wait_s <= 0:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + wait_s
                if not state.told_waiting:
                    state.told_waiting = True
                    log.warning(
                        "%s: waiting up to %g s for the other client holding worker id %r to "
                        "go quiet (a restarted process's predecessor): %s",
                        state.worker_id,
                        wait_s,
                        state.worker_id,
                        e,
                    )
            if now >= deadline or closed.wait(min(0.2, deadline - now)):
                raise
