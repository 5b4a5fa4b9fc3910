"""`PostgresBudgetStore` as several replicas see it: two stores on one database (a write on A is enforced by
B's `matching()` within a second, with or without notifications), one `BudgetConflict` for a scoped budget
created on both at once, concurrent-safe migrations, a newer schema refused, and failing closed while the
database is gone (on a throwaway PostgreSQL cluster of the test's own; the machine's server on 5432 is never
stopped)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from orq_proxy.budgets.counters import InMemoryCounters
from orq_proxy.budgets.matching import RequestFacts
from orq_proxy.budgets.models import Budget, ScopeKind
from orq_proxy.budgets.postgres import COMPONENT, STEPS, PostgresBudgetStore
from orq_proxy.budgets.store import BudgetConflict, BudgetListQuery
from orq_proxy.errors import ServiceUnavailable
from orq_proxy.postgres import SchemaTooNew, migrate
from tests.budgets.conftest import T0, new_budget
from tests.budgets.test_budget_middleware import START, Recorder, gate, make_scope, ok_app, receive

_BIN = Path("/usr/lib/postgresql/15/bin")
FACTS = RequestFacts(workspace="default", identity="u1")


class OwnPostgres:
    """A throwaway PostgreSQL cluster (trust auth) in a temp dir on a free port, which a test may stop and
    start again. Run as the `postgres` OS user when the tests run as root (initdb refuses root)."""

    def __init__(self) -> None:
        if not (_BIN / "initdb").exists():
            pytest.fail(f"PostgreSQL server binaries not found in {_BIN}: fault tests need them")
        self.dir = Path(tempfile.mkdtemp(prefix="orq-own-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(_BIN / tool), *args], check=True, capture_output=True, timeout=60)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        """An abrupt stop (every connection dropped at once), as when the server host goes away."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        with_server = (self.data / "postmaster.pid").exists()
        if with_server:
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PostgresBudgetStore, PostgresBudgetStore]]:
    """Two stores on one database, as two proxy replicas have."""
    a, b = PostgresBudgetStore(pg_url), PostgresBudgetStore(pg_url)
    await asyncio.gather(a.open(), b.open())
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Wait until `check()` holds (asking every 10 ms); how long it took. Fails after `seconds`."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > seconds:
            pytest.fail(f"not within {seconds} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def matches(store: PostgresBudgetStore, expected: list[Budget]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await store.matching(FACTS, T0) == expected

    return check


async def _create_update_delete_seen(a: PostgresBudgetStore, b: PostgresBudgetStore) -> None:
    budget = await a.create(new_budget(kind=ScopeKind.IDENTITY, target="u1", amount_nanos=5))
    assert await a.matching(FACTS, T0) == [budget]  # the writer's own copy at once
    await within(1.0, matches(b, [budget]))
    changed = await a.replace(replace(budget, amount_nanos=9, updated_at=T0 + timedelta(minutes=1)))
    await within(1.0, matches(b, [changed]))
    paused = await a.replace(replace(changed, is_active=False))
    await within(1.0, matches(b, []))
    await a.replace(replace(paused, is_active=True, counting_since=T0))  # a reset
    await within(1.0, matches(b, [replace(paused, is_active=True, counting_since=T0)]))
    await a.delete("default", budget.budget_id)
    await within(1.0, matches(b, []))
    assert await b.get("default", budget.budget_id) is None


async def test_a_write_on_one_replica_is_enforced_on_the_other(
    replicas: tuple[PostgresBudgetStore, PostgresBudgetStore],
) -> None:
    """Created, updated, paused, reset and deleted on A: B's matching() follows within 1 s, and B's
    admin reads see each write at once (they ask the database)."""
    a, b = replicas
    budget = await a.create(new_budget(kind=ScopeKind.PROJECT, target="p"))
    assert await b.get("default", budget.budget_id) == budget
    assert await b.find_scoped("default", ScopeKind.PROJECT, "p") == budget
    assert (await b.page("default", BudgetListQuery())).items == [budget]
    await _create_update_delete_seen(a, b)
    await _create_update_delete_seen(b, a)


async def test_expiry_needs_no_message(replicas: tuple[PostgresBudgetStore, PostgresBudgetStore]) -> None:
    """A budget that expires stops matching on every replica by time alone."""
    a, b = replicas
    budget = await a.create(
        new_budget(kind=ScopeKind.IDENTITY, target="u1", expires_at=T0 + timedelta(hours=1))
    )
    await within(1.0, matches(b, [budget]))
    assert await b.matching(FACTS, T0 + timedelta(hours=2)) == []


async def _terminate(url: str, application_name: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _terminate_listener(url: str, application_name: str) -> None:
    """Terminate the store's LISTEN connection once it is up (it connects in the background, after `open()`
    and again after each loss), failing if it is not there within 5 s."""
    deadline = time.monotonic() + 5.0
    while await _terminate(url, application_name) != 1:
        assert time.monotonic() < deadline, f"no connection named {application_name!r} within 5 s"
        await asyncio.sleep(0.02)


async def test_listener_killed_the_reconnect_catches_up(
    pg_url: str, replicas: tuple[PostgresBudgetStore, PostgresBudgetStore]
) -> None:
    """B's LISTEN connection terminated by the server: writes on A still reach B's matching() within 1 s
    (the poll, then the reconnected listener)."""
    a, b = replicas
    await _terminate_listener(pg_url, b.listener_name)
    budget = await a.create(new_budget(kind=ScopeKind.IDENTITY, target="u1"))
    await within(1.0, matches(b, [budget]))
    await _terminate_listener(pg_url, b.listener_name)
    await a.delete("default", budget.budget_id)
    await within(1.0, matches(b, []))


async def test_without_notifications_the_poll_catches_up(
    replicas: tuple[PostgresBudgetStore, PostgresBudgetStore],
) -> None:
    """With B's listener gone for good, the change-counter poll alone brings every write within 1 s."""
    a, b = replicas
    listener = b._tasks[1]
    listener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await listener
    await _create_update_delete_seen(a, b)
    assert await b.matching(FACTS, T0) == []  # still confirmed current: the polls succeed


async def test_the_same_scoped_budget_created_on_both_at_once(
    replicas: tuple[PostgresBudgetStore, PostgresBudgetStore],
) -> None:
    """Two replicas creating a budget for one scope target at the same moment: one wins, the other gets a
    BudgetConflict naming the winner (the database's unique index decides)."""
    a, b = replicas
    for i in range(10):
        target = f"user-{i}"
        results = await asyncio.gather(
            a.create(new_budget(kind=ScopeKind.IDENTITY, target=target)),
            b.create(new_budget(kind=ScopeKind.IDENTITY, target=target)),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, Budget)]
        lost = [r for r in results if isinstance(r, BudgetConflict)]
        assert len(won) == 1 and len(lost) == 1, results
        assert lost[0].existing == won[0]
        assert await a.find_scoped("default", ScopeKind.IDENTITY, target) == won[0]
    custom = [new_budget(kind=None, cel='identity == "u1"') for _ in range(2)]
    created = await asyncio.gather(a.create(custom[0]), b.create(custom[1]))
    assert list(created) == custom  # CEL budgets never conflict
    with pytest.raises(ValueError, match="exists"):
        await b.create(custom[0])


async def test_migrations_run_once_and_a_newer_schema_is_refused(pg_url: str) -> None:
    """Five replicas starting at once agree on one schema; a database a newer orq-proxy migrated is refused."""
    stores = [PostgresBudgetStore(pg_url) for _ in range(5)]
    await asyncio.gather(*(s.open() for s in stores))
    for store in stores:
        await store.aclose()
    assert (
        await asyncio.gather(*(asyncio.to_thread(migrate, pg_url, COMPONENT, STEPS) for _ in range(3)))
        == [len(STEPS)] * 3
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE orq_proxy_schema SET version = 99 WHERE component = %s", (COMPONENT,))
    newer = PostgresBudgetStore(pg_url)
    with pytest.raises(SchemaTooNew, match="version 99"):
        await newer.open()
    await newer.aclose()


async def test_unreachable_server_is_unavailable_quickly() -> None:
    """Nothing listening: open() raises ServiceUnavailable at once; matching() before open() fails closed."""
    store = PostgresBudgetStore("postgresql://postgres@127.0.0.1:1/x")
    with pytest.raises(ServiceUnavailable, match=r"budget records \(PostgreSQL\)"):
        await store.matching(FACTS, T0)
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"budget records \(PostgreSQL\) is unavailable"):
        await store.open()
    assert time.monotonic() - start < 3.5
    await store.aclose()


async def test_fails_closed_past_the_staleness_bound_and_recovers(own_postgres: OwnPostgres) -> None:
    """Database gone: matching() keeps answering from the copy up to the staleness bound, then raises
    ServiceUnavailable (the gate answers 503 `budget_unavailable`, or forwards with fail_open); writes
    raise it within the pool timeout; once the server is back, both recover by themselves (no restart),
    and a write made elsewhere afterwards is enforced."""
    store = PostgresBudgetStore(own_postgres.url, poll_interval=0.1, stale_after=1.0, pool_timeout=0.5)
    other = PostgresBudgetStore(own_postgres.url)
    await store.open()
    await other.open()
    try:
        budget = await store.create(new_budget(kind=ScopeKind.IDENTITY, target="u1"))
        stopped = time.monotonic()
        own_postgres.stop()
        assert await store.matching(FACTS, T0) == [budget]  # within the bound: the copy is still good
        with pytest.raises(ServiceUnavailable, match=r"budget records \(PostgreSQL\)"):
            await store.create(new_budget(kind=ScopeKind.PROJECT, target="p"))
        assert time.monotonic() - stopped < 1.5

        async def refused() -> bool:
            try:
                await store.matching(FACTS, T0)
            except ServiceUnavailable:
                return True
            return False

        waited = await within(3.0, refused)
        # (the bound counts from the last confirmation: the start of a poll, about a poll before the stop)
        assert time.monotonic() - stopped >= 1.0 - 0.3 and waited < 3.0

        # The gate: 503 `budget_unavailable` (fail closed), or forwarded with fail_open.
        counters = InMemoryCounters()
        send = Recorder()
        await gate(ok_app, store, counters)(make_scope(), receive, send)
        assert (send.status, send.json["error"]["code"]) == (503, "budget_unavailable")
        send = Recorder()
        await gate(ok_app, store, counters, fail_open=True)(make_scope(), receive, send)
        assert send.status == 200

        own_postgres.start()

        async def recovered() -> bool:
            try:
                return await store.matching(FACTS, T0) == [budget]
            except ServiceUnavailable:
                return False

        await within(10.0, recovered)
        send = Recorder()
        await gate(ok_app, store, counters)(make_scope(), receive, send)
        assert send.status == 200 and (await counters.usage(budget, START)).amount_nanos > 0
        await within(10.0, lambda: _writes(other))
        await within(2.0, matches(store, []))  # `other` deleted it; the store saw that by itself
    finally:
        await store.aclose()
        await other.aclose()


async def _writes(store: PostgresBudgetStore) -> bool:
    """Delete every budget through `store`; False while the database cannot answer yet."""
    try:
        for budget in await store.all_budgets():
            await store.delete(budget.workspace, budget.budget_id)
    except ServiceUnavailable:
        return False
    return True
