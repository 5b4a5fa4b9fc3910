"""Redis counters survive what Redis can suffer: a restart without persistence is detected (no generation
marker) and the counters are rebuilt from the event store; replicas rebuilding at once do not double-count;
a stalled Redis fails requests closed within the client's socket timeout; reservations expire after a TTL
derived from the upstreams' timeouts. Each test runs its own `redis-server` (`own_redis`), never the
machine's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
from orq_ai_sdk import Orq

from orq_proxy.app import OrqProxy, build_app
from orq_proxy.budgets.counters import Reservation
from orq_proxy.budgets.ledger import rebuild_counters
from orq_proxy.budgets.redis_counters import RedisCounters, redis_counters_from_url
from orq_proxy.budgets.store import InMemoryBudgetStore
from orq_proxy.config import ProxyConfig
from orq_proxy.eventstore.duckdb import DuckDBEventStore
from orq_proxy.services import build_services
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.events import UsageEvent
from tests.budgets.conftest import OwnRedis, budget_usage, new_budget

UPSTREAM_KEY = "sk-upstream-secret"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


def _proxy(
    tmp_path: Path, upstream_url: str, redis_url: str, **storage: Any
) -> tuple[OrqProxy, ServerThread]:
    config = ProxyConfig.model_validate(
        {
            "upstreams": {"openai": {"base_url": upstream_url, "api_key": UPSTREAM_KEY}},
            "storage": {
                "state": f"sqlite:///{tmp_path / 'state.db'}",
                "events": f"duckdb:///{tmp_path / 'events.duckdb'}",
                "counters": redis_url,
                **storage,
            },
        }
    )
    app = build_app(config)
    return app, ServerThread(app).start()


def _call(server: ServerThread) -> int:
    """One chat completion: its total tokens, or minus the status of the proxy's refusal."""
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=30) as client:
        try:
            answer = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=8)
        except openai.APIStatusError as exc:
            return -exc.status_code
    assert answer.usage is not None
    return answer.usage.total_tokens


def _wait_for_events(app: OrqProxy, count: int) -> None:
    """Until the sink bus has written `count` events to the event store (it flushes every 0.25 s)."""
    store = app.services.event_store
    assert isinstance(store, DuckDBEventStore)
    deadline = time.monotonic() + 10
    while store.count() < count:
        assert time.monotonic() < deadline, "the events never reached the event store"
        time.sleep(0.02)


def test_spend_survives_a_redis_restart(tmp_path: Path, upstream_url: str, own_redis: OwnRedis) -> None:
    """A token budget spent to its limit; Redis restarts empty: the next request is still refused and
    `GET /v2/budgets/{id}` shows the same usage, whether a proxied call or the API reads first."""
    app, server = _proxy(tmp_path, upstream_url, own_redis.url)
    try:
        with Orq(server_url=server.url, timeout_ms=10_000) as orq:
            created = orq.budgets.create(
                scope={"workspace": {}}, limits={"period": "BUDGET_PERIOD_MONTHLY", "token_limit": 100}
            ).budget
        assert created is not None
        budget_id = created.budget_id
        admitted = 0
        while (tokens := _call(server)) > 0:
            admitted += 1
        assert tokens == -429 and admitted >= 2
        before = budget_usage(server, budget_id)
        assert before[1] > 0
        _wait_for_events(app, admitted + 1)  # the refused call is an event too (no tokens)

        own_redis.stop()
        own_redis.start()  # same port, empty dataset
        assert _call(server) == -429  # a proxied call first: rebuilt before the reservation
        assert budget_usage(server, budget_id)[:2] == before[:2]

        own_redis.stop()
        own_redis.start()
        assert budget_usage(server, budget_id)[:2] == before[:2]  # the API first: rebuilt before it answers
        assert _call(server) == -429
    finally:
        server.stop()


def _event(budget_id: str, ts: datetime, cost: int, tokens: int) -> UsageEvent:
    return UsageEvent(
        event_id=f"e{ts.timestamp()}",
        timestamp=ts,
        workspace="default",
        project="default",
        api_key_id="k",
        total_cost_nanos=cost,
        total_tokens=tokens,
        latency_ms=5.0,
        budget_ids=[budget_id],
    )


async def test_replicas_rebuilding_at_once_do_not_double_count(own_redis: OwnRedis) -> None:
    """Two replicas (two `RedisCounters` on one Redis) find the marker missing and rebuild from the same
    ledger at once: exactly one restore writes, and the counters hold the ledger's sum once."""
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    budget = new_budget(token_limit=10_000)
    ledger = DuckDBEventStore()
    ledger.insert([_event(budget.budget_id, now.replace(hour=h), 100 * h, h) for h in (1, 2, 3)])
    store = InMemoryBudgetStore([budget])
    replicas = [redis_counters_from_url(own_redis.url) for _ in range(2)]
    try:
        assert await replicas[0].generation() is None
        restored = await asyncio.gather(*(rebuild_counters(store, r, ledger, now) for r in replicas))
        assert sorted(restored) == [0, 1]
        generation = await replicas[0].generation()
        assert generation is not None
        for replica in replicas:
            got = await replica.usage(budget, now)
            assert (got.amount_nanos, got.tokens) == (600, 6)
        # Racing the restore script itself: the second finds the marker and writes nothing.
        consumed = await asyncio.to_thread(
            ledger.budget_consumption, {budget.budget_id: now.replace(day=1)}, now
        )
        entries = [(budget, consumed[budget.budget_id])]
        assert await replicas[1].restore(entries, now) is False
        assert await replicas[0].generation() == generation
        # Once rebuilt, both replicas count on top of it.
        reservation = await replicas[1].reserve("default", [budget], 10, 1, now)
        assert isinstance(reservation, Reservation)
        await replicas[1].settle(reservation, 7, 1, now)
        got = await replicas[0].usage(budget, now)
        assert (got.amount_nanos, got.tokens) == (607, 7)
    finally:
        for replica in replicas:
            await replica.aclose()
        ledger.close()


def test_a_stalled_redis_fails_closed_within_the_socket_timeout(
    tmp_path: Path, upstream_url: str, own_redis: OwnRedis
) -> None:
    """SIGSTOP the Redis: a proxied call gets 503 within the socket timeout (it does not hang for the
    stall), and the proxy serves again once Redis resumes."""
    _app, server = _proxy(tmp_path, upstream_url, own_redis.url, redis_socket_timeout=0.5)
    # If the client hung, the stall ends after 8 s anyway (the test then fails on the time it took).
    stall_over = threading.Timer(8.0, own_redis.resume)
    try:
        with Orq(server_url=server.url, timeout_ms=10_000) as orq:
            orq.budgets.create(scope={"workspace": {}}, limits={"amount": 5.0})
        assert _call(server) > 0
        own_redis.pause()
        stall_over.start()
        started = time.monotonic()
        assert _call(server) == -503
        assert time.monotonic() - started < 3.0  # socket timeout 0.5 s (+ the pool's wait, + the settle)
        listed = httpx.get(server.url + "/v2/budgets", timeout=30)
        assert listed.status_code == 503
        own_redis.resume()
        assert _call(server) > 0
    finally:
        stall_over.cancel()
        own_redis.resume()
        server.stop()


async def test_reservation_ttl_is_derived_from_the_upstream_timeouts(own_redis: OwnRedis) -> None:
    """Without `[budgets] reservation_ttl`, a reservation expires after the longest connect + headers +
    read timeout of the upstreams; the setting wins. A request settling after its reservation expired is
    still charged (the reservation key outlives the reservation)."""
    upstreams = {
        "a": {
            "base_url": "http://127.0.0.1:9",
            "connect_timeout": 1,
            "headers_timeout": 2,
            "read_timeout": 3,
        },
        "b": {
            "base_url": "http://127.0.0.1:9",
            "connect_timeout": 5,
            "headers_timeout": 10,
            "read_timeout": 20.5,
        },
    }
    for budgets, want in (({}, 36), ({"reservation_ttl": 90}, 90)):
        config = ProxyConfig.model_validate(
            {"upstreams": upstreams, "storage": {"counters": own_redis.url}, "budgets": budgets}
        )
        services = build_services(config)
        counters = services.budget_counters
        assert isinstance(counters, RedisCounters) and counters.reservation_ttl == want
        await counters.aclose()
        await services.event_store.aclose()

    counters = redis_counters_from_url(own_redis.url, reservation_ttl=36)
    try:
        now = datetime(2026, 3, 10, 12, tzinfo=UTC)
        budget = new_budget(amount_nanos=1_000)
        reservation = await counters.reserve("default", [budget], 400, 4, now)
        assert isinstance(reservation, Reservation)
        base = counters._base(budget)
        [(_member, expires)] = await counters.client.zrange(base + ":rs", 0, -1, withscores=True)
        assert expires == now.timestamp() + 36
        key_ttl = await counters.client.ttl(counters._reservation_key("default", reservation.reservation_id))
        assert key_ttl > 36 + 3600
        later = datetime.fromtimestamp(now.timestamp() + 37, UTC)
        # The expired estimate is given back to the next request...
        other = await counters.reserve("default", [budget], 700, 1, later)
        assert isinstance(other, Reservation)
        await counters.release(other, later)
        assert await counters.reserved(budget) == (0, 0)
        # ... and the late settlement still charges the actual usage.
        await counters.settle(reservation, 300, 3, later)
        got = await counters.usage(budget, later)
        assert (got.amount_nanos, got.tokens) == (300, 3)
    finally:
        await counters.aclose()
