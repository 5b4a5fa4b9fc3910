"""Budget records: an async `BudgetStore` protocol and its in-memory implementation.

Uniqueness holds on `(workspace, scope kind, scope target)` for scoped budgets (a second one is a
`BudgetConflict`, 409 at the API). The store also answers "which budgets apply to this request" through a
`BudgetIndex`, so a shared backend can keep its own cached index without touching the middleware.

`InMemoryBudgetStore` never awaits between reading and writing, so each call is atomic on its event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from orq_proxy.budgets.matching import BudgetIndex, RequestFacts
from orq_proxy.budgets.models import Budget, Period, ScopeKind

__all__ = [
    "BudgetConflict",
    "BudgetListQuery",
    "BudgetPage",
    "BudgetStore",
    "InMemoryBudgetStore",
    "SortField",
    "UnknownCursor",
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
