"""Budget stores (in memory, SQLite, PostgreSQL): uniqueness per scope target, replace/delete, list filters,
order and cursors; SQLite persistence. Two PostgreSQL replicas: `test_budget_postgres.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from orq_proxy.budgets.matching import RequestFacts
from orq_proxy.budgets.models import Alert, Budget, Period, ScopeKind
from orq_proxy.budgets.postgres import PostgresBudgetStore
from orq_proxy.budgets.store import (
    BudgetConflict,
    BudgetListQuery,
    BudgetStore,
    InMemoryBudgetStore,
    SortField,
    SqliteBudgetStore,
    UnknownCursor,
    budget_store_from_url,
)

MakeBudget = Callable[..., Budget]
T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BudgetStore]:
    """Every store the protocol tests run against (PostgreSQL on a database of its own)."""
    s: BudgetStore
    if request.param == "memory":
        s = InMemoryBudgetStore()
    elif request.param == "sqlite":
        s = SqliteBudgetStore(str(tmp_path / "state.db"))
    else:
        pg = PostgresBudgetStore(request.getfixturevalue("pg_url"))
        await pg.open()
        s = pg
    yield s
    await s.aclose()


async def test_one_budget_per_scope_target(store: BudgetStore, make_budget: MakeBudget) -> None:
    """A second budget on (workspace, kind, target) conflicts; other workspaces and CEL budgets do not."""
    first = await store.create(make_budget(kind=ScopeKind.IDENTITY, target="u1"))
    with pytest.raises(BudgetConflict) as info:
        await store.create(make_budget(kind=ScopeKind.IDENTITY, target="u1"))
    assert info.value.existing == first and first.budget_id in str(info.value)
    await store.create(make_budget(kind=ScopeKind.IDENTITY, target="u1", workspace="w2"))
    await store.create(make_budget(kind=ScopeKind.PROJECT, target="u1"))
    await store.create(make_budget(kind=None, cel='identity == "u1"'))
    await store.create(make_budget(kind=None, cel='identity == "u1"'))
    await store.create(make_budget(kind=ScopeKind.WORKSPACE))
    with pytest.raises(BudgetConflict):
        await store.create(make_budget(kind=ScopeKind.WORKSPACE))
    assert len(await store.all_budgets()) == 6
    assert await store.find_scoped("default", ScopeKind.IDENTITY, "u1") == first
    assert await store.find_scoped("default", ScopeKind.IDENTITY, "u2") is None


async def test_get_replace_delete(store: BudgetStore, make_budget: MakeBudget) -> None:
    """Records are per workspace; replace keeps the scope; delete frees the scope target and the index."""
    budget = await store.create(make_budget(kind=ScopeKind.IDENTITY, target="u1", amount_nanos=5))
    assert await store.get("default", budget.budget_id) == budget
    assert await store.get("w2", budget.budget_id) is None
    changed = await store.replace(replace(budget, amount_nanos=9))
    assert (await store.get("default", budget.budget_id)) == changed
    with pytest.raises(ValueError, match="immutable"):
        await store.replace(replace(budget, scope_target="u2"))
    with pytest.raises(KeyError):
        await store.replace(make_budget())
    facts = RequestFacts(workspace="default", identity="u1")
    assert await store.matching(facts, T0) == [changed]
    assert await store.delete("w2", budget.budget_id) is None
    assert await store.delete("default", budget.budget_id) == changed
    assert await store.delete("default", budget.budget_id) is None
    assert await store.matching(facts, T0) == []
    await store.create(make_budget(kind=ScopeKind.IDENTITY, target="u1"))  # the target is free again


async def seeded(store: BudgetStore, make_budget: MakeBudget) -> list[Budget]:
    budgets = []
    kinds = [ScopeKind.IDENTITY, ScopeKind.MODEL, ScopeKind.PROJECT, None]
    periods = [Period.DAILY, Period.MONTHLY, None]
    for i in range(12):
        kind = kinds[i % 4]
        budget = make_budget(
            kind=kind,
            target=f"target-{i}" if kind else "",
            cel=None if kind else f'metadata.team == "team-{i}"',
            period=periods[i % 3],
            is_active=i % 5 != 0,
            created_at=T0 + timedelta(minutes=i),
            updated_at=T0 + timedelta(minutes=(i * 7) % 12),
            expires_at=T0 + timedelta(days=12 - i) if i % 2 else None,
        )
        budgets.append(await store.create(budget))
    await store.create(make_budget(workspace="elsewhere"))
    return budgets


async def test_list_order_and_cursors(store: BudgetStore, make_budget: MakeBudget) -> None:
    """Default order is most recently updated first; cursors page forward and back with has_more."""
    budgets = await seeded(store, make_budget)
    by_updated = sorted(budgets, key=lambda b: b.updated_at, reverse=True)
    page = await store.page("default", BudgetListQuery(limit=5))
    assert page.items == by_updated[:5] and page.has_more
    page2 = await store.page("default", BudgetListQuery(limit=5, starting_after=page.items[-1].budget_id))
    assert page2.items == by_updated[5:10] and page2.has_more
    page3 = await store.page("default", BudgetListQuery(limit=5, starting_after=page2.items[-1].budget_id))
    assert page3.items == by_updated[10:] and not page3.has_more
    back = await store.page("default", BudgetListQuery(limit=5, ending_before=page3.items[0].budget_id))
    assert back.items == page2.items and back.has_more
    back = await store.page("default", BudgetListQuery(limit=5, ending_before=page2.items[0].budget_id))
    assert back.items == page.items and not back.has_more
    for cursor in ("starting_after", "ending_before"):
        with pytest.raises(UnknownCursor, match=cursor):
            await store.page("default", BudgetListQuery(**{cursor: "nope"}))  # type: ignore[arg-type]
    created = await store.page("default", BudgetListQuery(limit=100, sort_by=SortField.CREATED_AT))
    assert created.items == sorted(budgets, key=lambda b: b.created_at, reverse=True)
    expiring = await store.page("default", BudgetListQuery(limit=100, sort_by=SortField.EXPIRES_AT))
    with_expiry = [b for b in budgets if b.expires_at]
    assert expiring.items[: len(with_expiry)] == sorted(with_expiry, key=lambda b: b.expires_at or T0)
    assert all(b.expires_at is None for b in expiring.items[len(with_expiry) :])


async def test_list_filters(store: BudgetStore, make_budget: MakeBudget) -> None:
    """scope_kind, scope_target_id, is_active, period and query filter, and combine."""
    budgets = await seeded(store, make_budget)

    async def ids(**kwargs: object) -> set[str]:
        page = await store.page("default", BudgetListQuery(limit=200, **kwargs))  # type: ignore[arg-type]
        return {b.budget_id for b in page.items}

    def where(pred: Callable[[Budget], bool]) -> set[str]:
        return {b.budget_id for b in budgets if pred(b)}

    kinds = frozenset({ScopeKind.IDENTITY, ScopeKind.MODEL})
    assert await ids(scope_kinds=kinds) == where(lambda b: b.scope_kind in kinds)
    assert await ids(scope_target_id="target-5") == where(lambda b: b.scope_target == "target-5")
    assert await ids(is_active=False) == where(lambda b: not b.is_active)
    periods = frozenset({Period.DAILY})
    assert await ids(periods=periods) == where(lambda b: b.period is Period.DAILY)
    assert await ids(query="TEAM-3") == where(lambda b: "team-3" in b.cel)
    assert await ids(query=budgets[0].budget_id.lower()) == {budgets[0].budget_id}
    assert await ids(is_active=True, scope_kinds=frozenset({ScopeKind.IDENTITY})) == where(
        lambda b: b.is_active and b.scope_kind is ScopeKind.IDENTITY
    )
    assert len(await ids()) == 12
    empty = await store.page("nowhere", BudgetListQuery())
    assert empty.items == [] and not empty.has_more


async def test_sqlite_store_survives_reopen(make_budget: MakeBudget, tmp_path: Path) -> None:
    """Budgets written through to SQLite come back, every field, indexed, after reopening the file."""
    path = str(tmp_path / "state.db")
    store = SqliteBudgetStore(path)
    full = make_budget(
        kind=ScopeKind.IDENTITY,
        target="u1",
        amount_nanos=5,
        token_limit=7,
        rpm=3,
        alerts=(Alert("a1", 50, ("n1", "n2")),),
        expires_at=T0 + timedelta(days=3),
        time_zone="Europe/Paris",
        period=Period.WEEKLY,
    )
    custom = make_budget(kind=None, cel='metadata.team == "ml"', period=None, token_limit=9)
    gone = make_budget(kind=ScopeKind.PROJECT, target="p")
    for budget in (full, custom, gone):
        await store.create(budget)
    with pytest.raises(BudgetConflict):
        await store.create(make_budget(kind=ScopeKind.IDENTITY, target="u1"))
    changed = await store.replace(replace(custom, is_active=False, updated_at=T0 + timedelta(hours=1)))
    await store.delete("default", gone.budget_id)
    await store.aclose()

    reopened = SqliteBudgetStore(path)
    assert await reopened.get("default", full.budget_id) == full
    assert await reopened.get("default", custom.budget_id) == changed
    assert await reopened.get("default", gone.budget_id) is None and len(reopened) == 2
    assert await reopened.matching(RequestFacts(workspace="default", identity="u1"), T0) == [full]
    with pytest.raises(BudgetConflict):  # uniqueness is rebuilt too
        await reopened.create(make_budget(kind=ScopeKind.IDENTITY, target="u1"))
    await reopened.aclose()


def test_store_from_url(tmp_path: Path) -> None:
    """`[storage] state` picks the store; anything else is an error naming the setting."""
    assert type(budget_store_from_url("memory")) is InMemoryBudgetStore
    assert isinstance(budget_store_from_url(f"sqlite://{tmp_path}/s.db"), SqliteBudgetStore)
    assert isinstance(budget_store_from_url("postgres://x"), PostgresBudgetStore)  # no network until open()
    assert isinstance(budget_store_from_url("postgresql://postgres@127.0.0.1:1/x"), PostgresBudgetStore)
    for bad in ("sqlite://", "postgre://x", f"sqlite://{tmp_path}/missing-dir/s.db"):
        with pytest.raises(ValueError, match=r"\[storage\] state"):
            budget_store_from_url(bad)


def test_budgets_survive_a_restart(proxy_factory: Any, fake: Any, tmp_path: Path) -> None:
    """With `[storage] state = sqlite:///...`, a budget created on one proxy is there after a restart."""
    config = {"storage": {"state": f"sqlite://{tmp_path}/state.db"}}
    _app, server = proxy_factory(config)
    created = httpx.post(
        server.url + "/v2/budgets", json={"scope": {"workspace": {}}, "limits": {"amount": 1}}
    )
    assert created.status_code == 200
    server.stop()
    _app, server = proxy_factory(config)
    got = httpx.get(server.url + "/v2/budgets/" + created.json()["budget"]["budgetId"])
    assert got.status_code == 200 and got.json()["budget"]["limits"] == {"amount": 1.0}
