"""`SqliteIdentityStore`: the durable `IdentityStore` (`[storage] state = "sqlite:///path/state.db"`).

Where the blocking calls run, and why:
- Writes and list pages run on one dedicated worker thread that owns the writing connection, so the
  event loop never waits on a commit's fsync or on a page that has to scan. One thread also serializes
  this process's writes (SQLite allows one writer anyway), and every write runs in `BEGIN IMMEDIATE`,
  which keeps its read-then-write atomic against other processes sharing the file (WAL, busy timeout).
- Point reads (one row by a unique index: `get`, `get_by_external_id`, `resolve`, and the first read of
  an `upsert`) run inline on the event loop on a second, read-only connection. They take tens of
  microseconds and never wait for a writer (WAL readers see the last commit), while a hop to the
  worker thread costs about 100 µs; the proxy's hot path does one of these per request. An upsert whose
  payload matches the record therefore never leaves the event loop and writes nothing.
A `:memory:` database has a single connection, so there every call goes to the worker thread.

Failure policy: identity fails closed, so SQLite errors propagate.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from orq_proxy.clock import Clock, SystemClock
from orq_proxy.identities.models import (
    SORT_UPDATED,
    Identity,
    IdentityExistsError,
    IdentityFields,
    IdentityPage,
    IdentityQuery,
    InvalidCursorError,
    apply_fields,
    name_sort_key,
    new_identity,
    search_needle,
)
from orq_proxy.ids import MonotonicIds
from orq_proxy.timefmt import rfc3339_millis

__all__ = ["SqliteIdentityStore"]

_T = TypeVar("_T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS identities (
    id           TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    display_name TEXT,
    email        TEXT,
    avatar_url   TEXT,
    tags         TEXT NOT NULL DEFAULT '[]',
    metadata     TEXT,
    created      TEXT NOT NULL,
    updated      TEXT NOT NULL,
    name_key     TEXT NOT NULL,
    search_text  TEXT NOT NULL,
    UNIQUE (workspace_id, external_id)
);
CREATE INDEX IF NOT EXISTS identities_by_id ON identities (workspace_id, id);
CREATE INDEX IF NOT EXISTS identities_by_updated ON identities (workspace_id, updated, id);
CREATE INDEX IF NOT EXISTS identities_by_name ON identities (workspace_id, name_key, id);
CREATE TABLE IF NOT EXISTS identity_tags (
    workspace_id TEXT NOT NULL,
    tag          TEXT NOT NULL,
    identity_id  TEXT NOT NULL,
    PRIMARY KEY (workspace_id, tag, identity_id)
) WITHOUT ROWID;
"""

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
    "search_text",
)
_COLUMNS: Final = ", ".join(_COLUMN_NAMES)
_QUALIFIED: Final = ", ".join(f"identities.{name}" for name in _COLUMN_NAMES)
_TAG_COUNT_CAP: Final = 1_000


def _row_to_identity(row: tuple[Any, ...]) -> Identity:
    tags = tuple(sys.intern(t) for t in json.loads(row[8])) if row[8] != "[]" else ()
    return Identity(
        id=row[0],
        workspace_id=row[1],
        external_id=row[2],
        created=row[3],
        updated=row[4],
        display_name=row[5],
        email=row[6],
        avatar_url=row[7],
        tags=tags,
        metadata=json.loads(row[9]) if row[9] is not None else None,
        search_text=row[10],
    )


def _row_values(record: Identity) -> tuple[Any, ...]:
    return (
        record.id,
        record.workspace_id,
        record.external_id,
        record.created,
        record.updated,
        record.display_name,
        record.email,
        record.avatar_url,
        json.dumps(list(record.tags), ensure_ascii=False),
        json.dumps(dict(record.metadata), ensure_ascii=False) if record.metadata else None,
        record.search_text,
        name_sort_key(record.display_name),
    )


class SqliteIdentityStore:
    """An `IdentityStore` in one SQLite file; survives restarts.

    Args:
        path: the database file (created if missing), or `:memory:`.
        clock: the time source for `created`/`updated` and the ULIDs.
    """

    def __init__(self, path: str, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or SystemClock()
        self._path = path
        # Opened here, on the caller's thread, so a bad path fails at startup; used afterwards only on the
        # worker thread (hence check_same_thread=False).
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._reader: sqlite3.Connection | None = None
        try:
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(_SCHEMA)
            (last,) = self._conn.execute("SELECT max(id) FROM identities").fetchone()
            if path != ":memory:":
                # Used only on the event loop's thread, which need not be this one.
                self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._reader.execute("PRAGMA query_only=ON")
                self._reader.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            self._conn.close()
            if self._reader is not None:
                self._reader.close()
            raise
        self._ids = MonotonicIds(self._clock, last)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orq-identities-sqlite")
        self._closed = False

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise RuntimeError("the identity store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _point_read(self, where: str, *args: Any) -> Identity | None:
        """One row by a unique index: inline on the read connection (see the module docstring)."""
        if self._closed:
            raise RuntimeError("the identity store is closed")
        if self._reader is None:
            return await self._run(self._select_one, where, *args)
        row = self._reader.execute(f"SELECT {_COLUMNS} FROM identities WHERE {where}", args).fetchone()
        return None if row is None else _row_to_identity(row)

    # ---- worker-thread functions ------------------------------------------------------------------

    def _select_one(self, where: str, *args: Any) -> Identity | None:
        row = self._conn.execute(f"SELECT {_COLUMNS} FROM identities WHERE {where}", args).fetchone()
        return None if row is None else _row_to_identity(row)

    def _insert(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        now = self._clock.now()
        record = new_identity(self._ids.next(now), workspace, external_id, fields, rfc3339_millis(now))
        self._conn.execute(
            "INSERT INTO identities (id, workspace_id, external_id, created, updated, display_name, email, "
            "avatar_url, tags, metadata, search_text, name_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            _row_values(record),
        )
        self._conn.executemany(
            "INSERT INTO identity_tags (workspace_id, tag, identity_id) VALUES (?,?,?)",
            [(workspace, tag, record.id) for tag in record.tags],
        )
        return record

    def _write(self, record: Identity, old: Identity) -> None:
        values = _row_values(record)
        self._conn.execute(
            "UPDATE identities SET updated=?, display_name=?, email=?, avatar_url=?, tags=?, metadata=?, "
            "search_text=?, name_key=? WHERE id=?",
            (*values[4:], record.id),
        )
        if old.tags != record.tags:
            self._conn.execute(
                "DELETE FROM identity_tags WHERE workspace_id=? AND identity_id=?",
                (record.workspace_id, record.id),
            )
            self._conn.executemany(
                "INSERT INTO identity_tags (workspace_id, tag, identity_id) VALUES (?,?,?)",
                [(record.workspace_id, tag, record.id) for tag in record.tags],
            )

    def _transaction(self, fn: Callable[[], _T]) -> _T:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
            self._conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (busy, disk full) leaves the transaction open; close it so the next
            # BEGIN on this connection works.
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return result

    def _create_sync(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        def create() -> Identity:
            try:
                return self._insert(workspace, external_id, fields)
            except sqlite3.IntegrityError as exc:
                raise IdentityExistsError(external_id) from exc

        return self._transaction(create)

    def _timestamp(self) -> str:
        return rfc3339_millis(self._clock.now())

    def _apply_sync(self, where: str, args: tuple[str, str], fields: IdentityFields) -> Identity | None:
        record = self._select_one(where, *args)
        if record is None or not fields:
            return record
        if apply_fields(record, fields, record.updated) is None:
            return record  # the cheap path: nothing changed, nothing written

        def write() -> Identity | None:
            current = self._select_one(where, *args)  # re-read under the write lock
            if current is None:
                return None
            updated = apply_fields(current, fields, self._timestamp)
            if updated is None:
                return current
            self._write(updated, current)
            return updated

        return self._transaction(write)

    def _upsert_sync(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        where = "workspace_id=? AND external_id=?"
        record = self._apply_sync(where, (workspace, external_id), fields)
        if record is not None:
            return record

        def create_or_apply() -> Identity:
            current = self._select_one(where, workspace, external_id)
            if current is None:
                return self._insert(workspace, external_id, fields)
            updated = apply_fields(current, fields, self._timestamp) if fields else None
            if updated is None:
                return current
            self._write(updated, current)
            return updated

        return self._transaction(create_or_apply)

    def _delete_sync(self, workspace: str, identity_id: str) -> Identity | None:
        def delete() -> Identity | None:
            record = self._select_one("workspace_id=? AND id=?", workspace, identity_id)
            if record is None:
                return None
            self._conn.execute("DELETE FROM identities WHERE id=?", (identity_id,))
            self._conn.execute(
                "DELETE FROM identity_tags WHERE workspace_id=? AND identity_id=?", (workspace, identity_id)
            )
            return record

        return self._transaction(delete)

    def _rarest(self, workspace: str, tags: tuple[str, ...]) -> str:
        """The tag with the fewest identities (counted up to a cap, so a common tag costs little)."""
        counts = [
            (
                self._conn.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM identity_tags WHERE workspace_id=? AND tag=? LIMIT ?)",
                    (workspace, tag, _TAG_COUNT_CAP),
                ).fetchone()[0],
                tag,
            )
            for tag in tags
        ]
        return min(counts)[1]

    def _list_sync(self, workspace: str, query: IdentityQuery) -> IdentityPage:
        backward = query.ending_before is not None
        cursor_id = query.ending_before if backward else query.starting_after
        where: list[str] = []
        args: list[Any] = []
        other_tags = query.tags
        source = "identities"
        if query.sort_by is None and query.tags:
            # `_id` order with tags: walk one tag's rows of the (workspace_id, tag, identity_id) key,
            # which are already in `_id` order, like the in-memory store's posting lists.
            drive = self._rarest(workspace, query.tags) if len(query.tags) > 1 else query.tags[0]
            other_tags = tuple(t for t in query.tags if t != drive)
            source = "identity_tags d JOIN identities ON identities.id = d.identity_id"
            where += ["d.workspace_id = ?", "d.tag = ?"]
            args += [workspace, drive]
            key_columns, descending = ["d.identity_id"], True
        else:
            where.append("identities.workspace_id = ?")
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
            where.append("instr(identities.search_text, ?) > 0")
            args.append(needle)
        for tag in other_tags:
            where.append(
                "EXISTS (SELECT 1 FROM identity_tags t WHERE t.workspace_id = identities.workspace_id "
                "AND t.tag = ? AND t.identity_id = identities.id)"
            )
            args.append(tag)
        # Walking direction: page order, or reversed when paging backwards.
        walk_descending = descending != backward
        if cursor_id is not None:
            if query.sort_by is None:
                cursor: tuple[Any, ...] = (cursor_id,)
            else:
                row = self._conn.execute(
                    f"SELECT {', '.join(key_columns)} FROM identities WHERE workspace_id=? AND id=?",
                    (workspace, cursor_id),
                ).fetchone()
                if row is None:
                    raise InvalidCursorError("ending_before" if backward else "starting_after", cursor_id)
                cursor = tuple(row)
            columns = f"({', '.join(key_columns)})"
            marks = f"({', '.join('?' for _ in key_columns)})"
            where.append(f"{columns} {'<' if walk_descending else '>'} {marks}")
            args.extend(cursor)
        direction = "DESC" if walk_descending else "ASC"
        order = ", ".join(f"{column} {direction}" for column in key_columns)
        sql = f"SELECT {_QUALIFIED} FROM {source} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?"
        rows = self._conn.execute(sql, (*args, query.limit + 1)).fetchall()
        data = [_row_to_identity(row) for row in rows[: query.limit]]
        if backward:
            data.reverse()
        return IdentityPage(data=data, has_more=len(rows) > query.limit)

    def _close_sync(self) -> None:
        self._conn.close()

    # ---- the protocol -----------------------------------------------------------------------------

    async def create(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        return await self._run(self._create_sync, workspace, external_id, fields)

    async def get(self, workspace: str, identity_id: str) -> Identity | None:
        return await self._point_read("workspace_id=? AND id=?", workspace, identity_id)

    async def get_by_external_id(self, workspace: str, external_id: str) -> Identity | None:
        return await self._point_read("workspace_id=? AND external_id=?", workspace, external_id)

    async def resolve(self, workspace: str, ref: str) -> Identity | None:
        # `_id` first, then `external_id`.
        record = await self._point_read("workspace_id=? AND id=?", workspace, ref)
        if record is None:
            record = await self._point_read("workspace_id=? AND external_id=?", workspace, ref)
        return record

    async def update(self, workspace: str, identity_id: str, fields: IdentityFields) -> Identity | None:
        return await self._run(self._apply_sync, "workspace_id=? AND id=?", (workspace, identity_id), fields)

    async def upsert(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        if self._reader is not None:
            record = await self._point_read("workspace_id=? AND external_id=?", workspace, external_id)
            if record is not None and (not fields or apply_fields(record, fields, record.updated) is None):
                return record  # the hot path: nothing changed, nothing written, no thread hop
        return await self._run(self._upsert_sync, workspace, external_id, fields)

    async def delete(self, workspace: str, identity_id: str) -> Identity | None:
        return await self._run(self._delete_sync, workspace, identity_id)

    async def list(self, workspace: str, query: IdentityQuery) -> IdentityPage:
        return await self._run(self._list_sync, workspace, query)

    async def count(self, workspace: str) -> int:
        """How many identities the workspace has."""

        def count() -> int:
            (n,) = self._conn.execute(
                "SELECT count(*) FROM identities WHERE workspace_id=?", (workspace,)
            ).fetchone()
            return int(n)

        return await self._run(count)

    async def aclose(self) -> None:
        if self._closed:
            return
        await self._run(self._close_sync)
        self._closed = True
        self._executor.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
