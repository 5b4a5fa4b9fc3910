"""The DuckDB event store: the default sink (write side) and what reporting queries (read side).

`duckdb://:memory:` keeps events in process memory; `duckdb:///path/events.duckdb` in a file.
One connection is owned here; every thread that touches it works on its own `cursor()`, which is how
DuckDB shares one database between threads.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from datetime import UTC
from typing import Any

import duckdb

from orq_proxy.metering.events import UsageEvent

__all__ = ["EVENTS_TABLE", "EVENT_COLUMNS", "DuckDBEventStore", "DuckDBSink", "event_row", "parse_events_url"]

EVENTS_TABLE = "usage_events"

# Column name -> DuckDB type. `ts` is a naive TIMESTAMP holding UTC (the event's `timestamp`).
EVENT_COLUMNS: dict[str, str] = {
    "event_id": "VARCHAR",
    "ts": "TIMESTAMP",
    "workspace": "VARCHAR",
    "project": "VARCHAR",
    "api_key_id": "VARCHAR",
    "identity": "VARCHAR",
    "identity_source": "VARCHAR",
    "identity_tags": "VARCHAR[]",
    "provider": "VARCHAR",
    "model": "VARCHAR",
    "product": "VARCHAR",
    "status": "VARCHAR",
    "http_status": "INTEGER",
    "credential_type": "VARCHAR",
    "stream": "BOOLEAN",
    "input_tokens": "BIGINT",
    "output_tokens": "BIGINT",
    "total_tokens": "BIGINT",
    "cached_input_tokens": "BIGINT",
    "reasoning_tokens": "BIGINT",
    "audio_input_tokens": "BIGINT",
    "audio_output_tokens": "BIGINT",
    "input_cost_nanos": "BIGINT",
    "output_cost_nanos": "BIGINT",
    "cached_cost_nanos": "BIGINT",
    "reasoning_cost_nanos": "BIGINT",
    "total_cost_nanos": "BIGINT",
    "latency_ms": "DOUBLE",
    "ttft_ms": "DOUBLE",
    "usage_source": "VARCHAR",
    "usage_note": "VARCHAR",
    "price_source": "VARCHAR",
    "metadata": "VARCHAR",  # JSON object text
}


def parse_events_url(url: str) -> str:
    """`duckdb://:memory:` -> `:memory:`, `duckdb:///data/ev.duckdb` -> `/data/ev.duckdb`."""
    if not url.startswith("duckdb://"):
        raise ValueError(f"events store must be a duckdb:// URL, got {url!r}")
    rest = url[len("duckdb://") :]
    if rest in ("", ":memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise ValueError(f"duckdb file URL must be duckdb:///absolute/path, got {url!r}")
    return rest


def event_row(event: UsageEvent) -> tuple[Any, ...]:
    """The event as a row in `EVENT_COLUMNS` order."""
    ts = event.timestamp
    ts = (ts if ts.tzinfo is UTC else ts.astimezone(UTC)).replace(tzinfo=None)
    metadata = event.metadata
    return (
        event.event_id,
        ts,
        event.workspace,
        event.project,
        event.api_key_id,
        event.identity,
        event.identity_source,
        event.identity_tags,
        event.provider,
        event.model,
        event.product,
        event.status,
        event.http_status,
        event.credential_type,
        event.stream,
        event.input_tokens,
        event.output_tokens,
        event.total_tokens,
        event.cached_input_tokens,
        event.reasoning_tokens,
        event.audio_input_tokens,
        event.audio_output_tokens,
        event.input_cost_nanos,
        event.output_cost_nanos,
        event.cached_cost_nanos,
        event.reasoning_cost_nanos,
        event.total_cost_nanos,
        event.latency_ms,
        event.ttft_ms,
        event.usage_source,
        event.usage_note,
        event.price_source,
        json.dumps(metadata, separators=(",", ":")) if metadata else "{}",
    )


class DuckDBEventStore:
    """Owns one DuckDB database holding the `usage_events` table.

    Args:
        path: `:memory:` or a file path (see `parse_events_url`).
    """

    def __init__(self, path: str = ":memory:") -> None:
        self.path = path
        self._conn = duckdb.connect(path)
        self._lock = threading.Lock()
        cols = ", ".join(f"{name} {kind}" for name, kind in EVENT_COLUMNS.items())
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} ({cols})")

    @classmethod
    def from_url(cls, url: str) -> DuckDBEventStore:
        return cls(parse_events_url(url))

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for the calling thread (DuckDB cursors are per-thread handles on one database).
        Made under the insert lock: the shared connection object is only ever touched by one thread."""
        with self._lock:
            return self._conn.cursor()

    def insert(self, events: Sequence[UsageEvent]) -> None:
        """Append events (blocking; call it from a worker thread)."""
        if not events:
            return
        rows = [event_row(e) for e in events]
        with self._lock:
            cur = self._conn.cursor()
            try:
                # DuckDB's appender: ~180x the rows/s of executemany (benchmarks/RESULTS.md, metering).
                appender = cur.appender(EVENTS_TABLE, columns=list(EVENT_COLUMNS))
                try:
                    appender.append_rows(rows)
                    appender.flush()
                except BaseException:
                    appender.clear()  # all or nothing: a retried batch must not be half in already
                    raise
            finally:
                cur.close()

    def count(self) -> int:
        cur = self._conn.cursor()
        try:
            row = cur.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()
        finally:
            cur.close()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._conn.close()


class DuckDBSink:
    """A `UsageSink` inserting into a `DuckDBEventStore` (in a worker thread, with DuckDB's appender).

    Args:
        store: the event store (reporting reads the same one).
        owns_store: close the store in `close()` (for a store built just for this sink).
        name: label in stats and logs.
    """

    def __init__(self, store: DuckDBEventStore, *, owns_store: bool = False, name: str = "duckdb") -> None:
        self.store = store
        self.owns_store = owns_store
        self.name = name

    async def write(self, events: Sequence[UsageEvent]) -> None:
        if events:
            await asyncio.to_thread(self.store.insert, events)

    async def close(self) -> None:
        if self.owns_store:
            self.store.close()
