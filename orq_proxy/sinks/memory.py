"""`MemorySink`: keeps events in a list. For tests, demos and embedding code that reads them back."""

from __future__ import annotations

from collections.abc import Sequence

from orq_proxy.usage.events import UsageEvent

__all__ = ["MemorySink"]


class MemorySink:
    """A `UsageSink` that appends every event to `events` (unbounded unless `max_events` is set, then it
    keeps the newest)."""

    name = "memory"

    def __init__(self, max_events: int | None = None) -> None:
        if max_events is not None and max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.max_events = max_events
        self.events: list[UsageEvent] = []
        self.closed = False

    async def write(self, events: Sequence[UsageEvent]) -> None:
        self.events.extend(events)
        if self.max_events is not None and len(self.events) > self.max_events:
            del self.events[: len(self.events) - self.max_events]

    async def close(self) -> None:
        self.closed = True
