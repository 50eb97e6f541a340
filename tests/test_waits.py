"""Long waits say what they wait for (ps_worker.waits), without sockets: after first_s, then
every every_s, from the reporter's thread, and never after the call ended."""

from __future__ import annotations

import logging
import threading

import pytest

from ps_worker.waits import WaitReporter, describe_active

pytestmark = pytest.mark.timeout(30)


class Records(logging.Handler):
    """Collects the ps_worker logger's records; ``seen`` is set once ``count`` arrived."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.count = count
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if len(self.records) >= self.count:
            self.seen.set()


@pytest.fixture
def records():
    handler = Records(3)
    logger = logging.getLogger("ps_worker")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_a_long_wait_is_reported_and_again_until_it_ends(records):
    reporter = WaitReporter(first_s=0.05, every_s=0.05)
    asked = []
    try:
        with reporter.waiting("w0 pull", lambda: asked.append(1) or "step 4: waiting for w1"):
            assert records.seen.wait(10)
        count = len(records.records)
        with reporter.waiting("w0 push", lambda: "never asked"):
            pass  # ends before first_s: nothing to say
    finally:
        reporter.close()
    assert len(records.records) == count  # nothing after the wait ended, or after close
    assert len(asked) >= 3
    first = records.records[0]
    assert first.levelno == logging.WARNING and first.name == "ps_worker"
    assert first.getMessage().startswith("w0 pull: waiting for ")
    assert first.getMessage().endswith("s: step 4: waiting for w1")


def test_a_report_that_cannot_tell_says_so_and_the_wait_goes_on(records):
    reporter = WaitReporter(first_s=0.01, every_s=0.01)

    def broken() -> str:
        raise RuntimeError("status unreachable")

    try:
        with reporter.waiting("w0 join", broken):
            assert records.seen.wait(10)
    finally:
        reporter.close()
    assert "(cannot tell: status unreachable)" in records.records[0].getMessage()


def test_report_times_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        WaitReporter(0, 1)


def test_active_workers_are_named_with_their_servers():
    assert describe_active({"w2": ["a:1"], "w1": ["a:1", "b:2"]}) == "w1 (on a:1, b:2), w2 (on a:1)"
    assert describe_active({}) == "none"
