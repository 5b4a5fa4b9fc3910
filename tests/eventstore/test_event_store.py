"""The event store seam: the slices read events only through protocols they own, the DuckDB and
PostgreSQL stores implement every one of them, and their identity and failure reads answer what the slices
expect (each store-neutral test runs against both)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest

import orq_proxy
from orq_proxy.budgets.ledger import BudgetLedger
from orq_proxy.eventstore import EventStore, event_store_from_url
from orq_proxy.eventstore.duckdb import DuckDBEventStore
from orq_proxy.eventstore.postgres import PostgresEventStore
from orq_proxy.identities.metrics import IdentityDay, IdentityHistory, IdentityMetrics
from orq_proxy.reporting.engine import plan_report
from orq_proxy.reporting.query import parse_report_query
from orq_proxy.reporting.source import (
    EventRetention,
    Measure,
    ReportPlan,
    ReportScope,
    ReportSource,
    ReportSourceError,
)
from orq_proxy.sinks.base import EventWriter
from orq_proxy.testing.clock import FakeClock
from orq_proxy.usage.events import UsageEvent

ROOT = Path(orq_proxy.__file__).parent
# The slices that read or produce events but must not know how they are stored (sinks are left out:
# `build_sinks` opens a DuckDB file for a `[[sinks]] type = "duckdb"` entry).
STORE_FREE_PACKAGES = ("reporting", "identities", "budgets", "metering", "usage")
DUCKDB_MODULES = ("duckdb", "orq_proxy.eventstore.duckdb", "orq_proxy.sinks.duckdb")
# (A slice may keep its own state in PostgreSQL, `identities/postgres.py`; the event store is not its own.)
EVENT_STORE_MODULES = (*DUCKDB_MODULES, "orq_proxy.eventstore.postgres")
NOW = datetime(2026, 5, 20, 15, tzinfo=UTC)
# What each backend raises for a database error (the cause chained to a `ReportSourceError`).
DRIVER_ERRORS: dict[str, type[Exception]] = {"duckdb": duckdb.Error, "postgres": psycopg.Error}


AnyStore = DuckDBEventStore | PostgresEventStore


def open_store(request: pytest.FixtureRequest, backend: str) -> AnyStore:
    """An empty store of `backend` (PostgreSQL: in a database of the test's own)."""
    if backend == "duckdb":
        return DuckDBEventStore()
    return PostgresEventStore(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["duckdb", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def store(request: pytest.FixtureRequest, backend: str) -> Iterator[AnyStore]:
    """An empty store of each backend, closed afterwards (closing twice is harmless)."""
    store = open_store(request, backend)
    yield store
    store.close()


def imported_names(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (functions and `if TYPE_CHECKING:` included), and for
    `from a import b` also `a.b` (which may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_duckdb(name: str) -> bool:
    return any(name == module or name.startswith(module + ".") for module in DUCKDB_MODULES)


def is_event_store_backend(name: str) -> bool:
    return any(name == module or name.startswith(module + ".") for module in EVENT_STORE_MODULES)


@pytest.mark.parametrize(
    "path",
    [path for package in STORE_FREE_PACKAGES for path in sorted((ROOT / package).glob("*.py"))],
    ids=lambda path: f"{path.parent.name}/{path.name}",
)
def test_slices_import_no_duckdb_module(path: Path) -> None:
    """Reporting, identities (and budgets, metering, the usage kernel) name no event store backend (DuckDB,
    PostgreSQL): they read the store through their own protocols."""
    assert sorted(name for name in imported_names(path) if is_event_store_backend(name)) == []


def test_the_import_check_sees_a_duckdb_import(tmp_path: Path) -> None:
    """The check above would catch each way of importing DuckDB, even inside a function."""
    source = tmp_path / "m.py"
    source.write_text(
        "import duckdb.typing\nfrom orq_proxy.eventstore import duckdb as d\n"
        "def f():\n    from orq_proxy.sinks.duckdb import DuckDBEventStore\n"
    )
    assert sorted(name for name in imported_names(source) if is_duckdb(name)) == [
        "duckdb.typing",
        "orq_proxy.eventstore.duckdb",
        "orq_proxy.sinks.duckdb",
        "orq_proxy.sinks.duckdb.DuckDBEventStore",
    ]


def test_importing_reporting_and_identities_loads_no_duckdb() -> None:
    """Every module of reporting and identities imports without loading DuckDB or an event store backend,
    directly or through another module (checked in a fresh interpreter)."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import orq_proxy.identities, orq_proxy.reporting\n"
        "for pkg in (orq_proxy.identities, orq_proxy.reporting):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m == 'duckdb' or m.startswith(('duckdb.', 'orq_proxy.eventstore'))"
        " or m == 'orq_proxy.sinks.duckdb'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "protocol", [EventStore, ReportSource, EventRetention, IdentityHistory, BudgetLedger, EventWriter]
)
def test_stores_implement_every_slice_protocol(protocol: type, store: object) -> None:
    """Each store is an `EventStore`, so each slice's protocol (mypy checks the signatures too, at the
    end of `eventstore/duckdb.py` and `eventstore/postgres.py`)."""
    assert isinstance(store, protocol)


def test_a_store_missing_a_read_is_no_event_store() -> None:
    """The runtime check has teeth: a writer without the reads is not an `EventStore`."""

    class WriteOnly:
        def insert(self, events: list[UsageEvent]) -> None: ...

        async def aclose(self) -> None: ...

    assert isinstance(WriteOnly(), EventWriter)
    assert not isinstance(WriteOnly(), EventStore)


def test_event_store_from_url(pg_url: str) -> None:
    """`duckdb://:memory:` opens a DuckDB store, `postgresql://` and `postgres://` a PostgreSQL one;
    another scheme is a ValueError naming the URL."""
    store = event_store_from_url("duckdb://:memory:")
    try:
        assert isinstance(store, DuckDBEventStore) and store.path == ":memory:"
    finally:
        store.close()
    for url in (pg_url, "postgres://" + pg_url.split("://", 1)[1]):
        pg = event_store_from_url(url)
        try:
            assert isinstance(pg, PostgresEventStore) and pg.url == url and pg.count() == 0
        finally:
            pg.close()
    with pytest.raises(ValueError, match="mysql://db/events"):
        event_store_from_url("mysql://db/events")


def test_a_postgres_url_without_the_driver_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without psycopg installed, a PostgreSQL URL is a ValueError naming the `postgres` extra."""
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)  # `import psycopg_pool` now raises ImportError
    with pytest.raises(ValueError, match=r"orq-proxy\[postgres\]"):
        event_store_from_url("postgresql://postgres@127.0.0.1:1/x")


async def test_aclose_closes_and_keeps_a_file(tmp_path: Path) -> None:
    """`aclose` closes the database (off the event loop); a file store keeps its rows for the next open."""
    path = str(tmp_path / "events.duckdb")
    store = DuckDBEventStore(path)
    store.insert([make_event(0, NOW)])
    await store.aclose()
    with pytest.raises(duckdb.ConnectionException):
        store.count()
    again = DuckDBEventStore(path)
    try:
        assert again.count() == 1
    finally:
        again.close()


def make_event(i: int, when: datetime, **kw: Any) -> UsageEvent:
    data: dict[str, Any] = {
        "event_id": f"e{i}",
        "timestamp": when,
        "workspace": "ws",
        "project": "p",
        "api_key_id": "k",
        "identity": "u1",
        "total_tokens": 10 + i,
        "total_cost_nanos": 1_000 + i,
    }
    data.update(kw)
    return UsageEvent(**data)


def test_identity_days_sum_per_workspace_identity_and_utc_day(store: EventStore) -> None:
    """One row per (workspace, identity, UTC day) at or after `since`, in day order, with requests,
    errors, tokens and nano-USD; unattributed events are left out."""
    day = datetime(2026, 5, 18, tzinfo=UTC)
    events = [
        make_event(0, day - timedelta(microseconds=1)),  # before `since`
        make_event(1, day),
        make_event(2, day + timedelta(hours=23, minutes=59), status="ERROR"),
        make_event(3, day + timedelta(days=1)),
        make_event(4, day + timedelta(hours=5), identity="u2"),
        make_event(5, day + timedelta(hours=5), workspace="other"),
        make_event(6, day + timedelta(hours=5), identity=None),
    ]
    store.insert(events)
    days = store.identity_days(day)
    assert all(isinstance(row, IdentityDay) for row in days)
    got = sorted((r.workspace, r.identity, r.day, r.requests, r.errors, r.tokens, r.cost_nanos) for r in days)
    midnight = day.replace(tzinfo=None)  # naive UTC
    assert got == [
        ("other", "u1", midnight, 1, 0, 15, 1_005),
        ("ws", "u1", midnight, 2, 1, 11 + 12, 1_001 + 1_002),
        ("ws", "u1", midnight + timedelta(days=1), 1, 0, 13, 1_003),
        ("ws", "u2", midnight, 1, 0, 14, 1_004),
    ]
    assert [r.day for r in days] == sorted(r.day for r in days)


def test_seeding_from_the_store_equals_recording_the_events(store: EventStore) -> None:
    """Rings rebuilt from the store give the same snapshots as recording the same events live."""
    clock = FakeClock(NOW)
    events = [
        make_event(
            i,
            NOW - timedelta(hours=7 * i),
            identity=f"u{i % 4}",
            status="ERROR" if i % 5 == 0 else "OK",
        )
        for i in range(150)  # about 44 days: some before the 30-day window
    ]
    live, seeded = IdentityMetrics(clock=clock), IdentityMetrics(clock=clock)
    for e in events:
        live.record(e)
    store.insert(events)
    assert seeded.seed_from_events(store) > 0
    for identity in ("u0", "u1", "u2", "u3"):
        assert seeded.snapshot("ws", identity) == live.snapshot("ws", identity)


def test_a_failing_report_is_a_report_source_error(store: AnyStore, backend: str) -> None:
    """A database error while reporting (here: the store is closed) reaches reporting as its own
    `ReportSourceError`, chained to the driver's error."""
    store.close()
    body = {"metric": "genai.requests", "from": "2026-05-19T00:00:00Z", "to": "2026-05-20T00:00:00Z"}
    plan = plan_report(parse_report_query(body, now=NOW), ReportScope("ws"))
    with pytest.raises(ReportSourceError) as caught:
        store.report(plan)
    assert isinstance(caught.value.__cause__, DRIVER_ERRORS[backend])


@pytest.mark.parametrize(
    ("measure", "problem"),
    [
        (Measure("x", "sum", "identity"), "not a numeric event column"),
        (Measure("x", "sum", "ts); DROP TABLE usage_events; --"), "not a numeric event column"),
        (Measure("x", "quantile", "latency_ms", 1.5, kind="float"), "fraction must be 0..1"),
        (Measure("x", "quantile", "latency_ms", kind="float"), "fraction must be 0..1"),
    ],
)
def test_measures_outside_the_whitelist_are_refused(
    measure: Measure, problem: str, store: EventStore
) -> None:
    """A measure's column must be a numeric event column and a quantile's rank 0..1: nothing else is
    ever written into the SQL."""
    body = {"metric": "genai.requests", "from": "2026-05-19T00:00:00Z", "to": "2026-05-20T00:00:00Z"}
    plan = plan_report(parse_report_query(body, now=NOW), ReportScope("ws"))
    with pytest.raises(ValueError, match=problem):
        store.report(ReportPlan(plan.query, plan.scope, (measure,), ("x",), plan.segments))


def test_an_in_memory_store_keeps_at_most_its_maximum(caplog: pytest.LogCaptureFixture) -> None:
    """`max_events`: past it (by a tenth) the oldest events are deleted down to it, counted and logged; the
    newest are all kept, reports see them; a file store is not bounded this way."""
    import logging
    from datetime import UTC, datetime, timedelta

    from orq_proxy.eventstore.duckdb import DuckDBEventStore
    from orq_proxy.usage.events import UsageEvent

    t0 = datetime(2026, 3, 1, tzinfo=UTC)

    def batch(start: int, n: int) -> list[UsageEvent]:
        return [
            UsageEvent(
                event_id=f"e{i:06d}",
                timestamp=t0 + timedelta(seconds=i),
                workspace="w",
                project="p",
                api_key_id="k",
            )
            for i in range(start, start + n)
        ]

    store = DuckDBEventStore(max_events=1000)
    with caplog.at_level(logging.INFO, logger="orq_proxy.eventstore.duckdb"):
        for start in range(0, 5000, 250):
            store.insert(batch(start, 250))
            assert store.count() <= 1100
    cur = store.cursor()
    oldest, newest = cur.execute("SELECT min(event_id), max(event_id) FROM usage_events").fetchone()
    cur.close()
    assert newest == "e004999" and store.count() + store.dropped_events == 5000
    assert oldest == f"e{store.dropped_events:06d}"  # exactly the oldest went
    lines = [r for r in caplog.records if "dropped the" in r.getMessage()]
    assert lines and lines[0].levelno == logging.WARNING and all(r.levelno == logging.INFO for r in lines[1:])
    store.close()


CACHE_WRITES = {"cache_write_tokens": 3_000, "cache_write_1h_tokens": 1_000, "cache_write_cost_nanos": 12_345}


def test_cache_write_fields_round_trip(store: AnyStore) -> None:
    """An event's prompt-cache writes (tokens, one-hour tokens, cost) read back as written, next to
    events without them (which read back as 0), on both backends."""
    from orq_proxy.eventstore.duckdb import EVENT_COLUMNS, EVENTS_TABLE, event_row

    events = [
        make_event(1, NOW, input_tokens=5_000, cached_input_tokens=1_000, **CACHE_WRITES),
        make_event(2, NOW, cached_input_tokens=7),  # the other optional group alone
        make_event(3, NOW),
    ]
    store.insert(events)
    columns = ", ".join(EVENT_COLUMNS)
    if isinstance(store, DuckDBEventStore):
        cur = store.cursor()
        try:
            rows = cur.execute(f"SELECT {columns} FROM {EVENTS_TABLE} ORDER BY event_id").fetchall()
        finally:
            cur.close()
    else:
        with store.connection() as conn:
            rows = conn.execute(f"SELECT {columns} FROM {EVENTS_TABLE} ORDER BY event_id").fetchall()
    assert [list(row) for row in rows] == [event_row(event) for event in events]
    names = list(EVENT_COLUMNS)
    got = {name: rows[0][names.index(name)] for name in CACHE_WRITES}
    assert got == CACHE_WRITES
    assert [rows[i][names.index("cache_write_cost_nanos")] for i in (1, 2)] == [0, 0]


def test_a_duckdb_file_from_before_cache_writes_gains_the_columns(tmp_path: Path) -> None:
    """A file written before events had cache writes gets the three columns when opened (at the end of
    its table, so its physical order differs from `EVENT_COLUMNS`): its rows read 0 there, and rows of
    every shape are appended by column name into the right places."""
    from orq_proxy.eventstore.duckdb import EVENT_COLUMNS, EVENTS_TABLE, event_row

    path = str(tmp_path / "old.duckdb")
    old = {name: kind for name, kind in EVENT_COLUMNS.items() if name not in CACHE_WRITES}
    conn = duckdb.connect(path)
    conn.execute(f"CREATE TABLE {EVENTS_TABLE} ({', '.join(f'{n} {k}' for n, k in old.items())})")
    old_event = make_event(0, NOW, input_tokens=9, cached_input_tokens=2)
    old_row = [v for name, v in zip(EVENT_COLUMNS, event_row(old_event), strict=True) if name in old]
    conn.execute(f"INSERT INTO {EVENTS_TABLE} VALUES ({', '.join('?' for _ in old)})", old_row)
    conn.close()

    store = DuckDBEventStore(path)
    try:
        events = [
            make_event(1, NOW, input_tokens=5_000, **CACHE_WRITES),
            make_event(
                2, NOW, input_tokens=5_000, cached_input_tokens=4, identity_tags=["t"], **CACHE_WRITES
            ),
            make_event(3, NOW, reasoning_tokens=5),
        ]
        store.insert(events)
        cur = store.cursor()
        try:
            physical = [row[0] for row in cur.execute(f"DESCRIBE {EVENTS_TABLE}").fetchall()]
            rows = cur.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM {EVENTS_TABLE} ORDER BY event_id"
            ).fetchall()
        finally:
            cur.close()
    finally:
        store.close()
    assert physical[-3:] == list(CACHE_WRITES) and physical != list(EVENT_COLUMNS)
    assert [list(row) for row in rows] == [event_row(e) for e in [old_event, *events]]
