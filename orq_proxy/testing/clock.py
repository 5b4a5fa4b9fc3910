"""A controllable clock for tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]


class FakeClock:
    """A `Clock` that only moves when told to.

    Example:
        clock = FakeClock(datetime(2026, 1, 31, 23, 59, tzinfo=UTC))
        clock.advance(seconds=60)
    """

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2026, 1, 1, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._now = start.astimezone(UTC)
        self._mono = 1000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float = 0.0, **kwargs: float) -> None:
        """Move both clocks forward (`advance(5)`, `advance(days=1)`)."""
        delta = timedelta(seconds=seconds, **kwargs)
        if delta < timedelta(0):
            raise ValueError("time only moves forward")
        self._now += delta
        self._mono += delta.total_seconds()

    def set(self, when: datetime) -> None:
        """Jump the wall clock to `when` (forward only)."""
        self.advance((when.astimezone(UTC) - self._now).total_seconds())
