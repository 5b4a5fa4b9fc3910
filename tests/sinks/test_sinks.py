"""Built-in sinks (memory, JSON Lines, DuckDB) and `build_sinks` from config; the event store's writes
against each store (DuckDB, PostgreSQL)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest

from orq_proxy.config import ProxyConfig
from orq_proxy.eventstore.duckdb import EVENT_COLUMNS, EVENTS_TABLE, DuckDBEventStore, event_row
from orq_proxy.eventstore.postgres import PostgresEventStore
from orq_proxy.sinks.base import EventBus, build_sinks
from orq_proxy.sinks.duckdb import DuckDBSink
from orq_proxy.sinks.jsonl import JsonlSink
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.usage.events import UsageEvent


def make_event(i: int, **kw: object) -> UsageEvent:
    data: dict[str, object] = {
        "event_id": f"ev{i:04d}",
        "timestamp": datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC),
        "workspace": "ws",
        "project": "pr",
        "api_key_id": "key",
        "identity": "user_1",
        "identity_source": "header",
        "identity_tags": ["beta", "vip"],
        "provider": "openai",
        "model": "openai/gpt-4o",
        "product": "chat.completions",
        "input_tokens": 10 + i,
        "output_tokens": 5,
        "total_tokens": 15 + i,
        "total_cost_nanos": 123_456_789_012,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "metadata": {"team": "a"},
    }
    data.update(kw)
    return UsageEvent.model_validate(data)


AnyStore = DuckDBEventStore | PostgresEventStore


@pytest.fixture(params=["duckdb", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store of `backend` that outlives its first opening lives (a file; a database of its own)."""
    return str(tmp_path / "ev.duckdb") if backend == "duckdb" else str(request.getfixturevalue("pg_url"))


def open_store(backend: str, where: str = ":memory:") -> AnyStore:
    return DuckDBEventStore(where) if backend == "duckdb" else PostgresEventStore(where)


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest) -> Iterator[AnyStore]:
    """An empty store of each backend (DuckDB in memory; PostgreSQL in a database of the test's own)."""
    store = open_store(backend, ":memory:" if backend == "duckdb" else request.getfixturevalue("pg_url"))
    yield store
    store.close()


def fetch(store: AnyStore, sql: str) -> list[tuple[Any, ...]]:
    """The rows of a parameterless query, read the store's own way."""
    if isinstance(store, DuckDBEventStore):
        cur = store.cursor()
        try:
            return [tuple(row) for row in cur.execute(sql).fetchall()]
        finally:
            cur.close()
    with store.connection() as conn:
        return [tuple(row) for row in conn.execute(sql).fetchall()]


async def test_memory_sink_keeps_newest_when_capped() -> None:
    """`max_events` keeps the newest events."""
    sink = MemorySink(max_events=2)
    await sink.write([make_event(1), make_event(2), make_event(3)])
    assert [e.event_id for e in sink.events] == ["ev0002", "ev0003"]
    with pytest.raises(ValueError):
        MemorySink(max_events=0)


async def test_jsonl_sink_appends_lines_that_round_trip(tmp_path: Path) -> None:
    """Each event is one JSON line; batches append; lines parse back to equal events."""
    path = tmp_path / "sub" / "events.jsonl"
    sink = JsonlSink(path)
    await sink.write([make_event(1), make_event(2)])
    await sink.write([])
    await sink.write([make_event(3, ttft_ms=4.5)])
    await sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    back = [UsageEvent.model_validate_json(line) for line in lines]
    assert back == [make_event(1), make_event(2), make_event(3, ttft_ms=4.5)]
    assert json.loads(lines[0])["total_cost_nanos"] == 123_456_789_012


async def test_duckdb_sink_rows_match_events(store: AnyStore) -> None:
    """Every column lands as written: timestamps (naive UTC), lists, NULLs, JSON metadata, big ints."""
    sink = DuckDBSink(store)
    events = [make_event(i, ttft_ms=1.25 if i else None) for i in range(3)]
    await sink.write(events)
    await sink.write([])
    rows = fetch(
        store,
        f"SELECT event_id, ts, identity_tags, ttft_ms, metadata, total_cost_nanos, input_tokens "
        f"FROM {EVENTS_TABLE} ORDER BY event_id",
    )
    assert rows[0] == (
        "ev0000",
        datetime(2026, 3, 4, 5, 6, 7, 890000),
        ["beta", "vip"],
        None,
        '{"team":"a"}',
        123_456_789_012,
        10,
    )
    assert [r[3] for r in rows] == [None, 1.25, 1.25]
    await sink.close()
    assert store.count() == 3  # not owned: still open


def test_duckdb_insert_is_all_or_nothing(store: AnyStore) -> None:
    """A batch with a bad row inserts nothing, so a retry cannot duplicate the good rows."""
    good = make_event(1)
    bad = make_event(2).model_copy(update={"input_tokens": "not a number"})
    with pytest.raises(Exception):  # noqa: B017 - duckdb's conversion error type is not part of its API
        store.insert([good, bad])
    assert store.count() == 0
    store.insert([good])
    assert store.count() == 1


async def test_duckdb_sink_owning_store_closes_it(backend: str, store_url: str) -> None:
    """An owned store (a file, a database) is closed by the sink, and its rows persist."""
    owned = open_store(backend, store_url)
    sink = DuckDBSink(owned, owns_store=True)
    await sink.write([make_event(1)])
    await sink.close()
    with pytest.raises(Exception):  # noqa: B017 - each driver has its own "closed" error
        owned.count()
    again = open_store(backend, store_url)
    assert again.count() == 1
    again.close()


async def test_build_sinks_from_config(tmp_path: Path, store: AnyStore) -> None:
    """The event store comes first, then each `[[sinks]]` entry, and events reach all of them."""
    config = ProxyConfig.model_validate(
        {
            "sinks": [
                {"type": "jsonl", "path": str(tmp_path / "a.jsonl")},
                {"type": "memory"},
                {"type": "duckdb", "path": str(tmp_path / "b.duckdb")},
            ]
        }
    )
    sinks = build_sinks(config, store)
    assert [type(s).__name__ for s in sinks] == ["DuckDBSink", "JsonlSink", "MemorySink", "DuckDBSink"]
    bus = EventBus(sinks, flush_interval=0.01)
    await bus.start()
    bus.put_nowait(make_event(1))
    await bus.stop(timeout=2)
    assert store.count() == 1
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 1
    memory = sinks[2]
    assert isinstance(memory, MemorySink) and len(memory.events) == 1
    other = DuckDBEventStore(str(tmp_path / "b.duckdb"))
    assert other.count() == 1
    other.close()


@pytest.mark.parametrize("kind", ["jsonl", "duckdb"])
def test_build_sinks_requires_path(kind: str) -> None:
    """A file sink without `path` is an error naming the entry and the key."""
    config = ProxyConfig.model_validate({"sinks": [{"type": kind}]})
    with pytest.raises(ValueError, match=r"sinks\[0\]\.path is required"):
        build_sinks(config, DuckDBEventStore())


def test_usage_event_fields_are_in_event_column_order() -> None:
    """`event_row` reads an event's values in declaration order: that order must be `EVENT_COLUMNS`'."""
    fields = list(UsageEvent.model_fields)
    assert fields[1] == "timestamp"
    assert [*fields[:1], "ts", *fields[2:]] == list(EVENT_COLUMNS)


# Every optional group of the DuckDB rows, at and off its default; the rest of the row stays put.
_OFF_DEFAULT: list[dict[str, object]] = [
    {},
    {"cached_input_tokens": 3},
    {"reasoning_cost_nanos": 7},
    {"audio_output_tokens": 2, "identity_tags": []},
    {"identity_tags": ["x"], "metadata": {}},
    {"credential_type": "jwt"},
    {"ttft_ms": 0.0, "usage_note": "estimated: client left", "usage_source": "estimated"},
    {"metadata": {"k": "v"}, "identity_tags": []},
]


def test_duckdb_rows_of_every_shape_read_back_exactly(store: AnyStore) -> None:
    """Rows that leave columns to their DEFAULTs read back as the events that were written."""
    events = [make_event(i, **kw) for i, kw in enumerate(_OFF_DEFAULT)]
    store.insert(events)
    cols = ", ".join(EVENT_COLUMNS)
    rows = fetch(store, f"SELECT {cols} FROM {EVENTS_TABLE} ORDER BY event_id")
    assert [tuple(r) for r in rows] == [tuple(event_row(e)) for e in events]


def test_duckdb_insert_of_mixed_shapes_is_all_or_nothing(store: AnyStore) -> None:
    """Good rows of other shapes, appended before a bad one, are rolled back with it."""
    good = [make_event(i, **kw) for i, kw in enumerate(_OFF_DEFAULT)]
    bad = make_event(99, usage_note="x").model_copy(update={"input_tokens": "not a number"})
    with pytest.raises(Exception):  # noqa: B017 - duckdb's conversion error type is not part of its API
        store.insert([*good, bad])
    assert store.count() == 0
    store.insert(good)
    assert store.count() == len(good)


def test_duckdb_file_from_before_column_defaults_gets_them(tmp_path: Path) -> None:
    """A file whose table has no DEFAULTs (an older version's) is given them when opened."""
    path = tmp_path / "old.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute(f"CREATE TABLE {EVENTS_TABLE} ({', '.join(f'{n} {k}' for n, k in EVENT_COLUMNS.items())})")
    conn.close()
    store = DuckDBEventStore(str(path))
    store.insert([make_event(1, identity_tags=[], metadata={})])
    cur = store.cursor()
    row = cur.execute(
        f"SELECT identity_tags, metadata, credential_type, cached_input_tokens FROM {EVENTS_TABLE}"
    ).fetchone()
    assert row == ([], "{}", "api_key", 0)
    store.close()


def test_duckdb_delete_before_keeps_the_retention_window(store: AnyStore) -> None:
    """Events older than the cutoff go, the rest stay; aware and naive (UTC) cutoffs mean the same."""
    base = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)
    store.insert([make_event(i, timestamp=base.replace(day=1 + i)) for i in range(5)])  # days 1..5
    assert store.delete_before(datetime(2026, 3, 3, 12, 0, tzinfo=UTC)) == 2  # days 1 and 2
    assert store.delete_before(datetime(2026, 3, 3, 12, 0)) == 0  # naive = UTC: nothing more
    # Same instant in another zone: one more day goes (day 3 at 12:00 UTC is before 13:00 UTC).
    plus_two = timezone(timedelta(hours=2))
    assert store.delete_before(datetime(2026, 3, 3, 15, 0, tzinfo=plus_two)) == 1
    left = fetch(store, f"SELECT event_id FROM {EVENTS_TABLE} ORDER BY ts")
    assert left == [("ev0003",), ("ev0004",)]


def test_app_deletes_events_past_retention_at_startup(proxy_factory: Any, store: AnyStore) -> None:
    """`[reporting] retention_days`: a running proxy deletes older events (at start-up, then hourly)."""
    now = datetime.now(UTC)
    store.insert(
        [
            make_event(1, timestamp=now - timedelta(days=31)),
            make_event(2, timestamp=now - timedelta(days=29)),
            make_event(3, timestamp=now - timedelta(minutes=1)),
        ]
    )
    proxy_factory({"reporting": {"retention_days": 30}}, event_store=store)
    deadline = time.monotonic() + 10
    while store.count() != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    ids = fetch(store, f"SELECT event_id FROM {EVENTS_TABLE} ORDER BY ts")
    assert ids == [("ev0002",), ("ev0003",)]
