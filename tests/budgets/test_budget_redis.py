"""RedisCounters specifics: replicas sharing one budget, once-only settlement across replicas, and
reservations of a dead replica given back after their TTL. (The common semantics are tested for both
backends in test_budget_counters.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from ulid import ULID

from orq_proxy.budgets.counters import Rejection, Reservation
from orq_proxy.budgets.models import Budget, Usage
from orq_proxy.budgets.redis_counters import RedisCounters, redis_counters_from_url

MakeBudget = Callable[..., Budget]
REDIS_URL = "redis://127.0.0.1:6379/0"
T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
USD = 1_000_000_000


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[RedisCounters, RedisCounters]]:
    """Two `RedisCounters` with their own connections and the same key prefix, like two proxies."""
    prefix = f"test-orq:{ULID()}:"
    a = redis_counters_from_url(REDIS_URL, prefix=prefix)
    b = redis_counters_from_url(REDIS_URL, prefix=prefix)
    b.reservation_ttl = a.reservation_ttl = 30
    try:
        yield a, b
    finally:
        keys = [key async for key in a.client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await a.client.delete(*keys)
        await a.aclose()
        await b.aclose()


async def test_replicas_share_the_limit(
    make_budget: MakeBudget, replicas: tuple[RedisCounters, RedisCounters]
) -> None:
    """200 concurrent reservations split over two replicas admit exactly what fits."""
    a, b = replicas
    budget = make_budget(amount_nanos=10 * USD)
    calls = [(a if i % 2 else b).reserve("default", [budget], USD, 1, T0) for i in range(200)]
    results = await asyncio.gather(*calls)
    assert sum(isinstance(r, Reservation) for r in results) == 10
    assert await a.reserved(budget) == (10 * USD, 10)


async def test_settlement_happens_once_across_replicas(
    make_budget: MakeBudget, replicas: tuple[RedisCounters, RedisCounters]
) -> None:
    """The same reservation settled by two replicas (or settled then released) is charged once."""
    a, b = replicas
    budget = make_budget(amount_nanos=10 * USD)
    res = await a.reserve("default", [budget], 3 * USD, 30, T0)
    assert isinstance(res, Reservation)
    twin = dataclasses.replace(res)  # another process's copy: its `done` flag is its own
    await a.settle(res, USD, 10, T0)
    await b.settle(twin, 2 * USD, 20, T0)
    await b.release(dataclasses.replace(res, done=False), T0)
    assert await b.usage(budget, T0) == Usage(USD, 10, 1)
    assert await a.reserved(budget) == (0, 0)


async def test_dead_replica_reservations_expire(
    make_budget: MakeBudget, replicas: tuple[RedisCounters, RedisCounters]
) -> None:
    """A reservation never settled (its replica died) is given back once its TTL has passed."""
    a, b = replicas
    budget = make_budget(amount_nanos=10 * USD)
    assert isinstance(await a.reserve("default", [budget], 8 * USD, 0, T0), Reservation)
    refused = await b.reserve("default", [budget], 5 * USD, 0, T0 + timedelta(seconds=29))
    assert isinstance(refused, Rejection) and refused.used == 8 * USD
    later = T0 + timedelta(seconds=31)
    assert isinstance(await b.reserve("default", [budget], 9 * USD, 0, later), Reservation)
    assert await b.reserved(budget) == (9 * USD, 0)
    with pytest.raises(ValueError, match="reservation_ttl"):
        RedisCounters(a.client, reservation_ttl=0)


async def test_large_amounts_stay_exact(
    make_budget: MakeBudget, replicas: tuple[RedisCounters, RedisCounters]
) -> None:
    """Nano-USD sums beyond 2^53 are kept exactly (HINCRBY), and usage reads them back as integers."""
    a, _ = replicas
    budget = make_budget(amount_nanos=9 * 10**18)
    res = await a.reserve("default", [budget], 2**53 + 1, 1, T0)
    assert isinstance(res, Reservation)
    await a.settle(res, 2**53 + 1, 1, T0)
    assert (await a.usage(budget, T0)).amount_nanos == 2**53 + 1
