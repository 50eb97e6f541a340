"""Long waits say what they wait for: after a while, then periodically, until they end.

A call that may wait (a pull held by the sync barrier or the ssp bound, servers
not answering, a join) registers with a :class:`WaitReporter` for as long as it
runs, with a function that tells what it is waiting for. One daemon thread per
reporter, started at the first wait, wakes when a registered wait is due and
logs that on the ``ps_worker`` logger at WARNING: first after ``first_s``, then
every ``every_s``. Registering costs a lock and a dict entry; nothing sleeps in
the call path, and a call that ends before ``first_s`` logs nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from protos import ps_pb2
from ps_worker.link import Link

log = logging.getLogger("ps_worker")


@dataclass
class _Wait:
    what: str  # the call, as the log names it: "worker0 pull"
    describe: Callable[[], str]  # what it waits for now
    started: float
    due: float  # when it next says so


class WaitReporter:
    """Logs what registered waits wait for, from a thread of its own."""

    def __init__(self, first_s: float, every_s: float) -> None:
        if first_s <= 0 or every_s <= 0:
            raise ValueError(f"report times must be positive, got {first_s} and {every_s}")
        self.first_s = first_s
        self.every_s = every_s
        self._cond = threading.Condition()
        self._waits: dict[int, _Wait] = {}
        self._keys = itertools.count()
        self._wake_at = float("inf")  # when the thread wakes next (inf: when told)
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def waiting(self, what: str, describe: Callable[[], str]) -> Iterator[None]:
        """Report on ``what`` while the block runs, if it runs longer than ``first_s``."""
        now = time.monotonic()
        key = next(self._keys)
        with self._cond:
            if not self._closed:
                self._waits[key] = _Wait(what, describe, now, now + self.first_s)
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="ps-wait-reports", daemon=True
                    )
                    self._thread.start()
                elif now + self.first_s < self._wake_at:
                    self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._waits.pop(key, None)

    def close(self) -> None:
        """Stop reporting (a report being written finishes first)."""
        with self._cond:
            self._closed = True
            self._waits.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.first_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._due()
                if due is None:
                    return
            for key, wait in due:
                try:
                    text = wait.describe()
                except Exception as e:  # a report must never break anything
                    text = f"(cannot tell: {e})"
                with self._cond:
                    if key in self._waits:  # the call has not ended meanwhile
                        waited = time.monotonic() - wait.started
                        log.warning("%s: waiting for %.0fs: %s", wait.what, waited, text)

    def _due(self) -> list[tuple[int, _Wait]] | None:
        """Sleep (holding the condition's lock) until some wait is due; those waits, with
        their next report scheduled; None once closed."""
        while not self._closed:
            now = time.monotonic()
            due = [(k, w) for k, w in self._waits.items() if w.due <= now]
            if due:
                for _, wait in due:
                    wait.due = now + self.every_s
                return due
            self._wake_at = min((w.due for w in self._waits.values()), default=float("inf"))
            self._cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)
            self._wake_at = float("inf")
        return None


# ------------------------------------------------------------ what a call waits for


def no_answer(links: Sequence[Link]) -> str:
    return f"no answer yet from {', '.join(link.address for link in links) or '(none)'}"


def why_held(
    links: Sequence[Link], request: ps_pb2.StatusRequest, worker_id: str, timeout_s: float
) -> str:
    """Why each server holds this worker's pull: the reason its status gives for it
    (e.g. "sync step 4: waiting for gradients from w2, w3"). One quick call each."""
    reasons = []
    for link in links:
        try:
            reply = link.calls.status(request, timeout=timeout_s)
        except grpc.RpcError as e:
            reasons.append(f"{link.address}: not answering ({e.code().name})")
            continue
        mine = [w.reason for w in reply.waiting if w.worker_id == worker_id]
        reasons.append(f"{link.address}: {mine[0] if mine else 'no answer yet'}")
    return "; ".join(reasons) or "(nothing)"


def describe_active(active: Mapping[str, Sequence[str]]) -> str:
    """Workers and the servers they are active on."""
    return ", ".join(f"{w} (on {', '.join(a)})" for w, a in sorted(active.items())) or "none"
