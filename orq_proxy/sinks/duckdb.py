"""`DuckDBSink`: the sink that writes usage events into the event store (what reporting reads).

The store itself, its table and its SQL are `orq_proxy.eventstore.duckdb`'s; this sink only hands each
batch to the store's `insert` in a worker thread (the DuckDB store appends it with DuckDB's appender).
It takes any `EventWriter`, so it writes whichever event store the app built.
Failure policy: sinks fail open; a failed `insert` raises to the bus, which retries and counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from orq_proxy.sinks.base import EventWriter
from orq_proxy.usage.events import UsageEvent

__all__ = ["DuckDBSink"]


class DuckDBSink:
    """A `UsageSink` inserting into an event store (in a worker thread).

    Args:
        store: the event store (reporting reads the same one).
        owns_store: close the store in `close()` (for a store built just for this sink).
        name: label in stats and logs.
    """

    def __init__(self, store: EventWriter, *, owns_store: bool = False, name: str = "duckdb") -> None:
        self.store = store
        self.owns_store = owns_store
        self.name = name

    async def write(self, events: Sequence[UsageEvent]) -> None:
        if events:
            await asyncio.to_thread(self.store.insert, events)

    async def close(self) -> None:
        if self.owns_store:
            await self.store.aclose()
