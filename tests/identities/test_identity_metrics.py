"""`IdentityMetrics`: 30-day daily rings per (workspace, external_id)."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orq_proxy.identities.metrics import IdentityDay, IdentityHistory, IdentityMetrics, empty_metrics
from orq_proxy.testing.clock import FakeClock
from orq_proxy.usage.events import UsageEvent

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def event(when: datetime, **kw: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "event_id": "e",
        "timestamp": when,
        "workspace": "ws",
        "project": "p",
        "api_key_id": "k",
        "identity": "u1",
        "total_tokens": 10,
        "total_cost_nanos": 1_500,
    }
    fields.update(kw)
    return UsageEvent(**fields)


def test_snapshot_sums_the_window() -> None:
    """Requests, errors, tokens and cost add up; cost in USD rounded to 10 decimals."""
    clock = FakeClock(START)
    m = IdentityMetrics(clock=clock)
    m.record(event(START))
    m.record(event(START, status="ERROR", total_tokens=5, total_cost_nanos=1))
    m.record(event(START - timedelta(days=3)))
    assert m.snapshot("ws", "u1") == {
        "total_tokens": 25,
        "total_cost": 0.000003001,
        "total_requests": 3,
        "error_rate": pytest.approx(1 / 3),
    }


def test_unknown_identity_is_zero() -> None:
    """No ring yet: the four fields, all zero."""
    m = IdentityMetrics(clock=FakeClock(START))
    assert m.snapshot("ws", "nobody") == empty_metrics()
    assert m.snapshot("ws", "nobody") == {
        "total_tokens": 0,
        "total_cost": 0.0,
        "total_requests": 0,
        "error_rate": 0.0,
    }


def test_keys_are_workspace_and_external_id() -> None:
    """The same external id in two workspaces keeps separate figures; unattributed events are skipped."""
    m = IdentityMetrics(clock=FakeClock(START))
    m.record(event(START, workspace="a"))
    m.record(event(START, workspace="b"))
    m.record(event(START, workspace="b"))
    m.record(event(START, identity=None))
    assert m.snapshot("a", "u1")["total_requests"] == 1
    assert m.snapshot("b", "u1")["total_requests"] == 2
    assert len(m) == 2


@pytest.mark.parametrize(
    ("age_days", "counted"),
    [(0, True), (1, True), (29, True), (30, False), (45, False)],
)
def test_window_is_the_last_30_days(age_days: int, counted: bool) -> None:
    """An event counts while its UTC day is one of the last 30 (today included)."""
    clock = FakeClock(START)
    m = IdentityMetrics(clock=clock)
    m.record(event(START))
    clock.advance(days=age_days)
    assert m.snapshot("ws", "u1")["total_requests"] == (1 if counted else 0)


def test_slot_is_reused_when_its_day_comes_round() -> None:
    """30 days later the same slot starts from zero; a late event for the old day is dropped."""
    clock = FakeClock(START)
    m = IdentityMetrics(clock=clock)
    m.record(event(START, total_tokens=100))
    clock.advance(days=30)
    m.record(event(clock.now(), total_tokens=7))
    m.record(event(START, total_tokens=1000))  # late, for a day already rotated out
    assert m.snapshot("ws", "u1")["total_tokens"] == 7
    assert m.snapshot("ws", "u1")["total_requests"] == 1


def test_naive_timestamp_is_utc() -> None:
    """A naive timestamp counts as UTC."""
    m = IdentityMetrics(clock=FakeClock(START))
    m.record(event(START.replace(tzinfo=None)))
    assert m.snapshot("ws", "u1")["total_requests"] == 1


def test_record_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """A value that does not fit is logged and dropped; the listener never raises."""
    m = IdentityMetrics(clock=FakeClock(START))
    with caplog.at_level(logging.ERROR, logger="orq_proxy.identities.metrics"):
        m.record(event(START, total_tokens=2**70))
    assert "dropped usage event" in caplog.text


def test_forget_and_prune() -> None:
    """forget drops one identity; prune drops identities idle for the whole window."""
    clock = FakeClock(START)
    m = IdentityMetrics(clock=clock)
    m.record(event(START, identity="old"))
    clock.advance(days=20)
    m.record(event(clock.now(), identity="recent"))
    m.record(event(clock.now(), identity="gone"))
    m.forget("ws", "gone")
    m.forget("ws", "never-there")
    assert m.snapshot("ws", "gone")["total_requests"] == 0
    clock.advance(days=15)
    assert m.prune() == 1
    assert len(m) == 1
    assert m.snapshot("ws", "recent")["total_requests"] == 1


def test_days_must_be_positive() -> None:
    """A window shorter than a day is a configuration error."""
    with pytest.raises(ValueError, match="days"):
        IdentityMetrics(clock=FakeClock(START), days=0)


def test_matches_brute_force_with_late_events() -> None:
    """Random traffic over 90 days, some of it late and out of order: snapshot == the events in window."""
    rnd = random.Random(5)
    clock = FakeClock(START)
    m = IdentityMetrics(clock=clock)
    seen: list[UsageEvent] = []
    for _ in range(3000):
        clock.advance(seconds=rnd.choice([0, 60, 3600, 20_000]))
        lag = timedelta(days=rnd.choice([0, 0, 0, 0, 1, 5, 29, 31])) if rnd.random() < 0.3 else timedelta()
        e = event(
            clock.now() - lag,
            identity=rnd.choice(["a", "b"]),
            status=rnd.choice(["OK", "OK", "ERROR"]),
            total_tokens=rnd.randint(0, 50),
            total_cost_nanos=rnd.randint(0, 10_000),
        )
        m.record(e)
        seen.append(e)
        if rnd.random() < 0.05:
            today = clock.now().date()
            for who in ("a", "b"):
                window = [
                    x for x in seen if x.identity == who and 0 <= (today - x.timestamp.date()).days < 30
                ]
                got = m.snapshot("ws", who)
                assert got["total_requests"] == len(window)
                assert got["total_tokens"] == sum(x.total_tokens for x in window)
                assert got["total_cost"] == round(sum(x.total_cost_nanos for x in window) / 1e9, 10)
                errors = sum(x.status == "ERROR" for x in window)
                assert got["error_rate"] == pytest.approx(errors / len(window) if window else 0.0)


class _History:
    """An `IdentityHistory` without a database: canned rows, and the `since` it was asked for."""

    def __init__(self, rows: list[IdentityDay]) -> None:
        self.rows = rows
        self.since: list[datetime] = []

    def identity_days(self, since: datetime) -> list[IdentityDay]:
        self.since.append(since)
        return self.rows


def test_seed_from_events_reads_the_window_through_its_protocol() -> None:
    """`seed_from_events` asks any `IdentityHistory` for the window's days (from the UTC midnight 29 days
    back) and adds each row to its identity's ring; a day the window has left is ignored."""
    clock = FakeClock(START)
    midnight = START.replace(hour=0)
    history = _History(
        [
            IdentityDay("ws", "u1", midnight - timedelta(days=40), 9, 9, 9, 9),  # left the window
            IdentityDay("ws", "u1", midnight - timedelta(days=3), 2, 1, 30, 2_000),
            IdentityDay("ws", "u1", midnight.replace(tzinfo=None), 1, 0, 5, 500),  # naive = UTC
            IdentityDay("ws", "u2", midnight, 4, 0, 8, 0),
        ]
    )
    assert isinstance(history, IdentityHistory)
    m = IdentityMetrics(clock=clock)
    assert m.seed_from_events(history) == 4
    assert history.since == [midnight - timedelta(days=29)]
    assert m.snapshot("ws", "u1") == {
        "total_tokens": 35,
        "total_cost": 0.0000025,
        "total_requests": 3,
        "error_rate": pytest.approx(1 / 3),
    }
    assert m.snapshot("ws", "u2")["total_requests"] == 4
