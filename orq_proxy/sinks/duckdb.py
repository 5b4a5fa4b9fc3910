"""The DuckDB event store: the default sink (write side) and what reporting queries (read side).

`duckdb://:memory:` keeps events in process memory; `duckdb:///path/events.duckdb` in a file.
One connection is owned here; every thread that touches it works on its own `cursor()`, which is how
DuckDB shares one database between threads.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

import duckdb

from orq_proxy.usage.events import BudgetConsumption, UsageEvent

__all__ = [
    "COLUMN_DEFAULTS",
    "EVENTS_TABLE",
    "EVENT_COLUMNS",
    "DuckDBEventStore",
    "DuckDBSink",
    "event_row",
    "parse_events_url",
]

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
    "budget_ids": "VARCHAR[]",
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


# Columns most events leave at their defaults, in groups. A row carries a group's columns only when one of
# them differs from its default (the rest are filled by the column DEFAULTs below): DuckDB's appender takes
# ~0.2 us per value, and a typical event needs 22 values instead of 33.
_OPTIONAL_GROUPS: tuple[tuple[tuple[str, Any, str], ...], ...] = (
    (
        ("cached_input_tokens", 0, "0"),
        ("reasoning_tokens", 0, "0"),
        ("audio_input_tokens", 0, "0"),
        ("audio_output_tokens", 0, "0"),
        ("cached_cost_nanos", 0, "0"),
        ("reasoning_cost_nanos", 0, "0"),
    ),
    (("identity_tags", [], "[]"),),
    (("credential_type", "api_key", "'api_key'"),),
    (("ttft_ms", None, "NULL"),),
    (("usage_note", None, "NULL"),),
    (("budget_ids", [], "[]"),),
    (("metadata", "{}", "'{}'"),),
)
COLUMN_DEFAULTS: dict[str, str] = {name: sql for group in _OPTIONAL_GROUPS for name, _, sql in group}
# Columns added after files were first written: `ALTER TABLE ... ADD COLUMN IF NOT EXISTS` when opened.
_ADDED_COLUMNS = {"budget_ids": EVENT_COLUMNS["budget_ids"]}
_INDEX = {name: i for i, name in enumerate(EVENT_COLUMNS)}
# Per group: (its columns' values of a row, as a tuple; the defaults' tuple).
_GROUP_CHECKS = [
    (itemgetter(*[_INDEX[name] for name, _, _ in group], -1), (*[value for _, value, _ in group], None))
    for group in _OPTIONAL_GROUPS
]


# Built once: `json.dumps` with options builds an encoder per call (~1.5 us of the ~3.5 us a row with
# metadata took).
_METADATA_ENCODER = json.JSONEncoder(separators=(",", ":"))


def event_row(event: UsageEvent) -> list[Any]:
    """The event as a row in `EVENT_COLUMNS` order."""
    # `UsageEvent` declares its fields in `EVENT_COLUMNS` order (a test holds the two together), and a
    # pydantic model keeps them in that order: the row is its values, with `ts` and `metadata` converted.
    row = list(event.__dict__.values())
    ts = event.timestamp
    row[1] = (ts if ts.tzinfo is UTC else ts.astimezone(UTC)).replace(tzinfo=None)
    metadata = event.metadata
    row[-1] = _METADATA_ENCODER.encode(metadata) if metadata else "{}"
    return row


@lru_cache(maxsize=64)
def _shape(mask: int) -> tuple[list[str], Callable[[list[Any]], tuple[Any, ...]]]:
    """The columns a row of this shape carries (`mask` bit i: optional group i is present), and a getter of
    their values from a full row."""
    left_out = {name for i, group in enumerate(_OPTIONAL_GROUPS) if not mask >> i & 1 for name, _, _ in group}
    columns = [name for name in EVENT_COLUMNS if name not in left_out]
    getter = itemgetter(*[_INDEX[name] for name in columns])
    return columns, getter


def _rows_by_shape(events: Sequence[UsageEvent]) -> dict[int, list[tuple[Any, ...]]]:
    """Rows of `events`, grouped by which optional groups they carry, in arrival order within a group."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    checks = _GROUP_CHECKS
    for event in events:
        row = event_row(event)
        row.append(None)  # (the sentinel the group getters end with: a 1-column group still gives a tuple)
        mask = 0
        bit = 1
        for getter, default in checks:
            if getter(row) != default:
                mask |= bit
            bit <<= 1
        rows = out.get(mask)
        if rows is None:
            rows = out[mask] = []
        rows.append(_shape(mask)[1](row))
    return out


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


class DuckDBEventStore:
    """Owns one DuckDB database holding the `usage_events` table.

    Args:
        path: `:memory:` or a file path (see `parse_events_url`).
    """

    def __init__(self, path: str = ":memory:") -> None:
        self.path = path
        self._conn = duckdb.connect(path)
        self._lock = threading.Lock()
        cols = ", ".join(
            f"{name} {kind}" + (f" DEFAULT {COLUMN_DEFAULTS[name]}" if name in COLUMN_DEFAULTS else "")
            for name, kind in EVENT_COLUMNS.items()
        )
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} ({cols})")
        for name, kind in _ADDED_COLUMNS.items():  # a file written before these columns existed
            self._conn.execute(
                f"ALTER TABLE {EVENTS_TABLE} ADD COLUMN IF NOT EXISTS {name} {kind} DEFAULT {COLUMN_DEFAULTS[name]}"
            )
        for name, default in COLUMN_DEFAULTS.items():  # a file written before the defaults existed
            self._conn.execute(f"ALTER TABLE {EVENTS_TABLE} ALTER COLUMN {name} SET DEFAULT {default}")

    @classmethod
    def from_url(cls, url: str) -> DuckDBEventStore:
        return cls(parse_events_url(url))

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for the calling thread (DuckDB cursors are per-thread handles on one database).
        Made under the insert lock: the shared connection object is only ever touched by one thread."""
        with self._lock:
            return self._conn.cursor()

    def insert(self, events: Sequence[UsageEvent]) -> None:
        """Append events, all or none (blocking; call it from a worker thread)."""
        if not events:
            return
        groups = _rows_by_shape(events)
        with self._lock:
            cur = self._conn.cursor()
            try:
                # DuckDB's appender: ~180x the rows/s of executemany (benchmarks/RESULTS.md, metering); one
                # per row shape, in one transaction, so a retried batch is never half in already.
                cur.begin()
                try:
                    for mask, rows in groups.items():
                        appender = cur.appender(EVENTS_TABLE, columns=_shape(mask)[0])
                        try:
                            appender.append_rows(rows)
                            appender.flush()
                        except BaseException:
                            appender.clear()
                            raise
                    cur.commit()
                except BaseException:
                    cur.rollback()
                    raise
            finally:
                cur.close()

    def delete_before(self, cutoff: datetime) -> int:
        """Delete the events older than `cutoff` (aware, or naive UTC); how many were deleted (blocking).

        The retention rule (`[reporting] retention_days`): reporting refuses to look further back, and the
        app runs this hourly so a long-running store does not grow without bound.
        """
        if cutoff.tzinfo is not None:
            cutoff = cutoff.astimezone(UTC).replace(tzinfo=None)
        with self._lock:
            cur = self._conn.cursor()
            try:
                row = cur.execute(f"DELETE FROM {EVENTS_TABLE} WHERE ts < ?", [cutoff]).fetchone()
            finally:
                cur.close()
        return int(row[0]) if row else 0

    def budget_consumption(
        self, since: Mapping[str, datetime], requests_since: datetime
    ) -> dict[str, BudgetConsumption]:
        """What the events charged to each budget of `since` (budget id -> the instant its count starts),
        for rebuilding budget counters at startup (blocking: one query over the oldest window).

        An event is charged when its request settled (`ts + latency_ms`: a request that straddles a window
        boundary counts in the window it finished in, as the counters did); the request counts for the rate
        window at its arrival (`ts`) when that is at or after `requests_since`. Budgets with nothing charged
        are left out.
        """
        if not since:
            return {}
        ids = list(since)
        starts = [_naive_utc(since[i]) for i in ids]
        window_start = _naive_utc(requests_since)
        cur = self.cursor()
        try:
            rows = cur.execute(
                f"WITH b AS (SELECT unnest(?::VARCHAR[]) AS budget_id, unnest(?::TIMESTAMP[]) AS since), "
                f"e AS (SELECT unnest(budget_ids) AS budget_id, ts, "
                f"ts + to_microseconds(CAST(round(latency_ms * 1000) AS BIGINT)) AS settled, "
                f"total_cost_nanos, total_tokens FROM {EVENTS_TABLE} "
                f"WHERE len(budget_ids) > 0 AND ts >= CAST(? AS TIMESTAMP) - INTERVAL 1 DAY) "
                f"SELECT budget_id, sum(total_cost_nanos) FILTER (WHERE settled >= since), "
                f"sum(total_tokens) FILTER (WHERE settled >= since), "
                f"list(epoch_us(ts) ORDER BY ts) FILTER (WHERE ts >= CAST(? AS TIMESTAMP) AND settled >= since) "
                f"FROM e JOIN b USING (budget_id) GROUP BY budget_id",
                # (a request may run for hours, so events that arrived a day before the earliest window
                # still count when they settled inside it)
                [ids, starts, min(starts), window_start],
            ).fetchall()
        finally:
            cur.close()
        return {
            budget_id: BudgetConsumption(
                int(cost or 0), int(tokens or 0), tuple(us / 1_000_000 for us in times or ())
            )
            for budget_id, cost, tokens, times in rows
        }

    def count(self) -> int:
        cur = self._conn.cursor()
        try:
            row = cur.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()
        finally:
            cur.close()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:  # after a write or a retention delete still running in a worker thread
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
