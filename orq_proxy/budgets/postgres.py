"""`PostgresBudgetStore`: budget records shared by every replica (`[storage] state = "postgresql://..."`).

Records live in the `budgets` table (the SQLite store's JSON record, plus the workspace and the scope key
the database keeps unique, so two replicas creating the same scoped budget at once get one
`BudgetConflict`). Admin reads (`get`, `find_scoped`, `page`, `all_budgets`) ask the database, so the
management API is current across replicas. `matching()`, on every proxied request, is answered from an
in-process copy (an `InMemoryBudgetStore`, as `SqliteBudgetStore` keeps), kept current like this:

- every write bumps the change counter row (`budget_changes.version`) and NOTIFYs `orq_budgets` in its
  own transaction, and applies the change to this process's copy at once;
- each store LISTENs on a dedicated connection and, on a notification, reloads;
- as the fallback for missed notifications (listener down, reconnecting), a poller reads the counter
  every `poll_interval` (0.5 s) and reloads when it moved. A reload reads every record in one snapshot and
  applies only the differences to the copy (compiled CEL programs are kept).
So a budget created, changed, reset or deleted on any replica is enforced here within about a poll
interval even without notifications; expiry needs no message (matching compares `expires_at` with now).

Staleness bound, fail closed: the copy counts as current while a poll or the listener's heartbeat saw the
counter at the copy's version. If that has not happened for `stale_after` seconds (listener down and
polls failing), `matching()` raises `ServiceUnavailable`, so the gate answers 503 `budget_unavailable`
(or forwards with `fail_open`); the next successful poll ends it, with no restart. Writes raise
`ServiceUnavailable` when the database cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import psycopg
import psycopg_pool

from orq_proxy.budgets.matching import RequestFacts
from orq_proxy.budgets.models import Budget, ScopeKind
from orq_proxy.budgets.store import (
    BudgetConflict,
    BudgetListQuery,
    BudgetPage,
    InMemoryBudgetStore,
    _from_json,
    _to_json,
)
from orq_proxy.errors import ServiceUnavailable
from orq_proxy.ids import new_request_id
from orq_proxy.logs import RepeatedFailure
from orq_proxy.postgres import connect_kwargs, migrate

__all__ = [
    "CHANNEL",
    "COMPONENT",
    "POLL_INTERVAL",
    "POOL_TIMEOUT",
    "STALE_AFTER",
    "STEPS",
    "PostgresBudgetStore",
]

logger = logging.getLogger(__name__)

POOL_TIMEOUT: Final = 3.0  # seconds a call waits for a pooled connection before "unavailable"
COMPONENT: Final = "state.budgets"
CHANNEL: Final = "orq_budgets"
POLL_INTERVAL: Final = 0.5  # seconds between reads of the change counter
STALE_AFTER: Final = 3.0  # seconds without confirming the copy current before matching() fails closed

# The schema, one migration step per entry (see `orq_proxy.postgres.migrate`). Never edit a step that has
# shipped: append a new one. `scope_key` is the JSON `[kind, target]` of a scoped budget (NULL for a CEL
# budget): text that can hold any target, NUL included, and that one unique index covers.
STEPS: Final[Sequence[str]] = (
    """
    CREATE TABLE budgets (
        budget_id text COLLATE "C" PRIMARY KEY,
        workspace text COLLATE "C" NOT NULL,
        scope_key text COLLATE "C",
        record    text NOT NULL
    );
    CREATE UNIQUE INDEX budgets_one_per_scope ON budgets (workspace, scope_key) WHERE scope_key IS NOT NULL;
    CREATE INDEX budgets_by_workspace ON budgets (workspace);
    CREATE TABLE budget_changes (
        id      integer PRIMARY KEY CHECK (id = 1),
        version bigint NOT NULL
    );
    INSERT INTO budget_changes (id, version) VALUES (1, 0);
    """,
)

_SERVICE: Final = "budget records (PostgreSQL)"
_OPERATION_TIMEOUT: Final = 6.0  # client-side bound on one call (the server's statement_timeout is 5 s)
_HEARTBEAT: Final = 1.0  # seconds without a notification after which the listener reads the counter
_RECONNECT_GIVE_UP: Final = 5.0  # seconds a pool keeps retrying one lost connection
_RECONNECT_MAX: Final = 2.0
_STOP_TIMEOUT: Final = 5.0  # seconds aclose() waits for the background tasks  # seconds between listener reconnect attempts, at most

# One statement: bump the counter, notify (delivered at commit), return the new version.
_BUMP: Final = (
    "WITH bumped AS (UPDATE budget_changes SET version = version + 1 WHERE id = 1 RETURNING version) "
    "SELECT version, pg_notify(%s, json_build_object('v', version, 'o', %s::text)::text) FROM bumped"
)


def _scope_key(kind: ScopeKind | None, target: str) -> str | None:
    return None if kind is None else json.dumps([kind.value, target])


class _Listing(InMemoryBudgetStore):
    """The records of one database read, to page them with the in-memory store's filters, order and
    cursors (one rule, one place). Builds no matching index: it is thrown away after the page."""

    def __init__(self, budgets: Iterable[Budget]) -> None:  # (no super().__init__: no index wanted)
        self._by_id = {b.budget_id: b for b in budgets}
        self._workspace_ids = {}
        for budget in self._by_id.values():
            self._workspace_ids.setdefault(budget.workspace, {})[budget.budget_id] = None


class PostgresBudgetStore:
    """A `BudgetStore` in PostgreSQL, shared by every replica that names the same database.

    Construction touches no network. Call `await store.open()` before use (the app's lifespan does, for
    every store that has an `open`): it migrates the schema (component `state.budgets`), opens the pool,
    loads the copy `matching()` answers from and starts the listener and the poller. `aclose()` stops them.

    Args:
        url: `postgresql://user@host:port/db` (or `postgres://`).
        poll_interval: seconds between reads of the change counter (the fallback for missed notifications).
        stale_after: seconds the copy may go unconfirmed before `matching()` fails closed.
        pool_size: the most connections the pool opens.
        pool_timeout: seconds a call waits for a connection before raising `ServiceUnavailable` (while
            the server is down, every call waits this long).
    """

    def __init__(
        self,
        url: str,
        *,
        poll_interval: float = POLL_INTERVAL,
        stale_after: float = STALE_AFTER,
        pool_size: int = 5,
        pool_timeout: float = POOL_TIMEOUT,
    ) -> None:
        if poll_interval <= 0 or stale_after <= poll_interval:
            raise ValueError("need 0 < poll_interval < stale_after")
        if pool_timeout <= 0:
            raise ValueError("pool_timeout must be > 0")
        self._url = url
        self._operation_timeout = max(_OPERATION_TIMEOUT, pool_timeout + 1.0)
        self._poll_interval = poll_interval
        self._stale_after = stale_after
        self._pool = psycopg_pool.AsyncConnectionPool(
            url,
            kwargs=connect_kwargs(application_name="orq-proxy budgets"),
            min_size=1,
            max_size=pool_size,
            timeout=pool_timeout,
            open=False,
            # After this long without connecting, the pool stops retrying in the background and the next
            # call starts afresh: a server that comes back is used at once, not after a long backoff.
            reconnect_timeout=_RECONNECT_GIVE_UP,
            name="orq-budgets",
        )
        self._copy = InMemoryBudgetStore()
        self._version = -1  # the counter value the copy reflects
        self._local_writes = 0  # this store's writes applied to the copy (see `_reload`)
        self._confirmed = -math.inf  # loop time at which the copy was last known current
        self._reload_lock = asyncio.Lock()
        self._wake = asyncio.Event()  # a notification (or a gap) asks the poller to look now
        self._tasks: list[asyncio.Task[None]] = []
        self._origin = new_request_id()  # tells this store's own notifications apart
        self.listener_name = f"orq-proxy budgets listener {self._origin[-10:]}"
        """The `application_name` of the LISTEN connection (one per store: `pg_stat_activity` tells them apart)."""
        self._poll_failures = RepeatedFailure(
            logger, "budget records: cannot refresh from PostgreSQL", expected=(ServiceUnavailable,)
        )
        self._state = "new"

    # ---- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate, open the pool, load the copy, start the listener and the poller.

        Raises:
            ServiceUnavailable: the database cannot be reached.
            SchemaTooNew: the database was migrated by a newer orq-proxy.
        """
        if self._state != "new":
            raise RuntimeError(f"the budget store is {self._state}")
        try:
            await asyncio.to_thread(migrate, self._url, COMPONENT, STEPS)
            await self._pool.open(wait=True, timeout=POOL_TIMEOUT)
        except psycopg.OperationalError as exc:  # (a PoolTimeout is one)
            await self._pool.close()
            raise ServiceUnavailable(_SERVICE, exc) from exc
        self._state = "open"
        try:
            await self._reload()
        except BaseException:
            await self.aclose()
            raise
        self._tasks = [
            asyncio.create_task(self._poll_forever(), name="orq-budgets-poller"),
            asyncio.create_task(self._listen_forever(), name="orq-budgets-listener"),
        ]

    async def aclose(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=_STOP_TIMEOUT)
            if pending:
                logger.warning("budget store: %d background tasks did not stop", len(pending))
        await self._pool.close()

    @property
    def version(self) -> int:
        """The change counter value the in-process copy reflects (tests, diagnostics)."""
        return self._version

    # ---- keeping the copy current -----------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _observed(self, version: int, started: float) -> None:
        """The counter was `version` at some point after `started`: confirm the copy or ask for a reload."""
        if version == self._version:
            self._confirmed = max(self._confirmed, started)
        else:
            self._wake.set()

    async def _refresh(self) -> None:
        """One poll: read the counter; reload when it moved."""
        started = self._now()
        async with self._connection() as conn:
            cur = await conn.execute("SELECT version FROM budget_changes WHERE id = 1")
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version == self._version:
            self._confirmed = max(self._confirmed, started)
            return
        await self._reload()

    async def _reload(self) -> None:
        """Read every record in one snapshot and bring the copy to it (only the differences)."""
        async with self._reload_lock:
            started = self._now()
            local_writes = self._local_writes
            async with self._connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur = await conn.execute("SELECT version FROM budget_changes WHERE id = 1")
                row = await cur.fetchone()
                cur = await conn.execute("SELECT record FROM budgets")
                records = await cur.fetchall()
            version = int(row[0]) if row else 0
            if version < self._version and local_writes != self._local_writes:
                return  # this store wrote during the read: the snapshot may predate that write
            await self._install([_from_json(r[0]) for r in records])
            self._version = version
            if local_writes != self._local_writes:
                self._wake.set()  # a write of this store may be newer than the snapshot: look again
            else:
                self._confirmed = max(self._confirmed, started)

    async def _install(self, budgets: list[Budget]) -> None:
        """Make the copy hold exactly `budgets`. Never suspends (the copy's methods do not), so no
        request sees it half changed."""
        copy = self._copy
        current = {b.budget_id: b for b in await copy.all_budgets()}
        wanted = {b.budget_id: b for b in budgets}
        for budget_id, budget in current.items():
            if wanted.get(budget_id) != budget:
                await copy.delete(budget.workspace, budget_id)
        for budget_id, budget in wanted.items():
            if current.get(budget_id) != budget:
                await copy.create(budget)

    async def _apply_local(self, version: int, budget_id: str, workspace: str, budget: Budget | None) -> None:
        """This store's own committed write, into the copy now (read-your-writes for `matching`)."""
        self._local_writes += 1
        copy = self._copy
        if await copy.get(workspace, budget_id) is not None:
            await copy.delete(workspace, budget_id)
        if budget is not None:
            try:
                await copy.create(budget)
            except (BudgetConflict, ValueError):
                self._version = -1  # the copy is behind another replica's write: reload it whole
        if version == self._version + 1:
            self._version = version
        else:
            self._wake.set()  # other writes came between: the poller reloads

    async def _poll_forever(self) -> None:
        while self._state == "open":
            # (`asyncio.timeout`, not `wait_for`: on 3.11 `wait_for` can swallow the cancellation from
            # `aclose` when the event is set at the same moment, and the task would never end)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._refresh()
            except ServiceUnavailable as exc:
                self._poll_failures.failed(exc)
            except Exception as exc:  # a bad record must not end the poller: log, keep failing closed
                self._poll_failures.failed(exc)
            else:
                if self._poll_failures.failing:
                    self._poll_failures.succeeded()

    async def _listen_forever(self) -> None:
        delay = 0.05
        while self._state == "open":
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, **connect_kwargs(application_name=self.listener_name)
                )
            except psycopg.Error as exc:
                logger.debug("budget listener: cannot connect (%s); the poller covers meanwhile", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._wake.set()  # notifications may have been missed while it was down
                    delay = 0.05
                    while True:
                        async for note in conn.notifies(timeout=_HEARTBEAT):
                            if _origin_of(note.payload) != self._origin:
                                self._wake.set()
                        started = self._now()
                        async with asyncio.timeout(POOL_TIMEOUT):  # a silently dead link fails here
                            cur = await conn.execute("SELECT version FROM budget_changes WHERE id = 1")
                            row = await cur.fetchone()
                        self._observed(int(row[0]) if row else 0, started)
            except (psycopg.Error, TimeoutError) as exc:
                logger.warning("budget listener lost its connection (%s); reconnecting", exc)
            except Exception:  # a bug must not end the listener for good
                logger.exception("budget listener failed; reconnecting")
                await asyncio.sleep(_RECONNECT_MAX)

    # ---- database access --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; "cannot answer" errors become `ServiceUnavailable`, within a bound."""
        if self._state != "open":
            raise RuntimeError(f"the budget store is {self._state} (call open() first)")
        try:
            async with asyncio.timeout(self._operation_timeout), self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise ServiceUnavailable(_SERVICE, exc) from exc

    async def _bump(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(_BUMP, (CHANNEL, self._origin))
        row = await cur.fetchone()
        assert row is not None  # the counter row is created with the table
        return int(row[0])

    async def _select(self, where: str, args: tuple[Any, ...]) -> list[Budget]:
        async with self._connection() as conn:
            cur = await conn.execute(f"SELECT record FROM budgets WHERE {where}", args)
            rows = await cur.fetchall()
        return [_from_json(row[0]) for row in rows]

    # ---- the protocol -----------------------------------------------------------------------------

    async def create(self, budget: Budget) -> Budget:
        scope_key = _scope_key(budget.scope_kind, budget.scope_target)
        while True:
            async with self._connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "INSERT INTO budgets (budget_id, workspace, scope_key, record) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING RETURNING budget_id",
                    (budget.budget_id, budget.workspace, scope_key, _to_json(budget)),
                )
                inserted = await cur.fetchone() is not None
                version = await self._bump(conn) if inserted else 0
            if inserted:
                await self._apply_local(version, budget.budget_id, budget.workspace, budget)
                return budget
            # Why not: the id is taken, or (the database says so even across replicas) the scope.
            if await self._select("budget_id = %s", (budget.budget_id,)):
                raise ValueError(f"budget id {budget.budget_id} exists")
            if budget.scope_kind is not None:
                existing = await self.find_scoped(budget.workspace, budget.scope_kind, budget.scope_target)
                if existing is not None:
                    raise BudgetConflict(existing)
            # (the conflicting budget was deleted in the meantime: try again)

    async def get(self, workspace: str, budget_id: str) -> Budget | None:
        found = await self._select("budget_id = %s AND workspace = %s", (budget_id, workspace))
        return found[0] if found else None

    async def replace(self, budget: Budget) -> Budget:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT record FROM budgets WHERE budget_id = %s AND workspace = %s FOR UPDATE",
                (budget.budget_id, budget.workspace),
            )
            row = await cur.fetchone()
            if row is None:
                raise KeyError(budget.budget_id)
            current = _from_json(row[0])
            if (current.scope_kind, current.scope_target) != (budget.scope_kind, budget.scope_target):
                raise ValueError("a budget's scope is immutable")
            await conn.execute(
                "UPDATE budgets SET record = %s WHERE budget_id = %s", (_to_json(budget), budget.budget_id)
            )
            version = await self._bump(conn)
        await self._apply_local(version, budget.budget_id, budget.workspace, budget)
        return budget

    async def delete(self, workspace: str, budget_id: str) -> Budget | None:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "DELETE FROM budgets WHERE budget_id = %s AND workspace = %s RETURNING record",
                (budget_id, workspace),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            version = await self._bump(conn)
        await self._apply_local(version, budget_id, workspace, None)
        return _from_json(row[0])

    async def find_scoped(self, workspace: str, kind: ScopeKind, target: str) -> Budget | None:
        found = await self._select("workspace = %s AND scope_key = %s", (workspace, _scope_key(kind, target)))
        return found[0] if found else None

    async def page(self, workspace: str, query: BudgetListQuery) -> BudgetPage:
        budgets = await self._select("workspace = %s", (workspace,))
        return await _Listing(budgets).page(workspace, query)

    async def matching(self, facts: RequestFacts, now: datetime) -> list[Budget]:
        """From the in-process copy; `ServiceUnavailable` once it is older than the staleness bound."""
        age = self._now() - self._confirmed
        if age > self._stale_after:
            raise ServiceUnavailable(
                _SERVICE, TimeoutError(f"budgets last confirmed current {age:.1f} s ago")
            )
        return await self._copy.matching(facts, now)

    async def all_budgets(self) -> list[Budget]:
        async with self._connection() as conn:
            cur = await conn.execute("SELECT record FROM budgets")
            rows = await cur.fetchall()
        return [_from_json(row[0]) for row in rows]


def _origin_of(payload: str) -> str | None:
    try:
        origin = json.loads(payload).get("o")
    except (ValueError, AttributeError):
        return None
    return origin if isinstance(origin, str) else None
