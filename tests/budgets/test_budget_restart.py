"""Budget spend survives a restart: with durable records (SQLite) and a file event store (DuckDB), the
in-memory counters are rebuilt from the events at startup, so a budget admits no more after a restart than
it would have without one. Real proxies on sockets, the real `openai` and `orq-ai-sdk` clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import openai
import pytest
from orq_ai_sdk import Orq

from orq_proxy.app import build_app
from orq_proxy.budgets.counters import InMemoryCounters
from orq_proxy.budgets.ledger import rebuild_counters
from orq_proxy.budgets.models import Period
from orq_proxy.budgets.store import InMemoryBudgetStore
from orq_proxy.config import ProxyConfig
from orq_proxy.eventstore.duckdb import EVENT_COLUMNS, EVENTS_TABLE, DuckDBEventStore
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.events import UsageEvent
from tests.budgets.conftest import budget_usage, new_budget

UPSTREAM_KEY = "sk-upstream-secret"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]

Start = Callable[[], ServerThread]


@pytest.fixture
def durable(tmp_path: Path, upstream_url: str) -> Any:
    """`start()` -> a proxy on the same SQLite state and DuckDB event files each time (stop the last one
    before starting the next: one process at a time owns the DuckDB file)."""
    config = ProxyConfig.model_validate(
        {
            "upstreams": {"openai": {"base_url": upstream_url, "api_key": UPSTREAM_KEY}},
            "storage": {
                "state": f"sqlite:///{tmp_path / 'state.db'}",
                "events": f"duckdb:///{tmp_path / 'events.duckdb'}",
            },
        }
    )
    running: list[ServerThread] = []

    def start() -> ServerThread:
        server = ServerThread(build_app(config)).start()
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def call(server: ServerThread, **extra: Any) -> int:
    """One chat completion; its total tokens, or -429 when the budget refused it."""
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as client:
        try:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=8, **extra
            )
        except openai.RateLimitError:
            return -429
    assert answer.usage is not None
    return answer.usage.total_tokens


def spend_until_refused(server: ServerThread, limit: int = 50) -> list[int]:
    """Tokens of each admitted call until the first 429."""
    spent = []
    for _ in range(limit):
        tokens = call(server)
        if tokens == -429:
            return spent
        spent.append(tokens)
    raise AssertionError("the budget never refused")


def token_budget(server: ServerThread, **limits: Any) -> str:
    """A MONTHLY workspace budget with these limits; its id."""
    with Orq(server_url=server.url, timeout_ms=10_000) as orq:
        limits = {"period": "BUDGET_PERIOD_MONTHLY", **limits}
        created = orq.budgets.create(scope={"workspace": {}}, limits=limits)
    assert created.budget is not None
    return created.budget.budget_id


def test_spend_survives_a_restart(durable: Any) -> None:
    """A MONTHLY token budget: what was spent before the restart still counts after it, and the budget
    admits exactly as many calls in all as one that never restarted."""
    first = durable()
    budget_id = token_budget(first, token_limit=100)
    before = [call(first) for _ in range(2)]
    assert -429 not in before
    used_before = budget_usage(first, budget_id)
    assert used_before[1] == sum(before) > 0
    first.stop()

    second = durable()
    assert budget_usage(second, budget_id)[:2] == used_before[:2]  # spend and tokens came back
    after = spend_until_refused(second)
    second.stop()

    # The same budget without a restart: exactly as many calls are admitted in all. (A new budget counts
    # only events charged to it, so the earlier traffic in the same files does not count against it.)
    third = durable()
    with Orq(server_url=third.url) as orq:
        orq.budgets.delete(budget_id=budget_id)
    token_budget(third, token_limit=100)
    control = spend_until_refused(third)
    assert len(before) + len(after) == len(control)
    assert before + after == control


def test_cost_and_rate_window_survive_a_restart(durable: Any) -> None:
    """USD spend and the rolling request window are rebuilt too: a budget with 2 requests per minute that
    used both before the restart refuses the next request after it."""
    first = durable()
    with Orq(server_url=first.url) as orq:
        created = orq.budgets.create(
            scope={"workspace": {}},
            limits={"period": "BUDGET_PERIOD_DAILY", "amount": 5.0},
            rate_limit={"requests_per_minute": 2},
        ).budget
    assert created is not None
    budget_id = created.budget_id
    assert call(first) > 0 and call(first) > 0
    used = budget_usage(first, budget_id)
    assert used[0] > 0 and used[2] == 2
    first.stop()

    second = durable()
    assert budget_usage(second, budget_id) == used
    assert call(second) == -429  # the window still holds the two requests from before the restart


def test_a_reset_survives_a_restart(durable: Any) -> None:
    """reset-consumption before a restart stays a reset after it: only what settled later counts."""
    first = durable()
    budget_id = token_budget(first, token_limit=1000)
    call(first)
    with Orq(server_url=first.url) as orq:
        orq.budgets.reset_consumption(budget_id=budget_id, reset_budget_consumption_request={})
    after_reset = call(first)
    first.stop()

    second = durable()
    assert budget_usage(second, budget_id)[1] == after_reset


def test_in_memory_state_says_it_is_not_durable(upstream_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """With `state = "memory"` startup says that identities, budgets and their spend end with the process."""
    config = ProxyConfig.model_validate({"upstreams": {"openai": {"base_url": upstream_url}}})
    with caplog.at_level(logging.WARNING, logger="orq_proxy.app"):
        build_app(config)
    assert any("last only as long as this process" in r.getMessage() for r in caplog.records)


def _event(budget_ids: list[str], ts: datetime, latency_ms: float, cost: int, tokens: int) -> UsageEvent:
    return UsageEvent(
        event_id=f"e{ts.timestamp()}",
        timestamp=ts,
        workspace="default",
        project="default",
        api_key_id="k",
        total_cost_nanos=cost,
        total_tokens=tokens,
        latency_ms=latency_ms,
        budget_ids=budget_ids,
    )


async def test_rebuild_counts_each_event_in_the_window_it_settled_in() -> None:
    """The ledger charges an event when its request finished, as the counters did: a request that arrived
    before midnight and finished after it counts in the new day; other budgets' events do not count."""
    midnight = datetime(2026, 3, 10, tzinfo=UTC)
    now = midnight + timedelta(hours=1)
    daily = new_budget(period=Period.DAILY, token_limit=10_000, budget_id="daily")
    other = new_budget(kind=None, cel="", period=Period.DAILY, token_limit=10_000, budget_id="other")
    store = DuckDBEventStore()
    store.insert(
        [
            _event(["daily"], midnight - timedelta(minutes=5), 1_000.0, 1, 10),  # yesterday
            _event(["daily"], midnight - timedelta(seconds=1), 2_000.0, 2, 20),  # settled today
            _event(["daily", "other"], midnight + timedelta(minutes=30), 5.0, 4, 40),
            _event(["daily"], now - timedelta(seconds=10), 5.0, 8, 80),  # inside the rate window
            _event([], now - timedelta(seconds=5), 5.0, 16, 160),  # no budget
        ]
    )
    counters = InMemoryCounters()
    restored = await rebuild_counters(InMemoryBudgetStore([daily, other]), counters, store, now)
    assert restored == 2
    got = await counters.usage(daily, now)
    assert (got.amount_nanos, got.tokens, got.requests) == (2 + 4 + 8, 20 + 40 + 80, 1)
    got = await counters.usage(other, now)
    assert (got.amount_nanos, got.tokens, got.requests) == (4, 40, 0)
    store.close()


def test_an_event_file_from_before_budget_ids_is_migrated(tmp_path: Path) -> None:
    """A DuckDB file written before events carried `budget_ids` gets the column when opened."""
    path = str(tmp_path / "old.duckdb")
    old_columns = {k: v for k, v in EVENT_COLUMNS.items() if k != "budget_ids"}
    conn = duckdb.connect(path)
    conn.execute(f"CREATE TABLE {EVENTS_TABLE} ({', '.join(f'{k} {v}' for k, v in old_columns.items())})")
    conn.close()
    store = DuckDBEventStore(path)
    store.insert([_event(["b1"], datetime(2026, 3, 10, tzinfo=UTC), 1.0, 3, 5)])
    got = store.budget_consumption(
        {"b1": datetime(2026, 3, 1, tzinfo=UTC)}, datetime(2026, 3, 10, tzinfo=UTC)
    )
    assert got["b1"][:2] == (3, 5)
    store.close()
