"""The Redis counters' hot path (`budgets/_resp.py`): reserve / settle / release pipelined on one
connection, against the machine's Redis (a fresh key prefix per test)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
import redis.asyncio
from ulid import ULID

from orq_proxy.budgets.counters import Rejection, Reservation
from orq_proxy.budgets.models import Alert, Period, Usage
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


async def test_a_changed_budget_is_encoded_again(make_budget: MakeBudget, counters: RedisCounters) -> None:
    """Each budget's arguments are encoded once and kept; an updated record (a new object with the same id,
    as the store makes) is encoded again: its new limit and its new alert apply at once."""
    budget = make_budget(amount_nanos=10 * USD)
    first = await counters.reserve("default", [budget], 4 * USD, 1, T0)
    assert isinstance(first, Reservation)
    await counters.settle(first, 4 * USD, 1, T0)
    lowered = dataclasses.replace(budget, amount_nanos=5 * USD, alerts=(Alert("half", 50, ()),))
    refused = await counters.reserve("default", [lowered], 2 * USD, 1, T0)
    assert isinstance(refused, Rejection) and refused.limit == 5 * USD
    second = await counters.reserve("default", [lowered], 1 * USD, 1, T0)
    assert isinstance(second, Reservation)
    [crossing] = await counters.settle(second, 1 * USD, 1, T0)  # 5 of 5 USD: the new 50% alert fires
    assert crossing.alert.id == "half" and crossing.used_nanos == 5 * USD
    same = dataclasses.replace(lowered)  # an equal record, another object: the kept encoding still serves
    assert isinstance(await counters.reserve("default", [same], 0, 1, T0), Rejection)


@pytest.mark.parametrize("workspace", ["default", "équipe-北"])
async def test_keys_and_values_of_any_text_and_size(
    make_budget: MakeBudget, counters: RedisCounters, workspace: str
) -> None:
    """Non-ASCII workspaces (bulk lengths are in bytes), zero amounts (no '-0' give-back) and times with
    microseconds go through reserve, settle and release unchanged."""
    budget = make_budget(amount_nanos=10 * USD, token_limit=100, workspace=workspace)
    now = T0.replace(microsecond=123_457)
    zero = await counters.reserve(workspace, [budget], 0, 0, now)
    assert isinstance(zero, Reservation)
    await counters.settle(zero, 0, 0, now)
    held = await counters.reserve(workspace, [budget], 3 * USD, 30, now)
    assert isinstance(held, Reservation)
    assert await counters.reserved(budget) == (3 * USD, 30)
    await counters.release(held, now)
    spent = await counters.reserve(workspace, [budget], 2 * USD, 20, now)
    assert isinstance(spent, Reservation)
    await counters.settle(spent, 1 * USD, 7, now)
    assert await counters.reserved(budget) == (0, 0)
    assert await counters.usage(budget, now) == Usage(1 * USD, 7, 3)
    assert await counters.client.exists(counters._reservation_key(workspace, spent.reservation_id)) == 0


async def test_without_the_pipelined_client_the_pool_carries_the_same_commands(
    make_budget: MakeBudget, redis_url: str
) -> None:
    """`RedisCounters` on a plain redis-py client (what `rediss://` or a missing hiredis gets) sends the same
    encoded commands on the pool, sends a script again after SCRIPT FLUSH, and replaces a pooled connection
    that the server closed."""
    prefix = f"test-orq:{ULID()}:"
    name = f"test-orq-{ULID()}"
    client = redis.asyncio.Redis.from_url(redis_url, client_name=name)
    counters = RedisCounters(client, prefix=prefix, reservation_ttl=30)
    assert counters._hot_path is None
    try:
        budget = make_budget(amount_nanos=10 * USD, alerts=(Alert("a", 50, ()),))
        first = await counters.reserve("default", [budget], 6 * USD, 10, T0)
        assert isinstance(first, Reservation)
        refused = await counters.reserve("default", [budget], 5 * USD, 10, T0)
        assert isinstance(refused, Rejection) and refused.used == 6 * USD
        with redis.Redis.from_url(redis_url) as client:
            client.script_flush()
        [crossing] = await counters.settle(first, 6 * USD, 10, T0)
        assert crossing.alert.id == "a"
        with redis.Redis.from_url(redis_url) as admin:
            [ours] = [c for c in admin.client_list() if c["name"] == name]  # the one pooled connection
            assert admin.client_kill(ours["addr"])
        second = await counters.reserve("default", [budget], 1 * USD, 1, T0)
        assert isinstance(second, Reservation)
        await counters.settle(second, 1 * USD, 1, T0)
        assert await counters.usage(budget, T0) == Usage(7 * USD, 11, 2)
    finally:
        keys = [key async for key in counters.client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await counters.client.delete(*keys)
        await counters.aclose()


async def test_amounts_crossing_2_to_the_53_stay_exact(
    make_budget: MakeBudget, counters: RedisCounters
) -> None:
    """Sums that pass 2^53 (here 2^53 + 1, which a Lua double rounds to 2^53) are kept exactly: the scripts
    add with HINCRBY (64-bit integers), never by writing back a sum computed in Lua."""
    budget = make_budget(amount_nanos=9 * 10**18, token_limit=10**18)
    for cost in (2**53 - 1, 2):
        res = await counters.reserve("default", [budget], cost, cost, T0)
        assert isinstance(res, Reservation)
        await counters.settle(res, cost, cost, T0)
    assert await counters.usage(budget, T0) == Usage(2**53 + 1, 2**53 + 1, 2)
    held = await counters.reserve("default", [budget], 2**53 - 1, 1, T0)
    assert isinstance(held, Reservation)
    assert isinstance(await counters.reserve("default", [budget], 2, 1, T0), Reservation)
    assert await counters.reserved(budget) == (2**53 + 1, 2)


async def test_a_budget_listed_twice_is_reserved_twice(
    make_budget: MakeBudget, counters: RedisCounters
) -> None:
    """The same budget twice in one reservation is charged twice, as in memory (a script that wrote back
    what it read before its first write would charge it once)."""
    budget = make_budget(amount_nanos=10 * USD)
    assert isinstance(await counters.reserve("default", [budget, budget], 2 * USD, 3, T0), Reservation)
    assert await counters.reserved(budget) == (4 * USD, 6)


async def test_a_window_s_hash_expires_a_day_after_the_window(
    make_budget: MakeBudget, counters: RedisCounters
) -> None:
    """A budget's hash gets its expiry (a day after its window ends, by the proxy's clock) when it starts a
    window, and a new one when a period change starts another; settling keeps it."""
    budget = make_budget(amount_nanos=10 * USD)  # monthly: the window ends 2026-02-01
    res = await counters.reserve("default", [budget], 1 * USD, 1, T0)
    assert isinstance(res, Reservation)
    await counters.settle(res, 1 * USD, 1, T0)
    key = counters._base(budget) + ":h"
    month_end = datetime(2026, 2, 1, tzinfo=UTC)
    assert abs(await counters.client.ttl(key) - ((month_end - T0).total_seconds() + 86_400)) <= 2
    weekly = dataclasses.replace(budget, period=Period.WEEKLY)  # the week of Thursday 2026-01-15 ends Monday
    assert isinstance(await counters.reserve("default", [weekly], 1 * USD, 1, T0), Reservation)
    week_end = datetime(2026, 1, 19, tzinfo=UTC)
    assert abs(await counters.client.ttl(key) - ((week_end - T0).total_seconds() + 86_400)) <= 2
    assert await counters.usage(weekly, T0) == Usage(
        0, 0, 2
    )  # (a new window: the monthly spend is not in it)


@pytest.mark.parametrize("settle_after", [timedelta(0), timedelta(days=20)])
async def test_several_budgets_in_one_call(
    make_budget: MakeBudget, counters: RedisCounters, settle_after: timedelta
) -> None:
    """Reserve and settle across three budgets (one with an alert, one of another period) in one call each,
    settled in the same window or after the monthly ones rolled over (the reserved start is then sent)."""
    monthly = make_budget(amount_nanos=10 * USD, alerts=(Alert("m", 10, ()),))
    tokens = make_budget(token_limit=1000)
    yearly = make_budget(amount_nanos=100 * USD, period=Period.YEARLY)
    res = await counters.reserve("default", [monthly, tokens, yearly], 2 * USD, 20, T0)
    assert isinstance(res, Reservation)
    assert [await counters.reserved(b) for b in (monthly, tokens, yearly)] == [(2 * USD, 20)] * 3
    later = T0 + settle_after
    crossings = await counters.settle(res, 1 * USD, 10, later)
    assert [(c.budget.budget_id, c.alert.id) for c in crossings] == [(monthly.budget_id, "m")]
    assert [await counters.reserved(b) for b in (monthly, tokens, yearly)] == [(0, 0)] * 3
    for b in (monthly, tokens, yearly):  # each reservation found by its window's start, and removed
        assert await counters.client.zcard(counters._base(b) + ":rs") == 0
    usages = [await counters.usage(b, later) for b in (monthly, tokens, yearly)]
    requests = 0 if settle_after else 1  # (the rate window is 60 s)
    assert usages == [Usage(1 * USD, 10, requests)] * 3


async def test_settlements_and_reservations_interleaved_on_one_connection(
    make_budget: MakeBudget, counters: RedisCounters
) -> None:
    """Settlements and reservations of other requests interleaved in one turn of the event loop (one write):
    every call gets its own reply (a settlement's `[]` given to a reservation would not parse)."""
    budgets = [make_budget(amount_nanos=1000 * USD, token_limit=10**9) for _ in range(20)]
    first = await asyncio.gather(*(counters.reserve("default", [b], USD, 1, T0) for b in budgets))
    assert all(isinstance(r, Reservation) for r in first)
    calls = []
    for i, (budget, held) in enumerate(zip(budgets, first, strict=True)):
        assert isinstance(held, Reservation)
        calls += [
            counters.settle(held, (i + 1) * USD, i + 1, T0),
            counters.reserve("default", [budget], USD, 1, T0),
        ]
    results = await asyncio.gather(*calls)
    assert [r == [] for r in results[::2]] == [True] * 20  # settlements: no alert crossed
    assert all(isinstance(r, Reservation) for r in results[1::2])
    assert [await counters.usage(b, T0) for b in budgets] == [
        Usage((i + 1) * USD, i + 1, 2) for i in range(20)
    ]
    assert [await counters.reserved(b) for b in budgets] == [(USD, 1)] * 20


# --- settle_nowait: the settlement sent at once, its reply by callback --------------------------------------


async def test_settle_nowait_charges_once_and_reports_alerts(
    make_budget: MakeBudget, counters: RedisCounters
) -> None:
    """`settle_nowait` charges what `settle` would (and only once: the reservation is done once it is sent),
    and its future carries the alert crossings `settle` returns."""
    budget = make_budget(amount_nanos=10 * USD, token_limit=1000, alerts=(Alert("a50", 50, ()),))
    reservation = await counters.reserve("default", [budget], 6 * USD, 100, T0)
    assert isinstance(reservation, Reservation)
    pending = counters.settle_nowait(reservation, 6 * USD, 40, T0)
    assert pending is not None and reservation.done
    assert counters.settle_nowait(reservation, 6 * USD, 40, T0) is None  # already settled: nothing sent
    assert await counters.settle(reservation, 6 * USD, 40, T0) == []  # nor by the awaited path
    [crossing] = await pending
    assert (crossing.alert.id, crossing.used_nanos) == ("a50", 6 * USD)
    assert await counters.usage(budget, T0) == Usage(6 * USD, 40, 1)


async def test_settle_nowait_before_connecting_says_so(
    make_budget: MakeBudget, counters: RedisCounters, redis_url: str
) -> None:
    """With no open connection yet, `settle_nowait` sends nothing and says so (None): the caller awaits
    `settle`, which connects. The reservation is left open for it."""
    other = redis_counters_from_url(redis_url, prefix=counters.prefix)  # the same counters, never connected
    try:
        budget = make_budget(amount_nanos=10 * USD, token_limit=1000)
        reservation = await counters.reserve("default", [budget], 1 * USD, 10, T0)
        assert isinstance(reservation, Reservation)
        assert other.settle_nowait(reservation, 1 * USD, 10, T0) is None and not reservation.done
        await other.settle(reservation, 1 * USD, 10, T0)
        assert await counters.usage(budget, T0) == Usage(1 * USD, 10, 1)
    finally:
        await other.aclose()


async def test_settle_nowait_after_a_script_flush_sends_the_script(
    make_budget: MakeBudget, counters: RedisCounters, redis_url: str
) -> None:
    """A Redis that forgot its scripts answers NOSCRIPT: the callback sends `EVAL`, and the charge lands."""
    budget = make_budget(amount_nanos=10 * USD, token_limit=1000)
    reservation = await counters.reserve("default", [budget], 2 * USD, 10, T0)
    assert isinstance(reservation, Reservation)
    with redis.Redis.from_url(redis_url) as client:
        client.script_flush()
    pending = counters.settle_nowait(reservation, 2 * USD, 7, T0)
    assert pending is not None
    assert await pending == []
    assert await counters.usage(budget, T0) == Usage(2 * USD, 7, 1)


async def test_settle_nowait_on_a_lost_connection_fails_as_unavailable(
    make_budget: MakeBudget, counters: RedisCounters, redis_url: str
) -> None:
    """The connection killed while the settlement waits for its reply: the future fails with
    `ServiceUnavailable` (the gate logs it; the reservation expires after its TTL), never hangs."""
    from orq_proxy.errors import ServiceUnavailable

    budget = make_budget(amount_nanos=10 * USD, token_limit=1000)
    reservation = await counters.reserve("default", [budget], 1 * USD, 10, T0)
    assert isinstance(reservation, Reservation)
    hot_path = counters._hot_path
    assert hot_path is not None and hot_path._protocol is not None
    pending = counters.settle_nowait(reservation, 1 * USD, 10, T0)
    assert pending is not None
    hot_path._protocol.fail(ConnectionError("cut for the test"))  # as a lost connection does
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(pending, 5)
