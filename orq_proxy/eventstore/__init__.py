"""The event store: where usage events are kept, and the read side every slice queries.

Each slice declares the protocol of what it reads, next to its code: reporting's `ReportSource` and
`EventRetention` (`reporting/source.py`), identity metrics' `IdentityHistory` (`identities/metrics.py`),
budgets' `BudgetLedger` (`budgets/ledger.py`). `EventStore` is all of them plus the write side, the one
thing a backend implements; each backend keeps its SQL dialect in its own module (`eventstore/duckdb.py`,
`eventstore/postgres.py`), and only `app.py` picks and builds one. Slices import their own protocols, never
a backend.

To add a backend: implement `EventStore` in `eventstore/<backend>.py` with the semantics the slice protocols
state, and open it in `event_store_from_url`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from orq_proxy.budgets.ledger import BudgetLedger
from orq_proxy.identities.metrics import IdentityHistory
from orq_proxy.reporting.source import EventRetention, ReportSource
from orq_proxy.usage.events import UsageEvent

__all__ = ["EventStore", "event_store_from_url"]


@runtime_checkable
class EventStore(ReportSource, EventRetention, IdentityHistory, BudgetLedger, Protocol):
    """The usage events: written by the sink bus, read by reporting, identity metrics and budget rebuilds.

    Reads and `insert` block (they are called from worker threads); `aclose` is awaited once, at shutdown,
    after the last write.
    """

    def insert(self, events: Sequence[UsageEvent]) -> None:
        """Append `events`, all or none (blocking). A failure raises: the sink bus retries the batch."""
        ...

    async def aclose(self) -> None:
        """Release the store (connections, files)."""
        ...


def event_store_from_url(url: str, *, memory_events_max: int | None = None) -> EventStore:
    """The store named by `[storage] events`: `duckdb://:memory:`, `duckdb:///abs/path.duckdb`, or
    `postgresql://...` (`postgres://...`, with the `postgres` extra installed); an in-memory DuckDB keeps at
    most `memory_events_max` events (the oldest go first).

    Raises ValueError for anything else, naming the URL (a PostgreSQL URL without the driver installed
    says how to install it).
    """
    from orq_proxy.postgres import is_postgres_url, require_driver

    if is_postgres_url(url):
        require_driver("events")
        from orq_proxy.eventstore.postgres import PostgresEventStore  # imports psycopg only now

        return PostgresEventStore.from_url(url)
    from orq_proxy.eventstore.duckdb import DuckDBEventStore

    return DuckDBEventStore.from_url(url, max_events=memory_events_max)
