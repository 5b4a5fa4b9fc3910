"""What only the PostgreSQL event store has: its migrations (idempotent, safe when replicas start at once,
refusing a newer schema), idempotent `insert_new`, batched retention, the table's layout, and failing fast
when the server cannot be reached."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import psycopg
import pytest

from orq_proxy.eventstore.duckdb import EVENT_COLUMNS as DUCKDB_COLUMNS
from orq_proxy.eventstore.duckdb import DuckDBEventStore, event_row
from orq_proxy.eventstore.postgres import EVENT_COLUMNS, EVENTS_TABLE, STEPS, PostgresEventStore
from orq_proxy.postgres import SchemaTooNew
from orq_proxy.usage.events import UsageEvent
from tests.conftest import fresh_database

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def make_event(i: int, **kw: Any) -> UsageEvent:
    data: dict[str, Any] = {
        "event_id": f"e{i:05d}",
        "timestamp": T0 + timedelta(minutes=i),
        "workspace": "w",
        "project": "p",
        "api_key_id": "k",
        "identity": "u",
        "total_cost_nanos": 1_000 + i,
    }
    data.update(kw)
    return UsageEvent(**data)


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresEventStore]:
    store = PostgresEventStore(pg_url, delete_batch=7)
    yield store
    store.close()


def schema_version(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT version FROM orq_proxy_schema WHERE component = 'events'").fetchone()
    assert row is not None
    return int(row[0])


def test_columns_match_the_duckdb_store() -> None:
    """The same columns as DuckDB's table, in the same (`UsageEvent`) order, so a row means the same."""
    assert list(EVENT_COLUMNS) == list(DUCKDB_COLUMNS)


def test_opening_twice_migrates_once(pg_url: str) -> None:
    """A second open finds the schema current and changes nothing; the rows stay."""
    first = PostgresEventStore(pg_url)
    first.insert([make_event(1)])
    first.close()
    again = PostgresEventStore(pg_url)
    try:
        assert again.count() == 1
    finally:
        again.close()
    assert schema_version(pg_url) == len(STEPS)


def test_two_replicas_opening_a_fresh_database_at_once(pg_url: str) -> None:
    """Two threads opening the store on an empty database at the same moment both succeed (the advisory
    lock makes the second wait for the first, then find the work done)."""
    barrier = threading.Barrier(2)
    opened: list[PostgresEventStore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(PostgresEventStore(pg_url))
        except BaseException as exc:  # (re-raised below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert errors == [] and len(opened) == 2
        opened[0].insert([make_event(1)])
        assert opened[1].count() == 1
    finally:
        for store in opened:
            store.close()
    assert schema_version(pg_url) == len(STEPS)


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    """A database migrated by a newer orq-proxy (a higher version than `STEPS`) is refused."""
    PostgresEventStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE orq_proxy_schema SET version = version + 1 WHERE component = 'events'")
    with pytest.raises(SchemaTooNew, match="events schema"):
        PostgresEventStore(pg_url)


def test_the_table_is_laid_out_for_time_scans(store: PostgresEventStore) -> None:
    """`event_id` is the primary key; `ts` has a BRIN index; budget rebuilds have a partial btree."""
    with store.connection() as conn:
        indexes = dict(
            conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", (EVENTS_TABLE,)
            ).fetchall()
        )
    assert "PRIMARY KEY" not in indexes  # (pg_indexes shows the key's index)
    assert any("UNIQUE" in sql and "(event_id)" in sql for sql in indexes.values())
    assert any("USING brin (ts)" in sql for sql in indexes.values())
    assert any("btree (ts) WHERE (cardinality(budget_ids) > 0)" in sql for sql in indexes.values())


def test_rows_read_back_as_the_duckdb_store_keeps_them(store: PostgresEventStore) -> None:
    """Every column of every kind of event reads back as the DuckDB store's row of it (naive UTC `ts`,
    arrays, NULLs, JSON metadata text, big ints)."""
    events = [
        make_event(1, identity_tags=["beta", "vip"], metadata={"team": "a"}, ttft_ms=1.25, budget_ids=["b"]),
        make_event(
            2, identity=None, credential_type="jwt", usage_note="client left", usage_source="estimated"
        ),
        make_event(
            3, timestamp=datetime(2026, 3, 1, 5, 30, 0, 1, tzinfo=UTC), total_cost_nanos=123_456_789_012
        ),
    ]
    store.insert(events)
    with store.connection() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM {EVENTS_TABLE} ORDER BY event_id"
        ).fetchall()
    assert [list(row) for row in rows] == [event_row(event) for event in events]


def test_insert_is_all_or_nothing(store: PostgresEventStore) -> None:
    """A batch with a bad row inserts nothing (one COPY), so a retry cannot duplicate the good rows."""
    good = make_event(1)
    bad = make_event(2).model_copy(update={"input_tokens": "not a number"})
    with pytest.raises(psycopg.DataError):
        store.insert([good, bad])
    assert store.count() == 0
    store.insert([good])
    assert store.count() == 1


def test_a_retried_batch_stores_each_event_once(store: PostgresEventStore) -> None:
    """A batch that went through although the sink bus saw it fail (a timeout) is retried: its events are
    not stored twice, and the new ones of the batch are stored."""
    store.insert([make_event(1), make_event(2)])
    store.insert([make_event(3), make_event(1), make_event(2)])
    with store.connection() as conn:
        ids = conn.execute(f"SELECT event_id FROM {EVENTS_TABLE} ORDER BY event_id").fetchall()
    assert ids == [("e00001",), ("e00002",), ("e00003",)]


@pytest.mark.parametrize("insert", ["insert", "insert_new"])
def test_nul_characters_are_replaced_not_refused(store: PostgresEventStore, insert: str) -> None:
    """PostgreSQL text cannot hold NUL: a client sending one (in its identity, a tag, the model) does not
    make its batch, and the other clients' events in it, fail forever; the NUL becomes U+FFFD."""
    events = [
        make_event(1),
        make_event(2, identity="a\x00b", identity_tags=["t\x00"], model="m\x00", metadata={"k": "v\x00"}),
    ]
    getattr(store, insert)(events)
    with store.connection() as conn:
        rows = conn.execute(
            f"SELECT identity, identity_tags, model, metadata FROM {EVENTS_TABLE} ORDER BY event_id"
        ).fetchall()
    assert rows == [("u", [], None, "{}"), ("a\ufffdb", ["t\ufffd"], "m\ufffd", '{"k":"v\\u0000"}')]


def test_insert_new_is_idempotent_across_calls(store: PostgresEventStore) -> None:
    """`insert_new` adds only the events whose id is not stored (the first of repeated ones), so replaying
    a spool twice, or one overlapping the store, inserts each event once."""
    store.insert([make_event(i) for i in range(3)])
    replay = [make_event(i) for i in range(5)] + [make_event(4, total_cost_nanos=7)]
    assert store.insert_new(replay) == 2
    assert store.insert_new(replay) == 0
    assert store.insert_new([]) == 0
    assert store.count() == 5
    with store.connection() as conn:
        row = conn.execute(
            f"SELECT total_cost_nanos FROM {EVENTS_TABLE} WHERE event_id = 'e00004'"
        ).fetchone()
    assert row == (1_004,)


def test_insert_new_of_a_bad_batch_inserts_nothing(store: PostgresEventStore) -> None:
    """A bad row fails the whole `insert_new` (one transaction), and the connection stays usable."""
    bad = make_event(9).model_copy(update={"input_tokens": "not a number"})
    with pytest.raises(psycopg.DataError):
        store.insert_new([make_event(1), bad])
    assert store.count() == 0
    assert store.insert_new([make_event(1)]) == 1


class CountingConnections:
    """Wraps the store's `_connection`: counts the statements run on the connections it hands out."""

    def __init__(self, connection: Any) -> None:
        self.connection_of_store = connection
        self.statements: list[str] = []

    @contextmanager
    def connection(self) -> Iterator[Any]:
        outer = self

        class Counting:
            def __init__(self, conn: psycopg.Connection[Any]) -> None:
                self.conn = conn

            def execute(self, sql: Any, *args: Any) -> Any:
                outer.statements.append(str(sql))
                return self.conn.execute(sql, *args)

        with self.connection_of_store() as conn:
            yield Counting(conn)


def test_retention_deletes_in_batches(store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """`delete_before` deletes every event before the cutoff in statements of `delete_batch` rows (7 here),
    each its own transaction: 30 old events take 5 (then one for the identity-day sums); the newer ones stay; aware and naive cutoffs mean the
    same."""
    store.insert([make_event(i) for i in range(40)])
    counting = CountingConnections(store._connection)
    monkeypatch.setattr(store, "_connection", counting.connection)
    assert store.delete_before(T0 + timedelta(minutes=30)) == 30
    batches = [sql for sql in counting.statements if sql.startswith(f"DELETE FROM {EVENTS_TABLE} ")]
    assert len(batches) == 5 and len(counting.statements) == 6  # and one for the identity-day sums
    assert store.delete_before((T0 + timedelta(minutes=30)).replace(tzinfo=None)) == 0
    monkeypatch.undo()
    assert store.count() == 10
    with store.connection() as conn:
        left = conn.execute(f"SELECT min(event_id) FROM {EVENTS_TABLE}").fetchone()
    assert left == ("e00030",)


def test_delete_batch_must_be_positive(pg_url: str) -> None:
    """A retention batch of no rows would never finish: refused before connecting."""
    with pytest.raises(ValueError, match="delete_batch"):
        PostgresEventStore(pg_url, delete_batch=0)


def test_an_unreachable_server_fails_fast() -> None:
    """Nothing listening: opening the store raises at once, never hangs."""
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        PostgresEventStore("postgresql://postgres@127.0.0.1:1/x")
    assert time.monotonic() - started < 5


def test_a_server_gone_after_opening_fails_fast(pg_url: str, pg_server: str) -> None:
    """When the database goes away under an open store, writes raise within the pool timeout (the sink bus
    retries them) and reads raise as the slices expect."""
    store = PostgresEventStore(pg_url, pool_timeout=1)
    try:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            name = pg_url.rsplit("/", 1)[1]
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            store.insert([make_event(1)])
        assert time.monotonic() - started < 5
    finally:
        store.close()


def test_duckdb_and_postgres_agree_on_budget_consumption(store: PostgresEventStore) -> None:
    """Budget rebuilds read the same from both stores: settled at `ts + latency` (rounded to the
    microsecond half away from zero, as DuckDB does), a day of look-back, the rate window by arrival."""
    start = T0 + timedelta(hours=1)
    events = [
        make_event(
            i,
            timestamp=start + timedelta(minutes=7 * i - 120, microseconds=i),
            latency_ms=[0.0005, 0.0015, 1234.5675, 3_600_000.0, 12.25][i % 5],
            budget_ids=[["a"], ["a", "b"], [], ["b"]][i % 4],
            total_tokens=i,
        )
        for i in range(60)
    ]
    duck = DuckDBEventStore()
    try:
        duck.insert(events)
        store.insert(events)
        since = {"a": start, "b": start + timedelta(minutes=30), "c": start}
        window = start + timedelta(hours=3)
        assert store.budget_consumption(since, window) == duck.budget_consumption(since, window)
        assert store.budget_consumption({}, window) == {}
        assert set(store.budget_consumption(since, window)) == {"a", "b"}
    finally:
        duck.close()


def test_a_proxy_keeps_its_events_in_postgres(proxy_factory: Any, pg_url: str) -> None:
    """`[storage] events = "postgresql://..."`: a proxied request's event lands in the database, and a
    report through the proxy counts it."""
    config = {
        "storage": {"events": pg_url},
        "api_keys": [{"key": "sk-admin", "id": "key_admin", "admin": True}],
    }
    _, server = proxy_factory(config)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-admin", max_retries=0)
    client.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
    deadline = time.monotonic() + 10
    with psycopg.connect(pg_url) as conn:
        while True:
            row = conn.execute(f"SELECT count(*), min(api_key_id) FROM {EVENTS_TABLE}").fetchone()
            if row == (1, "key_admin") or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    assert row == (1, "key_admin")
    now = datetime.now(UTC)
    body = {
        "metric": "genai.requests",
        "mode": "scalar",
        "from": (now - timedelta(hours=1)).isoformat(),
        "to": (now + timedelta(minutes=5)).isoformat(),
    }
    response = httpx.post(
        server.url + "/v2/reporting", json=body, headers={"Authorization": "Bearer sk-admin"}
    )
    assert response.status_code == 200
    assert response.json()["data"][0]["metrics"] == {"genai.requests": 1}


def test_identity_totals_are_kept_as_events_are_inserted(store: PostgresEventStore) -> None:
    """`identity_totals` (include_metrics shared by replicas) sums what `identity_days` sums, per identity
    over the days from `since`: kept by the insert's trigger, so a retried batch and `insert_new`'s replay
    count each event once; unattributed events, other workspaces and unknown identities are left out."""
    day = datetime(2026, 3, 2, tzinfo=UTC)
    events = [
        make_event(
            i,
            timestamp=day + timedelta(hours=7 * i - 30),
            identity=f"u{i % 3}",
            total_tokens=i,
            status="ERROR" if i % 4 == 0 else "OK",
        )
        for i in range(20)
    ] + [make_event(50, identity=None), make_event(51, workspace="other", timestamp=day)]
    store.insert(events[:10])
    store.insert(events[5:15])  # a retry overlapping the first batch
    assert store.insert_new(events) == len(events) - 15
    want: dict[str, list[int]] = {}
    for row in store.identity_days(day):
        if row.workspace == "w":
            sums = want.setdefault(row.identity, [0, 0, 0, 0])
            for i, value in enumerate((row.requests, row.errors, row.tokens, row.cost_nanos)):
                sums[i] += value
    got = store.identity_totals("w", ["u0", "u1", "u2", "nobody"], day)
    assert {identity: list(totals) for identity, totals in got.items()} == want
    assert set(got) == {"u0", "u1", "u2"} and store.identity_totals("w", [], day) == {}
    assert (
        sum(
            t.requests
            for t in store.identity_totals("w", ["u0", "u1", "u2"], day - timedelta(days=2)).values()
        )
        == 20
    )
    assert store.identity_totals("other", ["u"], day)["u"].requests == 1


def test_retention_drops_the_identity_days_before_the_cutoff(store: PostgresEventStore) -> None:
    """Days wholly before the retention cutoff lose their sums; the cutoff's own day keeps them."""
    store.insert([make_event(i, timestamp=T0 + timedelta(hours=12 * i)) for i in range(6)])  # 3 days
    store.delete_before(T0 + timedelta(days=1, hours=13))
    got = store.identity_totals("w", ["u"], T0 - timedelta(days=1))
    assert got["u"].requests == 4  # day 2 (both events, one of them deleted) and day 3


def test_migrating_from_version_1_fills_the_identity_days(pg_url: str) -> None:
    """A database at version 1 (events, no identity-day sums) gets them from the events it holds."""
    from orq_proxy.postgres import migrate

    migrate(pg_url, "events", STEPS[:1])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {EVENTS_TABLE} (event_id, ts, workspace, project, api_key_id, identity, product, status, "
            "http_status, stream, input_tokens, output_tokens, total_tokens, input_cost_nanos, output_cost_nanos, "
            "total_cost_nanos, latency_ms, usage_source, price_source) VALUES "
            "('a', '2026-03-01 10:00', 'w', 'p', 'k', 'u', 'other', 'ERROR', 500, false, 0, 0, 7, 0, 0, 9, 1, "
            "'exact', 'unknown')"
        )
    store = PostgresEventStore(pg_url)
    try:
        assert schema_version(pg_url) == len(STEPS)
        assert store.identity_totals("w", ["u"], T0) == {"u": (1, 1, 7, 9)}
    finally:
        store.close()


def test_writes_resume_promptly_after_a_server_restart(own_postgres: Any) -> None:
    """PostgreSQL stops (every pooled connection dies) and comes back: while it is down a write raises
    within the pool timeout; once it is back the next write goes through within the pool timeout (a direct
    connection, not after the pool's reconnection backoff), and the ones after at once (a fresh pool)."""
    with fresh_database(own_postgres.admin_url) as url:
        store = PostgresEventStore(url, pool_timeout=1)
        try:
            store.insert([make_event(1)])
            own_postgres.stop()
            for _ in range(3):  # (the pool's reconnection attempts fail and back off meanwhile)
                started = time.monotonic()
                with pytest.raises(psycopg.OperationalError):
                    store.insert([make_event(2)])
                assert time.monotonic() - started < 5
            own_postgres.start()
            started = time.monotonic()
            store.insert([make_event(2)])
            assert time.monotonic() - started < 2.5
            started = time.monotonic()
            store.insert([make_event(3)])
            assert time.monotonic() - started < 1
            assert store.count() == 3
        finally:
            store.close()


def test_migrating_from_version_2_adds_the_cache_write_columns(pg_url: str) -> None:
    """A database at version 2 (before cache writes) gets the three columns (0 for the rows it holds,
    which it keeps); events with cache writes then round-trip, COPY and `insert_new` alike."""
    from orq_proxy.postgres import migrate

    migrate(pg_url, "events", STEPS[:2])
    old = make_event(0, input_tokens=9, cached_input_tokens=2, budget_ids=["b"])
    old_columns = [name for name in EVENT_COLUMNS if not name.startswith("cache_write")]
    old_row = [v for name, v in zip(EVENT_COLUMNS, event_row(old), strict=True) if name in old_columns]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {EVENTS_TABLE} ({', '.join(old_columns)}) "
            f"VALUES ({', '.join('%s' for _ in old_columns)})",
            old_row,
        )
    writes = {"cache_write_tokens": 3_000, "cache_write_1h_tokens": 1_000, "cache_write_cost_nanos": 12_345}
    store = PostgresEventStore(pg_url)
    try:
        assert schema_version(pg_url) == len(STEPS) == 3
        new = [make_event(1, input_tokens=5_000, **writes), make_event(2)]
        store.insert(new[:1])
        assert store.insert_new([old, *new]) == 1  # (only e00002 is new)
        with store.connection() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM {EVENTS_TABLE} ORDER BY event_id"
            ).fetchall()
            physical = [
                row[0]
                for row in conn.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                    "AND NOT attisdropped ORDER BY attnum",
                    (EVENTS_TABLE,),
                ).fetchall()
            ]
        assert [list(row) for row in rows] == [event_row(e) for e in [old, *new]]
        assert physical[-3:] == list(writes)
        assert store.identity_totals("w", ["u"], T0)["u"].requests == 3
    finally:
        store.close()
