"""Budget records: an async `BudgetStore` protocol and its in-memory implementation.

Uniqueness holds on `(workspace, scope kind, scope target)` for scoped budgets (a second one is a
`BudgetConflict`, 409 at the API). The store also answers "which budgets apply to this request" through a
`BudgetIndex`, so a shared backend can keep its own cached index without touching the middleware.

`InMemoryBudgetStore` never awaits between reading and writing, so each call is atomic on its event loop.
`SqliteBudgetStore` is the same store written through to a SQLite table (`[storage] state =
"sqlite:///path"`), so budgets survive restarts; it loads every budget at start (budgets are configuration:
thousands, not billions) and answers reads from memory.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from orq_proxy.budgets.matching import BudgetIndex, RequestFacts
from orq_proxy.budgets.models import Alert, Budget, Period, ScopeKind
from orq_proxy.postgres import is_postgres_url, require_driver

__all__ = [
    "BudgetConflict",
    "BudgetListQuery",
    "BudgetPage",
    "BudgetStore",
    "InMemoryBudgetStore",
    "SortField",
    "SqliteBudgetStore",
    "UnknownCursor",
    "budget_store_from_url",
]


class SortField(StrEnum):
    """List orders (spec §3.1). Created/updated: newest first; expires: soonest first, never-expiring last."""

    EXPIRES_AT = "BUDGET_SORT_FIELD_EXPIRES_AT"
    CREATED_AT = "BUDGET_SORT_FIELD_CREATED_AT"
    UPDATED_AT = "BUDGET_SORT_FIELD_UPDATED_AT"


class BudgetConflict(Exception):
    """A scoped budget already exists for that target."""

    def __init__(self, existing: Budget) -> None:
        target = f" {existing.scope_target!r}" if existing.scope_target else ""
        super().__init__(
            f"a budget for scope {existing.scope_kind}{target} already exists: {existing.budget_id}"
        )
        self.existing = existing


class UnknownCursor(ValueError):
    """A `starting_after` / `ending_before` cursor that names no budget of the (filtered) list."""


@dataclass(frozen=True, slots=True)
class BudgetListQuery:
    """Filters, order and page of `GET /v2/budgets` (spec §3.4)."""

    limit: int = 25
    starting_after: str | None = None
    ending_before: str | None = None
    scope_kinds: frozenset[ScopeKind] = frozenset()
    scope_target_id: str | None = None
    is_active: bool | None = None
    periods: frozenset[Period] = frozenset()
    query: str | None = None
    sort_by: SortField = SortField.UPDATED_AT


@dataclass(slots=True)
class BudgetPage:
    items: list[Budget] = field(default_factory=list)
    has_more: bool = False


class BudgetStore(Protocol):
    """Where budgets live. Every method is atomic with respect to the others."""

    async def create(self, budget: Budget) -> Budget:
        """Insert; raises `BudgetConflict` if a scoped budget exists for the same target."""
        ...

    async def get(self, workspace: str, budget_id: str) -> Budget | None: ...

    async def replace(self, budget: Budget) -> Budget:
        """Overwrite an existing budget (same id, same workspace); raises KeyError if it is gone."""
        ...

    async def delete(self, workspace: str, budget_id: str) -> Budget | None:
        """Remove and return the budget, or None if there was none."""
        ...

    async def find_scoped(self, workspace: str, kind: ScopeKind, target: str) -> Budget | None: ...

    async def page(self, workspace: str, query: BudgetListQuery) -> BudgetPage:
        """One page of the workspace's budgets; raises `UnknownCursor`."""
        ...

    async def matching(self, facts: RequestFacts, now: datetime) -> list[Budget]:
        """Every active, unexpired budget that applies to the request."""
        ...

    async def all_budgets(self) -> list[Budget]:
        """Every budget of every workspace (startup: rebuilding counters)."""
        ...

    async def aclose(self) -> None:
        """Release what the store holds (a database connection); the lifespan calls it at shutdown."""
        ...


_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


class InMemoryBudgetStore:
    """`BudgetStore` in this process's memory.

    Example:
        store = InMemoryBudgetStore()
        await store.create(budget)
        await store.matching(RequestFacts(workspace="default", identity="u1"), clock.now())
    """

    def __init__(self, budgets: Iterable[Budget] = ()) -> None:
        self._by_id: dict[str, Budget] = {}
        self._by_scope: dict[tuple[str, ScopeKind, str], str] = {}
        self._workspace_ids: dict[str, dict[str, None]] = {}
        self.index = BudgetIndex()
        for budget in budgets:
            self._insert(budget)

    def __len__(self) -> int:
        return len(self._by_id)

    def _insert(self, budget: Budget) -> Budget:
        if budget.budget_id in self._by_id:
            raise ValueError(f"budget id {budget.budget_id} exists")
        if budget.scope_kind is not None:
            key = (budget.workspace, budget.scope_kind, budget.scope_target)
            existing = self._by_scope.get(key)
            if existing is not None:
                raise BudgetConflict(self._by_id[existing])
            self._by_scope[key] = budget.budget_id
        self._by_id[budget.budget_id] = budget
        self._workspace_ids.setdefault(budget.workspace, {})[budget.budget_id] = None
        self.index.put(budget)
        return budget

    async def create(self, budget: Budget) -> Budget:
        return self._insert(budget)

    async def get(self, workspace: str, budget_id: str) -> Budget | None:
        budget = self._by_id.get(budget_id)
        return budget if budget is not None and budget.workspace == workspace else None

    async def replace(self, budget: Budget) -> Budget:
        current = self._by_id.get(budget.budget_id)
        if current is None or current.workspace != budget.workspace:
            raise KeyError(budget.budget_id)
        if (current.scope_kind, current.scope_target) != (budget.scope_kind, budget.scope_target):
            raise ValueError("a budget's scope is immutable")
        self._by_id[budget.budget_id] = budget
        self.index.put(budget)
        return budget

    async def delete(self, workspace: str, budget_id: str) -> Budget | None:
        budget = self._by_id.get(budget_id)
        if budget is None or budget.workspace != workspace:
            return None
        del self._by_id[budget_id]
        if budget.scope_kind is not None:
            del self._by_scope[(budget.workspace, budget.scope_kind, budget.scope_target)]
        ids = self._workspace_ids[workspace]
        del ids[budget_id]
        if not ids:
            del self._workspace_ids[workspace]
        self.index.remove(budget_id)
        return budget

    async def find_scoped(self, workspace: str, kind: ScopeKind, target: str) -> Budget | None:
        budget_id = self._by_scope.get((workspace, kind, target))
        return None if budget_id is None else self._by_id[budget_id]

    async def page(self, workspace: str, query: BudgetListQuery) -> BudgetPage:
        items = [b for b in self._workspace_budgets(workspace) if _selected(b, query)]
        _sort(items, query.sort_by)
        position = {b.budget_id: i for i, b in enumerate(items)}
        if query.ending_before is not None:
            if query.ending_before not in position:
                raise UnknownCursor(f"ending_before: no budget {query.ending_before!r} in this list")
            end = position[query.ending_before]
            start = max(0, end - query.limit)
            return BudgetPage(items[start:end], has_more=start > 0)
        start = 0
        if query.starting_after is not None:
            if query.starting_after not in position:
                raise UnknownCursor(f"starting_after: no budget {query.starting_after!r} in this list")
            start = position[query.starting_after] + 1
        end = start + query.limit
        return BudgetPage(items[start:end], has_more=end < len(items))

    async def matching(self, facts: RequestFacts, now: datetime) -> list[Budget]:
        return self.index.match(facts, now)

    async def all_budgets(self) -> list[Budget]:
        return list(self._by_id.values())

    async def aclose(self) -> None:
        return None  # nothing held

    def _workspace_budgets(self, workspace: str) -> list[Budget]:
        return [self._by_id[i] for i in self._workspace_ids.get(workspace, ())]


def _selected(budget: Budget, query: BudgetListQuery) -> bool:
    if query.scope_kinds and budget.scope_kind not in query.scope_kinds:
        return False
    if query.scope_target_id is not None and budget.scope_target != query.scope_target_id:
        return False
    if query.is_active is not None and budget.is_active != query.is_active:
        return False
    if query.periods and budget.period not in query.periods:
        return False
    if query.query:
        needle = query.query.casefold()
        haystack = (budget.scope_target, budget.budget_id, budget.cel)
        if not any(needle in text.casefold() for text in haystack):
            return False
    return True


def _sort(items: list[Budget], sort_by: SortField) -> None:
    if sort_by is SortField.EXPIRES_AT:
        items.sort(key=lambda b: (b.expires_at or _FAR_FUTURE, b.budget_id))
    elif sort_by is SortField.CREATED_AT:
        items.sort(key=lambda b: (b.created_at, b.budget_id), reverse=True)
    else:
        items.sort(key=lambda b: (b.updated_at, b.budget_id), reverse=True)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    budget_id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    record TEXT NOT NULL
)
"""


def _to_json(budget: Budget) -> str:
    def time(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return json.dumps(
        {
            "budget_id": budget.budget_id,
            "workspace": budget.workspace,
            "scope_kind": budget.scope_kind.value if budget.scope_kind else None,
            "scope_target": budget.scope_target,
            "cel": budget.cel,
            "period": budget.period.value if budget.period else None,
            "amount_nanos": budget.amount_nanos,
            "token_limit": budget.token_limit,
            "requests_per_minute": budget.requests_per_minute,
            "alerts": [[a.id, a.threshold_percent, list(a.notifier_ids), a.dimension] for a in budget.alerts],
            "is_active": budget.is_active,
            "expires_at": time(budget.expires_at),
            "created_at": time(budget.created_at),
            "updated_at": time(budget.updated_at),
            "time_zone": budget.time_zone,
            "counting_since": time(budget.counting_since),
        },
        separators=(",", ":"),
    )


def _from_json(text: str) -> Budget:
    data: dict[str, Any] = json.loads(text)

    def time(value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    created, updated = time(data["created_at"]), time(data["updated_at"])
    assert created is not None and updated is not None
    return Budget(
        budget_id=data["budget_id"],
        workspace=data["workspace"],
        scope_kind=ScopeKind(data["scope_kind"]) if data["scope_kind"] else None,
        scope_target=data["scope_target"],
        cel=data["cel"],
        period=Period(data["period"]) if data["period"] else None,
        amount_nanos=data["amount_nanos"],
        token_limit=data["token_limit"],
        requests_per_minute=data["requests_per_minute"],
        alerts=tuple(Alert(a[0], a[1], tuple(a[2]), a[3]) for a in data["alerts"]),
        is_active=data["is_active"],
        expires_at=time(data["expires_at"]),
        created_at=created,
        updated_at=updated,
        time_zone=data["time_zone"],
        counting_since=time(data.get("counting_since")),  # (absent from records written before it)
    )


class SqliteBudgetStore(InMemoryBudgetStore):
    """`InMemoryBudgetStore` written through to SQLite. Writes are rare admin calls, so they run inline.

    Args:
        path: the database file (shared with the identities' tables of `[storage] state`).
    """

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute(_SCHEMA)
        rows = self._conn.execute("SELECT record FROM budgets").fetchall()
        super().__init__(_from_json(row[0]) for row in rows)

    async def create(self, budget: Budget) -> Budget:
        self._insert(budget)  # the uniqueness check first; then persist (and undo if that fails)
        try:
            self._conn.execute(
                "INSERT INTO budgets (budget_id, workspace, record) VALUES (?, ?, ?)",
                (budget.budget_id, budget.workspace, _to_json(budget)),
            )
        except sqlite3.Error:
            await super().delete(budget.workspace, budget.budget_id)
            raise
        return budget

    async def replace(self, budget: Budget) -> Budget:
        previous = await self.get(budget.workspace, budget.budget_id)
        await super().replace(budget)
        try:
            self._conn.execute(
                "UPDATE budgets SET record = ? WHERE budget_id = ?", (_to_json(budget), budget.budget_id)
            )
        except sqlite3.Error:
            if previous is not None:
                await super().replace(previous)
            raise
        return budget

    async def delete(self, workspace: str, budget_id: str) -> Budget | None:
        budget = await super().delete(workspace, budget_id)
        if budget is not None:
            self._conn.execute("DELETE FROM budgets WHERE budget_id = ?", (budget_id,))
        return budget

    async def aclose(self) -> None:
        self._conn.close()


def budget_store_from_url(url: str) -> BudgetStore:
    """The store named by `[storage] state`: `memory`, `sqlite:///abs/path.db` (durable), or
    `postgresql://...` / `postgres://...` (shared by replicas; needs the postgres extra).

    A PostgreSQL store is built without touching the network: call its `open()` before use.
    """
    if url == "memory":
        return InMemoryBudgetStore()
    if is_postgres_url(url):
        require_driver("state")
        from orq_proxy.budgets.postgres import PostgresBudgetStore

        return PostgresBudgetStore(url)
    if url.startswith("sqlite://") and url[len("sqlite://") :]:
        try:
            return SqliteBudgetStore(url[len("sqlite://") :])
        except sqlite3.Error as exc:
            raise ValueError(f"[storage] state {url!r}: cannot open the database: {exc}") from exc
    raise ValueError(
        f"[storage] state must be 'memory', 'sqlite:///<path>' or 'postgresql://...', got {url!r}"
    )
