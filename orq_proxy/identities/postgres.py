"""`PostgresIdentityStore`: identity records shared by every replica (`[storage] state = "postgresql://..."`).

Semantics are the SQLite store's (`identities/sqlite.py`): the same cursor pages, search, tag filter, sort
orders, timestamps and errors. Reads (`get`, `get_by_external_id`, `resolve`, `list`, `count`) always ask
the database, so the management API is current across replicas.

The hot path. The proxy upserts the body identity of every request, and most of those upserts repeat what
the record already says. This process keeps a bounded LRU cache of the records it wrote or read, by
`(workspace, external_id)`; an upsert whose payload changes nothing in the cached record returns it without
a database round trip. The cache stays current across replicas through LISTEN/NOTIFY: every write
notifies `orq_identities` (workspace, `_id`, external id) in its transaction, and each store listens on a
dedicated connection and drops the entries named. A read that was in flight while a notification for its
key arrived is not cached (it may predate the change). When the listener is down the cache is bypassed,
and when it reconnects the cache is cleared, since notifications may have been missed meanwhile. So a
cached record is at most one notification delivery (milliseconds) behind a commit on another replica; an
upsert that changes something is always written, in a transaction that re-reads the row under lock.

Text. PostgreSQL text cannot hold NUL, which identity fields may contain: free-text columns keep a
reversible escape (`\\` doubled, NUL as `\\0`), and the sort and search keys are UTF-8 `bytea`, whose
byte order is Python's code-point order and whose substring test is Python's `in`.

Failure policy: identity fails closed. A database that cannot answer (refused or lost connection, pool
timeout, statement timeout; each bounded to a few seconds) raises `ServiceUnavailable`: the management API
answers 503 and the proxy refuses the request with 503. Other database errors propagate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import psycopg
import psycopg_pool
from cachetools import LRUCache

from orq_proxy.clock import Clock, SystemClock
from orq_proxy.errors import ServiceUnavailable
from orq_proxy.identities.models import (
    SORT_UPDATED,
    Identity,
    IdentityExistsError,
    IdentityFields,
    IdentityPage,
    IdentityQuery,
    InvalidCursorError,
    apply_fields,
    make_search_text,
    name_sort_key,
    new_identity,
    search_needle,
)
from orq_proxy.ids import MonotonicIds, new_request_id
from orq_proxy.logs import RepeatedFailure
from orq_proxy.postgres import connect_kwargs, migrate
from orq_proxy.timefmt import rfc3339_millis

__all__ = ["CACHE_SIZE", "CHANNEL", "COMPONENT", "POOL_TIMEOUT", "STEPS", "PostgresIdentityStore"]

logger = logging.getLogger(__name__)

POOL_TIMEOUT: Final = 3.0  # seconds a call waits for a pooled connection before "unavailable"
COMPONENT: Final = "state.identities"
CHANNEL: Final = "orq_identities"
CACHE_SIZE: Final = 100_000  # records kept for no-op upserts (a few hundred bytes each)

# The schema, one migration step per entry (see `orq_proxy.postgres.migrate`). Never edit a step that has
# shipped: append a new one.
STEPS: Final[Sequence[str]] = (
    """
    CREATE TABLE identities (
        id           text COLLATE "C" PRIMARY KEY,
        workspace_id text COLLATE "C" NOT NULL,
        external_id  text COLLATE "C" NOT NULL,
        display_name text,
        email        text,
        avatar_url   text,
        tags         text NOT NULL DEFAULT '[]',
        metadata     text,
        created      text COLLATE "C" NOT NULL,
        updated      text COLLATE "C" NOT NULL,
        name_key     bytea NOT NULL,
        search       bytea NOT NULL,
        UNIQUE (workspace_id, external_id)
    );
    CREATE INDEX identities_by_id ON identities (workspace_id, id);
    CREATE INDEX identities_by_updated ON identities (workspace_id, updated, id);
    CREATE INDEX identities_by_name ON identities (workspace_id, name_key, id);
    CREATE TABLE identity_tags (
        workspace_id text COLLATE "C" NOT NULL,
        tag          text COLLATE "C" NOT NULL,
        identity_id  text COLLATE "C" NOT NULL,
        PRIMARY KEY (workspace_id, tag, identity_id)
    );
    CREATE INDEX identity_tags_by_identity ON identity_tags (identity_id);
    """,
)

_OPERATION_TIMEOUT: Final = 6.0  # client-side bound on one store call (the server's statement_timeout is 5 s)
_HEARTBEAT: Final = 5.0  # seconds without a notification after which the listener checks its connection
_RECONNECT_GIVE_UP: Final = 5.0  # seconds a pool keeps retrying one lost connection
_RECONNECT_MAX: Final = 2.0
_STOP_TIMEOUT: Final = (
    5.0  # seconds aclose() waits for the listener  # seconds between listener reconnect attempts, at most
)
_TAG_COUNT_CAP: Final = 1_000

_COLUMN_NAMES: Final = (
    "id",
    "workspace_id",
    "external_id",
    "created",
    "updated",
    "display_name",
    "email",
    "avatar_url",
    "tags",
    "metadata",
)
_COLUMNS: Final = ", ".join(_COLUMN_NAMES)
_QUALIFIED: Final = ", ".join(f"identities.{name}" for name in _COLUMN_NAMES)
_UNESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)

_Key = tuple[str, str]


def _esc(value: str) -> str:
    """Free text as stored: reversible, and free of NUL (which PostgreSQL text cannot hold)."""
    if "\\" in value or "\x00" in value:
        return value.replace("\\", "\\\\").replace("\x00", "\\0")
    return value


def _unesc(value: str) -> str:
    if "\\" not in value:
        return value
    return _UNESCAPE.sub(lambda m: "\x00" if m.group(1) == "0" else m.group(1), value)


def _opt_esc(value: str | None) -> str | None:
    return None if value is None else _esc(value)


def _opt_unesc(value: str | None) -> str | None:
    return None if value is None else _unesc(value)


def _row_to_identity(row: Sequence[Any]) -> Identity:
    external_id = _unesc(row[2])
    display_name, email = _opt_unesc(row[5]), _opt_unesc(row[6])
    tags = tuple(sys.intern(t) for t in json.loads(row[8])) if row[8] != "[]" else ()
    return Identity(
        id=row[0],
        workspace_id=row[1],
        external_id=external_id,
        created=row[3],
        updated=row[4],
        display_name=display_name,
        email=email,
        avatar_url=_opt_unesc(row[7]),
        tags=tags,
        metadata=json.loads(row[9]) if row[9] is not None else None,
        search_text=make_search_text(external_id, display_name, email),
    )


def _row_values(record: Identity) -> tuple[Any, ...]:
    """The row of `record`: the columns of `_COLUMN_NAMES`, then `name_key` and `search`."""
    return (
        record.id,
        record.workspace_id,
        _esc(record.external_id),
        record.created,
        record.updated,
        _opt_esc(record.display_name),
        _opt_esc(record.email),
        _opt_esc(record.avatar_url),
        # (`ensure_ascii`: a lone surrogate in metadata is kept as its JSON escape, not a UTF-8 error)
        json.dumps(list(record.tags)),
        json.dumps(dict(record.metadata)) if record.metadata else None,
        name_sort_key(record.display_name).encode("utf-8"),
        record.search_text.encode("utf-8"),
    )


class PostgresIdentityStore:
    """An `IdentityStore` in PostgreSQL, shared by every replica that names the same database.

    Construction touches no network. Call `await store.open()` before use (the app's lifespan does, for
    every store that has an `open`): it migrates the schema (component `state.identities`), opens the pool
    and starts the listener that keeps the upsert cache current. `aclose()` stops both.

    Args:
        url: `postgresql://user@host:port/db` (or `postgres://`).
        clock: the time source for `created`/`updated` and the ULIDs.
        cache_size: how many records the no-op upsert cache keeps (least recently used go first).
        pool_size: the most connections the pool opens.
        pool_timeout: seconds a call waits for a connection before raising `ServiceUnavailable` (while
            the server is down, every call waits this long).
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        cache_size: int = CACHE_SIZE,
        pool_size: int = 10,
        pool_timeout: float = POOL_TIMEOUT,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if pool_timeout <= 0:
            raise ValueError("pool_timeout must be > 0")
        self._url = url
        self._operation_timeout = max(_OPERATION_TIMEOUT, pool_timeout + 1.0)
        self._clock: Clock = clock or SystemClock()
        self._ids = MonotonicIds(self._clock)
        self._pool = psycopg_pool.AsyncConnectionPool(
            url,
            kwargs=connect_kwargs(application_name="orq-proxy identities"),
            min_size=1,
            max_size=pool_size,
            timeout=pool_timeout,
            open=False,
            # After this long without connecting, the pool stops retrying in the background and the next
            # call starts afresh: a server that comes back is used at once, not after a long backoff.
            reconnect_timeout=_RECONNECT_GIVE_UP,
            name="orq-identities",
        )
        self._cache: LRUCache[_Key, Identity] = LRUCache(maxsize=max(cache_size, 1))
        self._cache_enabled = cache_size > 0
        # Keys with a read in flight -> [readers, invalidations seen]: a read whose key was invalidated
        # while it ran may hold the record from before the change, so it is not cached.
        self._watched: dict[_Key, list[int]] = {}
        self._epoch = 0  # bumped whenever the cache is cleared: reads from before it are not cached
        self._listening = False  # the cache is trusted only while the listener is connected
        self._listener: asyncio.Task[None] | None = None
        self._listening_event = asyncio.Event()
        self._origin = new_request_id()  # tells this store's own notifications apart
        self.listener_name = f"orq-proxy identities listener {self._origin[-10:]}"
        """The `application_name` of the LISTEN connection (one per store: `pg_stat_activity` tells them apart)."""
        self._listener_failures = RepeatedFailure(
            logger,
            "identity cache listener cannot connect; upserts read the database until it does",
            expected=(psycopg.OperationalError,),
        )
        self._state = "new"

    # ---- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate, open the pool and start the listener.

        Raises:
            ServiceUnavailable: the database cannot be reached.
            SchemaTooNew: the database was migrated by a newer orq-proxy.
        """
        if self._state != "new":
            raise RuntimeError(f"the identity store is {self._state}")
        try:
            await asyncio.to_thread(migrate, self._url, COMPONENT, STEPS)
            await self._pool.open(wait=True, timeout=POOL_TIMEOUT)
            async with self._pool.connection() as conn:
                # New `_id`s continue after the newest one, whatever this process's clock says.
                cur = await conn.execute("SELECT max(id) FROM identities")
                row = await cur.fetchone()
        except psycopg.OperationalError as exc:  # (a PoolTimeout is one)
            await self._pool.close()
            raise ServiceUnavailable("identity records (PostgreSQL)", exc) from exc
        self._ids = MonotonicIds(self._clock, row[0] if row else None)
        self._state = "open"
        self._listener = asyncio.create_task(self._listen_forever(), name="orq-identities-listener")

    async def aclose(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        if self._listener is not None:
            self._listener.cancel()
            _, pending = await asyncio.wait([self._listener], timeout=_STOP_TIMEOUT)
            if pending:
                logger.warning("identity store: the cache listener did not stop")
        await self._pool.close()

    async def wait_listening(self) -> None:
        """Wait until the listener is connected, i.e. the upsert cache is in use (tests, diagnostics)."""
        await self._listening_event.wait()

    # ---- the listener -----------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        delay = 0.05
        while self._state == "open":
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, **connect_kwargs(application_name=self.listener_name)
                )
            except psycopg.Error as exc:
                self._listener_failures.failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Whatever was written while no one listened is unknown: start from an empty cache.
                    self._clear_cache()
                    self._listening = True
                    self._listening_event.set()
                    if self._listener_failures.failing:
                        self._listener_failures.succeeded()
                    delay = 0.05
                    while True:
                        async for note in conn.notifies(timeout=_HEARTBEAT):
                            self._on_notify(note.payload)
                        async with asyncio.timeout(POOL_TIMEOUT):  # a silently dead link fails here
                            await conn.execute("SELECT 1")
            except (psycopg.Error, TimeoutError) as exc:
                logger.warning("identity cache listener lost its connection (%s); reconnecting", exc)
            except Exception:  # a bug must not end the listener for good (the cache would stay off)
                logger.exception("identity cache listener failed; reconnecting")
                await asyncio.sleep(_RECONNECT_MAX)
            finally:
                self._listening = False
                self._listening_event.clear()
                self._clear_cache()

    def _on_notify(self, payload: str) -> None:
        try:
            data = json.loads(payload)
            key: _Key = (data["w"], data["e"])
            origin = data["o"]
        except (ValueError, KeyError, TypeError):
            logger.warning("identity cache: unreadable notification %r; clearing the cache", payload[:200])
            self._clear_cache()
            return
        if origin == self._origin:
            return  # this store's own write, already in the cache
        self._invalidate(key)

    def _invalidate(self, key: _Key) -> None:
        self._cache.pop(key, None)
        watched = self._watched.get(key)
        if watched is not None:
            watched[1] += 1

    def _clear_cache(self) -> None:
        self._cache.clear()
        self._epoch += 1

    # ---- the cache around reads -------------------------------------------------------------------

    def _watch(self, key: _Key) -> tuple[int, int]:
        watched = self._watched.setdefault(key, [0, 0])
        watched[0] += 1
        return self._epoch, watched[1]

    def _unwatch(
        self, key: _Key, token: tuple[int, int], record: Identity | None, *, wrote: bool = False
    ) -> None:
        """End a read (or, `wrote`, a write) of `key` begun with `_watch`; cache `record` if nothing
        invalidated it meanwhile.

        A write of this store is not notified back to it, so it invalidates the other calls on the same
        key still in flight here itself: their results may predate it, and if they finish after it they
        must not overwrite it in the cache. With such calls in flight it caches nothing at all (they may
        also have written after it).
        """
        watched = self._watched[key]
        fresh = self._epoch == token[0] and watched[1] == token[1]
        watched[0] -= 1
        if watched[0] == 0:
            del self._watched[key]
        elif wrote:
            watched[1] += 1
            self._cache.pop(key, None)
            return
        if record is None or not fresh or not self._listening or not self._cache_enabled:
            return
        self._cache[key] = record

    # ---- database access --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; "cannot answer" errors become `ServiceUnavailable`, within a bound."""
        if self._state != "open":
            raise RuntimeError(f"the identity store is {self._state} (call open() first)")
        try:
            async with asyncio.timeout(self._operation_timeout), self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise ServiceUnavailable("identity records (PostgreSQL)", exc) from exc

    async def _select_one(
        self, conn: psycopg.AsyncConnection[Any], where: str, args: tuple[Any, ...], *, lock: bool = False
    ) -> Identity | None:
        sql = f"SELECT {_COLUMNS} FROM identities WHERE {where}{' FOR UPDATE' if lock else ''}"
        cur = await conn.execute(sql, args)
        row = await cur.fetchone()
        return None if row is None else _row_to_identity(row)

    async def _read(self, where: str, args: tuple[Any, ...]) -> Identity | None:
        async with self._connection() as conn:
            return await self._select_one(conn, where, args)

    async def _read_external(self, workspace: str, external_id: str) -> Identity | None:
        """By external id, caching what is found (see `_watch`)."""
        key = (workspace, external_id)
        token = self._watch(key)
        record: Identity | None = None
        try:
            record = await self._read(
                "workspace_id = %s AND external_id = %s", (workspace, _esc(external_id))
            )
        finally:
            self._unwatch(key, token, record)
        return record

    async def _notify(self, conn: psycopg.AsyncConnection[Any], record: Identity) -> None:
        payload = json.dumps(
            {"w": record.workspace_id, "i": record.id, "e": record.external_id, "o": self._origin}
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    async def _insert(
        self, conn: psycopg.AsyncConnection[Any], workspace: str, external_id: str, fields: IdentityFields
    ) -> Identity | None:
        """Insert a new record; None when the external id is taken (the transaction stays usable)."""
        now = self._clock.now()
        record = new_identity(self._ids.next(now), workspace, external_id, fields, rfc3339_millis(now))
        cur = await conn.execute(
            "INSERT INTO identities (id, workspace_id, external_id, created, updated, display_name, email, "
            "avatar_url, tags, metadata, name_key, search) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (workspace_id, external_id) DO NOTHING RETURNING id",
            _row_values(record),
        )
        if await cur.fetchone() is None:
            return None
        await self._write_tags(conn, record, ())
        await self._notify(conn, record)
        return record

    async def _write_tags(
        self, conn: psycopg.AsyncConnection[Any], record: Identity, old_tags: tuple[str, ...] | None
    ) -> None:
        """The tag rows of `record`; `old_tags` None: the record had rows before (replace them)."""
        if old_tags is None:
            await conn.execute(
                "DELETE FROM identity_tags WHERE workspace_id = %s AND identity_id = %s",
                (record.workspace_id, record.id),
            )
        if record.tags:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO identity_tags (workspace_id, tag, identity_id) VALUES (%s, %s, %s)",
                    [(record.workspace_id, _esc(tag), record.id) for tag in record.tags],
                )

    async def _update(self, conn: psycopg.AsyncConnection[Any], record: Identity, old: Identity) -> None:
        values = _row_values(record)
        await conn.execute(
            "UPDATE identities SET updated=%s, display_name=%s, email=%s, avatar_url=%s, tags=%s, "
            "metadata=%s, name_key=%s, search=%s WHERE id=%s",
            (values[4], *values[5:], record.id),
        )
        if old.tags != record.tags:
            await self._write_tags(conn, record, None)
        await self._notify(conn, record)

    def _timestamp(self) -> str:
        return rfc3339_millis(self._clock.now())

    async def _apply_locked(
        self, conn: psycopg.AsyncConnection[Any], current: Identity, fields: IdentityFields
    ) -> Identity:
        updated = apply_fields(current, fields, self._timestamp) if fields else None
        if updated is None:
            return current
        await self._update(conn, updated, current)
        return updated

    # ---- the protocol -----------------------------------------------------------------------------

    async def create(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        key = (workspace, external_id)
        token = self._watch(key)
        record: Identity | None = None
        try:
            async with self._connection() as conn, conn.transaction():
                record = await self._insert(conn, workspace, external_id, fields)
        finally:
            self._unwatch(key, token, record, wrote=True)
        if record is None:
            raise IdentityExistsError(external_id)
        return record

    async def get(self, workspace: str, identity_id: str) -> Identity | None:
        return await self._read("workspace_id = %s AND id = %s", (workspace, identity_id))

    async def get_by_external_id(self, workspace: str, external_id: str) -> Identity | None:
        return await self._read_external(workspace, external_id)

    async def resolve(self, workspace: str, ref: str) -> Identity | None:
        # `_id` first, then `external_id`, in one round trip.
        async with self._connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM identities WHERE workspace_id = %s AND (id = %s OR external_id = %s) "
                "ORDER BY (id = %s) DESC LIMIT 1",
                (workspace, ref, _esc(ref), ref),
            )
            row = await cur.fetchone()
        return None if row is None else _row_to_identity(row)

    async def update(self, workspace: str, identity_id: str, fields: IdentityFields) -> Identity | None:
        where, args = "workspace_id = %s AND id = %s", (workspace, identity_id)
        record = await self._read(where, args)
        if record is None or not fields or apply_fields(record, fields, record.updated) is None:
            return record  # nothing changes: nothing written
        key = (workspace, record.external_id)
        token = self._watch(key)
        result: Identity | None = None
        try:
            async with self._connection() as conn, conn.transaction():
                current = await self._select_one(conn, where, args, lock=True)  # re-read under the row lock
                if current is not None:
                    result = await self._apply_locked(conn, current, fields)
        finally:
            self._unwatch(key, token, result, wrote=True)
        return result

    async def upsert(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        key = (workspace, external_id)
        if self._listening:
            cached = self._cache.get(key)
            if cached is not None and (not fields or apply_fields(cached, fields, cached.updated) is None):
                return cached  # the hot path: nothing changed, no round trip
        record = await self._read_external(workspace, external_id)
        if record is not None and (not fields or apply_fields(record, fields, record.updated) is None):
            return record
        where = "workspace_id = %s AND external_id = %s"
        args = (workspace, _esc(external_id))
        token = self._watch(key)
        result: Identity | None = None
        try:
            async with self._connection() as conn, conn.transaction():
                while result is None:
                    current = await self._select_one(conn, where, args, lock=True)
                    if current is not None:
                        result = await self._apply_locked(conn, current, fields)
                    else:
                        # None: another replica created it a moment ago; the next round applies to theirs.
                        result = await self._insert(conn, workspace, external_id, fields)
        finally:
            self._unwatch(key, token, result, wrote=True)
        return result

    async def delete(self, workspace: str, identity_id: str) -> Identity | None:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                f"DELETE FROM identities WHERE workspace_id = %s AND id = %s RETURNING {_COLUMNS}",
                (workspace, identity_id),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            record = _row_to_identity(row)
            await conn.execute(
                "DELETE FROM identity_tags WHERE workspace_id = %s AND identity_id = %s",
                (workspace, identity_id),
            )
            await self._notify(conn, record)
        self._invalidate((workspace, record.external_id))
        return record

    async def count(self, workspace: str) -> int:
        """How many identities the workspace has."""
        async with self._connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM identities WHERE workspace_id = %s", (workspace,))
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def list(self, workspace: str, query: IdentityQuery) -> IdentityPage:
        async with self._connection() as conn:
            return await self._list(conn, workspace, query)

    async def _rarest(self, conn: psycopg.AsyncConnection[Any], workspace: str, tags: tuple[str, ...]) -> str:
        """The tag with the fewest identities (counted up to a cap, so a common tag costs little)."""
        counts = []
        for tag in tags:
            cur = await conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM identity_tags WHERE workspace_id = %s AND tag = %s "
                "LIMIT %s) AS t",
                (workspace, _esc(tag), _TAG_COUNT_CAP),
            )
            row = await cur.fetchone()
            counts.append((int(row[0]) if row else 0, tag))
        return min(counts)[1]

    async def _list(
        self, conn: psycopg.AsyncConnection[Any], workspace: str, query: IdentityQuery
    ) -> IdentityPage:
        backward = query.ending_before is not None
        cursor_id = query.ending_before if backward else query.starting_after
        where: list[str] = []
        args: list[Any] = []
        other_tags = query.tags
        source = "identities"
        if query.sort_by is None and query.tags:
            # `_id` order with tags: walk one tag's rows of the (workspace_id, tag, identity_id) key,
            # already in `_id` order, like the in-memory store's posting lists.
            drive = await self._rarest(conn, workspace, query.tags) if len(query.tags) > 1 else query.tags[0]
            other_tags = tuple(t for t in query.tags if t != drive)
            source = "identity_tags d JOIN identities ON identities.id = d.identity_id"
            where += ["d.workspace_id = %s", "d.tag = %s"]
            args += [workspace, _esc(drive)]
            key_columns, descending = ["d.identity_id"], True
        else:
            where.append("identities.workspace_id = %s")
            args.append(workspace)
            if query.sort_by is None:
                key_columns, descending = ["identities.id"], True
            elif query.sort_by == SORT_UPDATED:
                key_columns, descending = ["identities.updated", "identities.id"], True
            else:
                key_columns, descending = ["identities.name_key", "identities.id"], False
        if query.search:
            needle = search_needle(query.search)
            if needle is None:
                return IdentityPage(data=[], has_more=False)
            where.append("position(%s::bytea in identities.search) > 0")
            args.append(needle.encode("utf-8"))
        for tag in other_tags:
            where.append(
                "EXISTS (SELECT 1 FROM identity_tags t WHERE t.workspace_id = identities.workspace_id "
                "AND t.tag = %s AND t.identity_id = identities.id)"
            )
            args.append(_esc(tag))
        # Walking direction: page order, or reversed when paging backwards.
        walk_descending = descending != backward
        if cursor_id is not None:
            if query.sort_by is None:
                cursor: tuple[Any, ...] = (cursor_id,)
            else:
                columns = ", ".join(c.removeprefix("identities.") for c in key_columns)
                cur = await conn.execute(
                    f"SELECT {columns} FROM identities WHERE workspace_id = %s AND id = %s",
                    (workspace, cursor_id),
                )
                row = await cur.fetchone()
                if row is None:
                    raise InvalidCursorError("ending_before" if backward else "starting_after", cursor_id)
                cursor = tuple(row)
            marks = ", ".join("%s" for _ in key_columns)
            where.append(f"({', '.join(key_columns)}) {'<' if walk_descending else '>'} ({marks})")
            args.extend(cursor)
        direction = "DESC" if walk_descending else "ASC"
        order = ", ".join(f"{column} {direction}" for column in key_columns)
        sql = f"SELECT {_QUALIFIED} FROM {source} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT %s"
        cur = await conn.execute(sql, (*args, query.limit + 1))
        rows = await cur.fetchall()
        data = [_row_to_identity(row) for row in rows[: query.limit]]
        if backward:
            data.reverse()
        return IdentityPage(data=data, has_more=len(rows) > query.limit)
