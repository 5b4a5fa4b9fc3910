"""`IdentityMetrics`: the 30-day per-identity figures behind `include_metrics`.

Each (workspace, external_id) that has been attributed a request owns a small ring of daily slots (UTC
days): at most 30 slots of five int64s each (day number, requests, errors, tokens, cost in nano-USD),
packed in one `array('q')` in day order. Only days with traffic take a slot, so an identity seen on one
day costs about 100 bytes of ring, and one active every day about 1.3 KB. `record` is O(1): the current
day is the last slot (a late event walks back at most 30 slots), and a new day drops the slots that
left the window. `snapshot` sums at most 30 slots. `prune()` frees the rings of identities idle for the
whole window.

Failure policy: metering fails open, so `record` never raises (a bad event is logged and dropped).
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

from orq_proxy.clock import Clock
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.money import nanos_to_usd

__all__ = [
    "WINDOW_DAYS",
    "IdentityDay",
    "IdentityHistory",
    "IdentityMetrics",
    "IdentityTotals",
    "SharedIdentityMetrics",
    "Totals",
    "empty_metrics",
]

logger = logging.getLogger(__name__)

WINDOW_DAYS: Final = 30
_WIDTH: Final = 5  # per slot: day number, requests, errors, tokens, cost_nanos
_SECONDS_PER_DAY: Final = 86_400


def _day(when: datetime) -> int:
    """Days since 1970-01-01 in UTC (a naive datetime is taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp()) // _SECONDS_PER_DAY


class IdentityDay(NamedTuple):
    """One identity's usage on one UTC day: what the rings are rebuilt from."""

    workspace: str
    identity: str  # the external id
    day: datetime  # the day's UTC midnight (aware, or naive UTC)
    requests: int
    errors: int  # requests with status ERROR
    tokens: int
    cost_nanos: int


@runtime_checkable
class IdentityHistory(Protocol):
    """The read `seed_from_events` needs from an event store (the event store implements it)."""

    def identity_days(self, since: datetime) -> list[IdentityDay]:
        """Per (workspace, identity, UTC day) of the attributed events at or after `since` (aware), their
        totals, in day order (blocking)."""
        ...


class Totals(NamedTuple):
    """One identity's sums over a window."""

    requests: int
    errors: int
    tokens: int
    cost_nanos: int


@runtime_checkable
class IdentityTotals(Protocol):
    """An event store shared by replicas that keeps per-(workspace, identity, UTC day) sums as it inserts
    (in the insert's own transaction), so every replica reads the same figures (PostgreSQL)."""

    def identity_totals(
        self, workspace: str, identities: Sequence[str], since: datetime
    ) -> dict[str, Totals]:
        """The sums of each of `identities` (external ids) over the UTC days from `since` (a UTC midnight)
        on; an identity without events is left out (blocking)."""
        ...


def _wire(totals: Totals | None) -> dict[str, Any]:
    if totals is None or not totals.requests:
        return empty_metrics()
    return {
        "total_tokens": totals.tokens,
        "total_cost": nanos_to_usd(totals.cost_nanos),
        "total_requests": totals.requests,
        "error_rate": totals.errors / totals.requests,
    }


def empty_metrics() -> dict[str, Any]:
    """The four spec fields, all zero."""
    return {"total_tokens": 0, "total_cost": 0.0, "total_requests": 0, "error_rate": 0.0}


class IdentityMetrics:
    """Per-identity daily rings over the last `days` UTC days (today included).

    Args:
        clock: decides which days `snapshot` counts.
        days: the window length.

    Example (app.py registers `record` as a metering listener):
        metrics = IdentityMetrics(clock=SystemClock())
        metrics.record(event)
        metrics.snapshot("ws", "user_1")  # {"total_tokens": ..., "total_cost": ..., ...}
    """

    def __init__(self, *, clock: Clock, days: int = WINDOW_DAYS) -> None:
        if days < 1:
            raise ValueError("days must be at least 1")
        self._clock = clock
        self._days = days
        self._rings: dict[tuple[str, str], array[int]] = {}

    def __len__(self) -> int:
        """How many identities have a ring."""
        return len(self._rings)

    def record(self, event: UsageEvent) -> None:
        """Count one usage event against its identity (unattributed events are skipped). Never raises."""
        try:
            if event.identity is None:
                return
            day = _day(event.timestamp)
            key = (event.workspace, event.identity)
            ring = self._rings.get(key)
            if ring is None:
                ring = self._rings[key] = array("q")
            base = self._slot(ring, day)
            if base < 0:
                return  # a late event for a day that has already left the window
            ring[base + 1] += 1
            if event.status == "ERROR":
                ring[base + 2] += 1
            ring[base + 3] += event.total_tokens
            ring[base + 4] += event.total_cost_nanos
        except Exception:
            logger.exception("identity metrics: dropped usage event %s", getattr(event, "event_id", "?"))

    def _slot(self, ring: array[int], day: int) -> int:
        """The offset of `day`'s slot, created if needed; -1 when the day is older than the window."""
        last = len(ring) - _WIDTH
        if last >= 0 and ring[last] == day:
            return last  # the common case: another event today
        if last < 0 or ring[last] < day:
            first_kept = day - self._days + 1
            stale = 0
            while stale < len(ring) and ring[stale] < first_kept:
                stale += _WIDTH
            if stale:
                del ring[:stale]
            ring.extend((day, 0, 0, 0, 0))
            return len(ring) - _WIDTH
        # A late event: its day is before the newest slot.
        if day < ring[last] - self._days + 1:
            return -1
        base = last
        while base >= 0 and ring[base] > day:
            base -= _WIDTH
        if base >= 0 and ring[base] == day:
            return base
        base += _WIDTH
        ring[base:base] = array("q", (day, 0, 0, 0, 0))
        return base

    def snapshot(self, workspace: str, external_id: str) -> dict[str, Any]:
        """`total_tokens`, `total_cost` (USD, 10 decimals), `total_requests`, `error_rate` (0..1)."""
        ring = self._rings.get((workspace, external_id))
        if ring is None:
            return empty_metrics()
        today = _day(self._clock.now())
        first = today - self._days + 1
        requests = errors = tokens = cost = 0
        for base in range(0, len(ring), _WIDTH):
            if first <= ring[base] <= today:
                requests += ring[base + 1]
                errors += ring[base + 2]
                tokens += ring[base + 3]
                cost += ring[base + 4]
        return _wire(Totals(requests, errors, tokens, cost))

    async def snapshots(self, workspace: str, external_ids: Sequence[str]) -> list[dict[str, Any]]:
        """`snapshot` of each of `external_ids`, in order (what a list page renders)."""
        return [self.snapshot(workspace, external_id) for external_id in external_ids]

    def window_start(self) -> datetime:
        """The UTC midnight the window starts at, today included in it."""
        return datetime.fromtimestamp((_day(self._clock.now()) - self._days + 1) * _SECONDS_PER_DAY, UTC)

    def add_day(
        self,
        workspace: str,
        external_id: str,
        day: datetime,
        requests: int,
        errors: int,
        tokens: int,
        cost_nanos: int,
    ) -> None:
        """Add a whole day's totals at once (used to rebuild the rings from the event store at startup)."""
        ring = self._rings.get((workspace, external_id))
        if ring is None:
            ring = self._rings[(workspace, external_id)] = array("q")
        base = self._slot(ring, _day(day))
        if base < 0:
            return
        ring[base + 1] += requests
        ring[base + 2] += errors
        ring[base + 3] += tokens
        ring[base + 4] += cost_nanos

    def seed_from_events(self, store: IdentityHistory) -> int:
        """Rebuild the window's figures from the usage events already in `store` (blocking: one read over
        the window). With a file event store, `include_metrics` then survives a restart.
        Returns how many (identity, day) rows were added."""
        days = store.identity_days(self.window_start())
        for row in days:
            self.add_day(
                row.workspace, row.identity, row.day, row.requests, row.errors, row.tokens, row.cost_nanos
            )
        return len(days)

    def forget(self, workspace: str, external_id: str) -> None:
        """Drop an identity's figures (its record was deleted)."""
        self._rings.pop((workspace, external_id), None)

    def prune(self) -> int:
        """Free the rings with nothing inside the window; how many were freed. O(identities)."""
        first = _day(self._clock.now()) - self._days + 1
        # Slots are in day order, so the last one is the newest.
        idle = [key for key, ring in self._rings.items() if not ring or ring[len(ring) - _WIDTH] < first]
        for key in idle:
            del self._rings[key]
        return len(idle)


class SharedIdentityMetrics(IdentityMetrics):
    """`include_metrics` read from an event store shared by replicas (`IdentityTotals`), so every replica
    answers the same figures, covering all of their traffic, once the bus has written it (the ingestion
    delay). Nothing is kept in process: `record`, `seed_from_events`, `forget` and `prune` do nothing, and a
    page costs one query.

    Args:
        store: the shared event store.
        clock: decides the window.
    """

    def __init__(self, store: IdentityTotals, *, clock: Clock, days: int = WINDOW_DAYS) -> None:
        super().__init__(clock=clock, days=days)
        self._store = store

    def record(self, event: UsageEvent) -> None:
        return None  # the event store counts it when the bus writes it

    def seed_from_events(self, store: IdentityHistory) -> int:
        return 0

    def forget(self, workspace: str, external_id: str) -> None:
        return None  # the events stay; a recreated identity with the same external id shows them again

    def prune(self) -> int:
        return 0

    def snapshot(self, workspace: str, external_id: str) -> dict[str, Any]:
        raise TypeError("SharedIdentityMetrics reads the database: await snapshots() instead")

    async def snapshots(self, workspace: str, external_ids: Sequence[str]) -> list[dict[str, Any]]:
        if not external_ids:
            return []
        totals = await asyncio.to_thread(
            self._store.identity_totals, workspace, list(external_ids), self.window_start()
        )
        return [_wire(totals.get(external_id)) for external_id in external_ids]
