"""Rebuilding budget counters from the event store, the ledger behind them.

Every usage event names the budgets its request was charged to (`UsageEvent.budget_ids`), so what a
budget consumed in its current window is a sum over the events that settled inside it (from its
`counting_since` when a reset or a period change came later). In-memory counters start empty with the
process; with durable records (`[storage] state = "sqlite:///..."`) and a file event store
(`events = "duckdb:///..."`), the app calls `rebuild_counters` at startup so spend survives a restart.
Redis counters are rebuilt the same way when Redis has lost its dataset (no generation marker: see
`redis_counters.py`), at startup or when a request finds the marker gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from orq_proxy.budgets.counters import RATE_WINDOW_SECONDS, InMemoryCounters
from orq_proxy.budgets.periods import window
from orq_proxy.budgets.redis_counters import RedisCounters
from orq_proxy.budgets.store import BudgetStore
from orq_proxy.usage.events import BudgetConsumption

__all__ = ["BudgetLedger", "counting_start", "rebuild_counters"]


@runtime_checkable
class BudgetLedger(Protocol):
    """The read the rebuild needs from an event store (the event store implements it)."""

    def budget_consumption(
        self, since: Mapping[str, datetime], requests_since: datetime
    ) -> dict[str, BudgetConsumption]:
        """Per budget id, what events settled at or after its `since` charged it (blocking)."""
        ...


def counting_start(budget_window_start: datetime, counting_since: datetime | None) -> datetime:
    """Where a budget's current count begins: its window's start, or a later reset / period change."""
    if counting_since is not None and counting_since > budget_window_start:
        return counting_since
    return budget_window_start


async def rebuild_counters(
    store: BudgetStore, counters: InMemoryCounters | RedisCounters, ledger: BudgetLedger, now: datetime
) -> int:
    """Set every budget's current-window consumption from the ledger; how many budgets had any.

    One query, in a worker thread; the app runs it at startup, before the first request. Redis counters
    that still have their generation marker are left as they are (0, no query); otherwise they are
    restored in one script, unless another replica restored them first (then 0 as well).
    """
    if isinstance(counters, RedisCounters) and await counters.generation() is not None:
        return 0
    budgets = {b.budget_id: b for b in await store.all_budgets()}
    since = {
        budget_id: counting_start(window(b.effective_period, now, b.time_zone)[0], b.counting_since)
        for budget_id, b in budgets.items()
    }
    requests_since = now - timedelta(seconds=RATE_WINDOW_SECONDS)
    consumed = await asyncio.to_thread(ledger.budget_consumption, since, requests_since)
    if isinstance(counters, RedisCounters):
        restored = await counters.restore([(budgets[i], usage) for i, usage in consumed.items()], now)
        return len(consumed) if restored else 0
    for budget_id, usage in consumed.items():
        counters.restore(budgets[budget_id], usage.cost_nanos, usage.tokens, usage.request_times, now)
    return len(consumed)
