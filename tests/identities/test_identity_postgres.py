"""`PostgresIdentityStore` as several replicas see it: two stores on one database. A record written on A is
read on B; a no-op upsert costs no round trip, and stops being one once B changed the record (the
notification dropped A's cached copy); a listener reconnect empties the cache; migrations are concurrent-
safe and a newer schema is refused; a database that cannot answer is `ServiceUnavailable` (503 on the
proxied surface, in OpenAI's shape)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from orq_proxy.auth import AuthMiddleware, KeyRing, Principal, hash_key
from orq_proxy.errors import ServiceUnavailable
from orq_proxy.identities.middleware import IdentityMiddleware
from orq_proxy.identities.models import IdentityExistsError, IdentityFields, IdentityQuery, normalize_fields
from orq_proxy.identities.postgres import COMPONENT, STEPS, PostgresIdentityStore
from orq_proxy.identities.store import InMemoryIdentityStore
from orq_proxy.postgres import SchemaTooNew, migrate
from orq_proxy.proxy.request import RequestMiddleware
from orq_proxy.testing.clock import FakeClock
from tests.budgets.test_budget_postgres import OwnPostgres

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def f(**fields: Any) -> IdentityFields:
    return normalize_fields(fields)


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PostgresIdentityStore, PostgresIdentityStore]]:
    """Two stores on one database (as two proxy replicas have), their listeners connected."""
    clock = FakeClock(START)
    a, b = PostgresIdentityStore(pg_url, clock=clock), PostgresIdentityStore(pg_url, clock=clock)
    await asyncio.gather(a.open(), b.open())
    async with asyncio.timeout(5):
        await asyncio.gather(a.wait_listening(), b.wait_listening())
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


class Checkouts:
    """Counts the connections a store takes from its pool: every database round trip needs one."""

    def __init__(self, store: PostgresIdentityStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        pool = store._pool
        connection = pool.connection

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return connection(*args, **kwargs)

        monkeypatch.setattr(pool, "connection", counted)


async def within(seconds: float, check: Callable[[], bool | Awaitable[bool]]) -> None:
    """Wait until `check()` holds (asking every 5 ms); fails after `seconds`."""
    start = time.monotonic()
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        if time.monotonic() - start > seconds:
            pytest.fail(f"not within {seconds} s")
        await asyncio.sleep(0.005)


async def test_written_on_one_replica_read_on_the_other(
    replicas: tuple[PostgresIdentityStore, PostgresIdentityStore],
) -> None:
    """Every read on B sees A's writes at once (reads ask the database), including deletes."""
    a, b = replicas
    rec = await a.upsert("ws", "user_1", f(display_name="Ada", tags=["vip"], metadata={"plan": "pro"}))
    assert await b.get("ws", rec.id) == rec
    assert await b.get_by_external_id("ws", "user_1") == rec
    assert await b.resolve("ws", "user_1") == rec
    assert (await b.list("ws", IdentityQuery(tags=("vip",)))).data == [rec]
    assert await b.count("ws") == 1
    with pytest.raises(IdentityExistsError):
        await b.create("ws", "user_1", {})
    updated = await b.update("ws", rec.id, f(email="ada@example.com"))
    assert updated is not None and await a.get("ws", rec.id) == updated
    assert await a.delete("ws", rec.id) == updated
    assert await b.get_by_external_id("ws", "user_1") is None


async def test_noop_upsert_has_no_round_trip_until_another_replica_changes_it(
    replicas: tuple[PostgresIdentityStore, PostgresIdentityStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repeated payload is answered from A's cache with no round trip; once B changed the record, B's
    notification drops it, so A's same upsert is a real write again (and reaches B)."""
    a, b = replicas
    checkouts = Checkouts(a, monkeypatch)
    rec = await a.upsert("ws", "u", f(display_name="Ada", tags=["t"]))
    written = checkouts.count
    assert written > 0
    for _ in range(50):
        assert await a.upsert("ws", "u", f(display_name="Ada", tags=["t"])) == rec
        assert await a.upsert("ws", "u", f(display_name="Ada")) == rec
        assert await a.upsert("ws", "u", {}) == rec
    assert checkouts.count == written  # 150 upserts, no round trip

    renamed = await b.update("ws", rec.id, f(display_name="Grace"))
    assert renamed is not None
    await within(2.0, lambda: ("ws", "u") not in a._cache)  # the notification arrived
    again = await a.upsert("ws", "u", f(display_name="Ada", tags=["t"]))
    assert checkouts.count > written
    assert again.display_name == "Ada" and again.id == rec.id
    # And B's own cached copy (from its update) was dropped by A's write in turn.
    assert b._cache.get(("ws", "u")) in (renamed, None)
    await within(2.0, lambda: ("ws", "u") not in b._cache)
    assert await b.get_by_external_id("ws", "u") == again
    assert (await b.upsert("ws", "u", f(display_name="Ada"))) == again


async def test_while_the_listener_is_down_the_cache_is_not_trusted(
    pg_url: str,
    replicas: tuple[PostgresIdentityStore, PostgresIdentityStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A's listener connection killed (and kept from reconnecting): A's cache is emptied and bypassed, so
    B's write made while A could miss its notification is not hidden by a no-op upsert on A; once the
    listener is back, caching resumes."""
    a, b = replicas
    rec = await a.upsert("ws", "u", f(display_name="Ada"))
    assert ("ws", "u") in a._cache
    monkeypatch.setattr(a, "_url", "postgresql://postgres@127.0.0.1:1/x")  # only the listener reconnects
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (a.listener_name,),
        )
        assert await cur.fetchone() == (1,)
    await within(2.0, lambda: not a._listening)
    assert ("ws", "u") not in a._cache
    changed = await b.update("ws", rec.id, f(display_name="Grace"))
    assert changed is not None
    checkouts = Checkouts(a, monkeypatch)
    assert (await a.upsert("ws", "u", f(display_name="Ada"))).display_name == "Ada"  # a real write
    written = checkouts.count
    assert (await a.upsert("ws", "u", f(display_name="Ada"))).display_name == "Ada"
    assert checkouts.count == written + 1  # the cache is off: every upsert reads
    monkeypatch.setattr(a, "_url", pg_url)
    async with asyncio.timeout(5):
        await a.wait_listening()
    current = await a.upsert("ws", "u", f(display_name="Ada"))
    assert checkouts.count == written + 2
    assert await a.upsert("ws", "u", f(display_name="Ada")) == current
    assert checkouts.count == written + 2  # cached again


async def test_concurrent_writes_in_one_process_never_leave_an_older_record_cached(
    replicas: tuple[PostgresIdentityStore, PostgresIdentityStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two upserts of one identity in flight on the same store (which hears no notification of its own
    writes), the first writer held up after its commit until the second has written: the cache must not
    end up holding the first, older record."""
    a, _ = replicas
    rec = await a.upsert("ws", "k", f(display_name="start"))
    pool = a._pool
    connection = pool.connection
    checkouts: dict[str, int] = {}
    first_writing = asyncio.Event()

    @contextlib.asynccontextmanager
    async def held_up(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        task = asyncio.current_task()
        name = task.get_name() if task else ""
        checkouts[name] = checkouts.get(name, 0) + 1
        nth = checkouts[name]
        async with connection(*args, **kwargs) as conn:
            if name == "first" and nth == 2:
                first_writing.set()
            yield conn
        if name == "first" and nth == 2:  # its write transaction, committed: now let the other one run
            await asyncio.sleep(0.3)

    monkeypatch.setattr(pool, "connection", held_up)
    first = asyncio.create_task(a.upsert("ws", "k", f(display_name="first")), name="first")
    await first_writing.wait()  # (the second one then usually waits for the first one's row lock)
    second = asyncio.create_task(a.upsert("ws", "k", f(display_name="second")), name="second")
    await asyncio.gather(first, second)
    current = await a.get("ws", rec.id)
    assert current is not None
    cached = a._cache.get(("ws", "k"))
    assert cached is None or cached == current
    older = "first" if current.display_name == "second" else "second"
    assert (await a.upsert("ws", "k", f(display_name=older))).display_name == older  # really written
    assert (await a.get("ws", rec.id)) == a._cache.get(("ws", "k"))


async def test_two_replicas_upserting_a_new_identity_at_once_make_one_record(
    replicas: tuple[PostgresIdentityStore, PostgresIdentityStore],
) -> None:
    """Concurrent first upserts of one external id on both replicas: one record, both fields applied."""
    a, b = replicas
    for i in range(10):
        ext = f"new-{i}"
        one, two = await asyncio.gather(
            a.upsert("ws", ext, f(display_name="Ada")), b.upsert("ws", ext, f(email="ada@x"))
        )
        assert one.id == two.id
        final = await a.get_by_external_id("ws", ext)
        assert final is not None and (final.display_name, final.email) == ("Ada", "ada@x")
    assert await a.count("ws") == 10


async def test_text_with_nul_and_backslashes_round_trips(pg_url: str) -> None:
    """PostgreSQL text cannot hold NUL: fields that contain it (or backslashes) still come back exactly,
    and search and name order treat them as the in-memory store does."""
    store = PostgresIdentityStore(pg_url, clock=FakeClock(START))
    memory = InMemoryIdentityStore(clock=FakeClock(START))
    await store.open()
    try:
        for s in (store, memory):
            await s.create("ws", "a\x00b", f(display_name="x\\0y", email="e\\@x", tags=["t\x00", "\\"]))
            await s.create("ws", "a\\0b", f(display_name="x\x00y", metadata={"k": "\x00\\"}))
        got = await store.list("ws", IdentityQuery(sort_by="IDENTITY_SORT_FIELD_DISPLAY_NAME"))
        want = await memory.list("ws", IdentityQuery(sort_by="IDENTITY_SORT_FIELD_DISPLAY_NAME"))
        assert [(r.external_id, r.display_name, r.email, r.tags, r.metadata) for r in got.data] == [
            (r.external_id, r.display_name, r.email, r.tags, r.metadata) for r in want.data
        ]
        for needle in ("\\0", "a\\", "x\\0y", "e\\@"):
            found = await store.list("ws", IdentityQuery(search=needle))
            expected = await memory.list("ws", IdentityQuery(search=needle))
            assert [r.external_id for r in found.data] == [r.external_id for r in expected.data], needle
        assert [r.external_id for r in (await store.list("ws", IdentityQuery(tags=("t\x00",)))).data] == [
            "a\x00b"
        ]
        assert (await store.get_by_external_id("ws", "a\x00b")) is not None
        assert (await store.get_by_external_id("ws", "a\\0b")) is not None
        assert (await store.get_by_external_id("ws", "a\\\\0b")) is None
    finally:
        await store.aclose()


async def test_migrations_run_once_and_a_newer_schema_is_refused(pg_url: str) -> None:
    """Five replicas starting at once agree on one schema; a database a newer orq-proxy migrated is refused."""
    stores = [PostgresIdentityStore(pg_url) for _ in range(5)]
    await asyncio.gather(*(s.open() for s in stores))
    for store in stores:
        await store.aclose()
    found = await asyncio.gather(*(asyncio.to_thread(migrate, pg_url, COMPONENT, STEPS) for _ in range(3)))
    assert found == [len(STEPS)] * 3
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE orq_proxy_schema SET version = 99 WHERE component = %s", (COMPONENT,))
    newer = PostgresIdentityStore(pg_url)
    with pytest.raises(SchemaTooNew, match="version 99"):
        await newer.open()
    await newer.aclose()


async def test_unreachable_server_is_unavailable_quickly() -> None:
    """Nothing listening: open() raises ServiceUnavailable at once, naming the backend."""
    store = PostgresIdentityStore("postgresql://postgres@127.0.0.1:1/x")
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"identity records \(PostgreSQL\) is unavailable"):
        await store.open()
    assert time.monotonic() - start < 3.5
    await store.aclose()


async def test_database_gone_every_call_is_unavailable_within_seconds() -> None:
    """Server stopped under an open store: every call (the hot path's upsert too, once the listener is
    down) raises ServiceUnavailable within the pool timeout; all work again once the server is back."""
    server = OwnPostgres()
    server.start()
    store = PostgresIdentityStore(server.url, clock=FakeClock(START), pool_timeout=0.5)
    try:
        await store.open()
        rec = await store.upsert("ws", "u", f(display_name="Ada"))
        server.stop()
        await within(3.0, lambda: not store._listening)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.upsert("ws", "u", f(display_name="Ada")),  # no-op, but the cache is off
            lambda: store.upsert("ws", "v", {}),
            lambda: store.get("ws", rec.id),
            lambda: store.list("ws", IdentityQuery()),
            lambda: store.update("ws", rec.id, f(email="a@x")),
            lambda: store.delete("ws", rec.id),
            lambda: store.count("ws"),
        ]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(ServiceUnavailable, match=r"identity records \(PostgreSQL\)"):
                await call()
            assert time.monotonic() - start < 1.5  # the pool timeout, not the server, bounds it
        server.start()

        async def back() -> bool:
            with contextlib.suppress(ServiceUnavailable):
                return await store.get("ws", rec.id) == rec
            return False

        await within(10.0, back)
        assert (await store.upsert("ws", "u", f(email="a@x"))).email == "a@x"
    finally:
        await store.aclose()
        server.remove()


class _Down:
    """An identity store whose backend cannot answer."""

    async def upsert(self, *args: Any) -> Any:
        raise ServiceUnavailable("identity records (PostgreSQL)", OSError("connection refused"))

    async def get_by_external_id(self, *args: Any) -> Any:
        raise ServiceUnavailable("identity records (PostgreSQL)")


async def test_middleware_answers_503_in_openai_shape_when_the_store_cannot_answer() -> None:
    """The proxy fails closed: a body identity or header lookup the store cannot answer is a 503
    `identity_unavailable` with Retry-After, never forwarded and never a 500."""
    forwarded: list[object] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        forwarded.append(scope)

    keyring = KeyRing([(hash_key("sk-a"), Principal(workspace="ws", project="p", key_id="a"))])
    clock = FakeClock(START)
    app: Any = IdentityMiddleware(inner, store=_Down())  # type: ignore[arg-type]
    app = RequestMiddleware(AuthMiddleware(app, keyring=keyring), clock=clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
        for extra, headers in (
            ({"orq": {"identity": {"id": "u1"}}}, {}),
            ({}, {"x-orq-identity-id": "u1"}),
        ):
            resp = await client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [], **extra},
                headers={"authorization": "Bearer sk-a", **headers},
            )
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "1"
            error = resp.json()["error"]
            assert (error["code"], error["type"]) == ("identity_unavailable", "api_error")
    assert forwarded == []
