"""The Redis counters' hot path (`budgets/_resp.py`): reserve / settle / release pipelined on one
connection, against the machine's Redis (a fresh key prefix per test)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from ulid import ULID

from orq_proxy.budgets.counters import Reservation
from orq_proxy.budgets.models import Usage
from orq_proxy.budgets.redis_counters import RedisCounters, redis_counters_from_url
from tests.budgets.conftest import T0, MakeBudget

USD = 1_000_000_000


@pytest.fixture
async def counters(redis_url: str) -> AsyncIterator[RedisCounters]:
    prefix = f"test-orq:{ULID()}:"
    backend = redis_counters_from_url(redis_url, prefix=prefix)
    assert backend._hot_path is not None  # hiredis is installed (dev extra): the pipelined path is used
    try:
        yield backend
    finally:
        keys = [key async for key in backend.client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await backend.client.delete(*keys)
        await backend.aclose()


async def test_concurrent_calls_on_one_connection_each_get_their_own_reply(
    make_budget: MakeBudget, counters: RedisCounters
) -> None:
    """200 reservations in flight at once, each of a different size, on one budget per call: every reply
    is matched to its own command (a reply given to the wrong caller would show as a wrong usage)."""
    budgets = [make_budget(amount_nanos=1000 * USD, token_limit=10**9) for _ in range(200)]
    results = await asyncio.gather(
        *(counters.reserve("default", [b], (i + 1) * USD, i + 1, T0) for i, b in enumerate(budgets))
    )
    assert all(isinstance(r, Reservation) for r in results)
    await asyncio.gather(
        *(
            counters.settle(r, (i + 1) * USD, i + 1, T0)
            for i, r in enumerate(results)
            if isinstance(r, Reservation)
        )
    )
    usages = await asyncio.gather(*(counters.usage(b, T0) for b in budgets))
    assert usages == [Usage((i + 1) * USD, i + 1, 1) for i in range(200)]


async def test_a_redis_that_forgot_its_scripts_is_sent_them_again(
    make_budget: MakeBudget, counters: RedisCounters, redis_url: str
) -> None:
    """After SCRIPT FLUSH (what a restarted Redis looks like to EVALSHA), the next call still works."""
    budget = make_budget(amount_nanos=10 * USD, token_limit=1000)
    first = await counters.reserve("default", [budget], 1 * USD, 10, T0)
    assert isinstance(first, Reservation)
    with redis.Redis.from_url(redis_url) as client:
        client.script_flush()
    second = await counters.reserve("default", [budget], 2 * USD, 10, T0)
    assert isinstance(second, Reservation)
    await counters.settle(first, 1 * USD, 10, T0)
    await counters.settle(second, 2 * USD, 10, T0)
    assert await counters.usage(budget, T0) == Usage(3 * USD, 20, 2)


async def test_a_connection_the_server_closed_is_replaced(
    make_budget: MakeBudget, counters: RedisCounters, redis_url: str
) -> None:
    """CLIENT KILL of the pipelined connection: the next call connects again (no restart, no 503)."""
    budget = make_budget(amount_nanos=10 * USD, token_limit=1000)
    assert isinstance(await counters.reserve("default", [budget], 1 * USD, 10, T0), Reservation)
    hot_path = counters._hot_path
    assert hot_path is not None and hot_path._protocol is not None and hot_path._protocol.transport
    host, port = hot_path._protocol.transport.get_extra_info("sockname")[:2]
    with redis.Redis.from_url(redis_url) as client:
        assert client.client_kill(f"{host}:{port}")  # only our pipelined connection
    await asyncio.sleep(0.1)  # the close reaches our transport
    assert isinstance(await counters.reserve("default", [budget], 1 * USD, 10, T0), Reservation)
