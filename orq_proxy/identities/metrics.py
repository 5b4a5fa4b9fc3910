"""`IdentityMetrics`: the 30-day per-identity figures behind `include_metrics`.

Each (workspace, external_id) that has been attributed a request owns one ring of 30 daily slots (UTC
days), each slot holding its day number and that day's requests, errors, tokens and cost in nano-USD,
packed in one `array('q')`. `record` touches one slot: O(1), no allocation after the ring exists. A slot
whose day is stale is zeroed when its day comes round again, so nothing ever needs sweeping for
correctness; `prune()` only frees rings of identities idle for the whole window.

Failure policy: metering fails open, so `record` never raises (a bad event is logged and dropped).
"""

from __future__ import annotations

import logging
from array import array
from datetime import UTC, datetime
from typing import Any, Final

from orq_proxy.clock import Clock
from orq_proxy.metering.events import NANOS_PER_USD, UsageEvent

__all__ = ["WINDOW_DAYS", "IdentityMetrics", "empty_metrics"]

logger = logging.getLogger(__name__)

WINDOW_DAYS: Final = 30
_WIDTH: Final = 5  # per slot: day number, requests, errors, tokens, cost_nanos
_SECONDS_PER_DAY: Final = 86_400


def _day(when: datetime) -> int:
    """Days since 1970-01-01 in UTC (a naive datetime is taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp()) // _SECONDS_PER_DAY


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
        self._zero_bytes = bytes(8 * _WIDTH * days)
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
                ring = self._rings[key] = array("q", self._zero_bytes)
            base = (day % self._days) * _WIDTH
            slot_day = ring[base]
            if slot_day != day:
                if slot_day > day:
                    return  # a late event for a day that has already left the window
                ring[base] = day
                ring[base + 1] = ring[base + 2] = ring[base + 3] = ring[base + 4] = 0
            ring[base + 1] += 1
            if event.status == "ERROR":
                ring[base + 2] += 1
            ring[base + 3] += event.total_tokens
            ring[base + 4] += event.total_cost_nanos
        except Exception:
            logger.exception("identity metrics: dropped usage event %s", getattr(event, "event_id", "?"))

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
        return {
            "total_tokens": tokens,
            "total_cost": round(cost / NANOS_PER_USD, 10),
            "total_requests": requests,
            "error_rate": errors / requests if requests else 0.0,
        }

    def forget(self, workspace: str, external_id: str) -> None:
        """Drop an identity's figures (its record was deleted)."""
        self._rings.pop((workspace, external_id), None)

    def prune(self) -> int:
        """Free the rings with nothing inside the window; how many were freed. O(identities)."""
        first = _day(self._clock.now()) - self._days + 1
        idle = [
            key
            for key, ring in self._rings.items()
            if all(ring[base] < first for base in range(0, len(ring), _WIDTH))
        ]
        for key in idle:
            del self._rings[key]
        return len(idle)
