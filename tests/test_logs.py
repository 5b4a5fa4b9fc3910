"""Quiet logs: a failure that repeats is logged once with its cause, then summed up once per interval
(`RepeatedFailure`, with a scripted clock; the end-to-end Redis outage is in tests/budgets)."""

from __future__ import annotations

import logging

import pytest

from orq_proxy.errors import ServiceUnavailable
from orq_proxy.logs import RepeatedFailure


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_first_failure_then_one_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """1,000 failures in 25 s: the first with its cause, a summary at 10 s and 20 s, one recovery line."""
    clock = Clock()
    log = logging.getLogger("test.repeated")
    failures = RepeatedFailure(log, "backend failed; refusing", expected=(ServiceUnavailable,), clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.repeated"):
        for i in range(1000):
            clock.now = i * 0.025
            failures.failed(ServiceUnavailable("redis", ConnectionError("refused")))
        failures.succeeded()
        failures.succeeded()  # not failing any more: nothing to say
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("backend failed; refusing: ServiceUnavailable: redis is unavailable")
    assert [line.split(": ")[1] for line in lines[1:3]] == [
        "400 more in the last 10 s (last cause",
        "400 more in the last 10 s (last cause",
    ]
    assert lines[3] == "backend failed; refusing: recovered after 1000 failures" and len(lines) == 4
    assert all(r.exc_info is None for r in caplog.records)  # an expected kind: no traceback


def test_an_unexpected_failure_keeps_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    """A bug (not an expected backend error) is logged with its traceback, but still only once."""
    failures = RepeatedFailure(logging.getLogger("test.bug"), "settle failed", clock=Clock())
    with caplog.at_level(logging.WARNING, logger="test.bug"):
        for _ in range(50):
            try:
                raise KeyError("oops")
            except KeyError as exc:
                failures.failed(exc)
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
