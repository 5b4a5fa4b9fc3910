"""Counters (in memory and Redis, same tests): reserve/settle/release, all-or-nothing, period rollovers, the RPM window, alerts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from orq_proxy.budgets.counters import Counters, Rejection, Reservation
from orq_proxy.budgets.models import Alert, Budget, Period, ScopeKind, Usage
from orq_proxy.testing.clock import FakeClock

MakeBudget = Callable[..., Budget]

USD = 1_000_000_000
T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


async def reserve(
    counters: Counters, budgets: list[Budget], cost: int, tokens: int, now: datetime
) -> Reservation:
    result = await counters.reserve("default", budgets, cost, tokens, now)
    assert isinstance(result, Reservation), result
    return result


async def test_reserve_settle_replaces_estimate_by_actual(
    make_budget: MakeBudget, counters: Counters
) -> None:
    """A settled reservation leaves the actual usage as spent, and nothing reserved."""
    budget = make_budget(amount_nanos=10 * USD, token_limit=1000)
    res = await reserve(counters, [budget], 3 * USD, 400, T0)
    assert await counters.usage(budget, T0) == Usage(0, 0, 1)  # reserved is not usage
    await counters.settle(res, 1 * USD, 150, T0)
    assert await counters.usage(budget, T0) == Usage(1 * USD, 150, 1)
    # the freed estimate is available again: 1 spent + 9 requested = 10 fits exactly
    await reserve(counters, [budget], 9 * USD, 100, T0)


async def test_settle_and_release_happen_once(make_budget: MakeBudget, counters: Counters) -> None:
    """A second settle, a release after settle, or a settle after release change nothing."""
    budget = make_budget(amount_nanos=10 * USD)
    res = await reserve(counters, [budget], 2 * USD, 10, T0)
    await counters.settle(res, 1 * USD, 10, T0)
    await counters.settle(res, 5 * USD, 10, T0)
    await counters.release(res, T0)
    assert (await counters.usage(budget, T0)).amount_nanos == 1 * USD
    res2 = await reserve(counters, [budget], 9 * USD, 10, T0)
    await counters.release(res2, T0)
    await counters.settle(res2, 9 * USD, 10, T0)
    assert (await counters.usage(budget, T0)).amount_nanos == 1 * USD
    await reserve(counters, [budget], 9 * USD, 10, T0)  # the released 9 USD are free again


async def test_rejection_when_estimate_does_not_fit(make_budget: MakeBudget, counters: Counters) -> None:
    """`spent + reserved + estimate > limit` is refused, naming dimension, limit, used and requested."""
    budget = make_budget(amount_nanos=10 * USD)
    await reserve(counters, [budget], 6 * USD, 0, T0)
    result = await counters.reserve("default", [budget], 5 * USD, 0, T0)
    assert isinstance(result, Rejection)
    assert (result.dimension, result.limit, result.used, result.requested) == (
        "cost",
        10 * USD,
        6 * USD,
        5 * USD,
    )
    assert result.resets_at == utc(2026, 2, 1)
    assert result.retry_after(T0) == (utc(2026, 2, 1) - T0).total_seconds()


async def test_token_limit(make_budget: MakeBudget, counters: Counters) -> None:
    """The token dimension is enforced like cost."""
    budget = make_budget(token_limit=100)
    res = await reserve(counters, [budget], 0, 60, T0)
    result = await counters.reserve("default", [budget], 0, 41, T0)
    assert isinstance(result, Rejection) and result.dimension == "tokens" and result.used == 60
    await counters.settle(res, 0, 20, T0)
    await reserve(counters, [budget], 0, 80, T0)


async def test_reached_limit_blocks_free_requests(make_budget: MakeBudget, counters: Counters) -> None:
    """Once the limit is reached, even a request estimated at zero (unpriced model) is refused."""
    zero = make_budget(amount_nanos=0)
    result = await counters.reserve("default", [zero], 0, 0, T0)
    assert isinstance(result, Rejection) and result.dimension == "cost"
    budget = make_budget(amount_nanos=USD)
    await counters.settle(await reserve(counters, [budget], USD, 1, T0), USD, 1, T0)
    assert isinstance(await counters.reserve("default", [budget], 0, 0, T0), Rejection)


async def test_all_or_nothing(make_budget: MakeBudget, counters: Counters) -> None:
    """If one budget refuses, no budget keeps a reservation and no request is counted."""
    roomy = make_budget(amount_nanos=100 * USD, rpm=100)
    tight = make_budget(kind=ScopeKind.IDENTITY, target="u1", amount_nanos=1 * USD)
    result = await counters.reserve("default", [roomy, tight], 2 * USD, 10, T0)
    assert isinstance(result, Rejection) and result.budget is tight
    assert await counters.usage(roomy, T0) == Usage(0, 0, 0)
    await reserve(counters, [roomy], 100 * USD, 10, T0)  # all of roomy is still free


async def test_concurrent_reservations_never_exceed_the_limit(
    make_budget: MakeBudget, counters: Counters
) -> None:
    """200 concurrent reservations of 1 USD against 10 USD: exactly 10 admitted."""
    budget = make_budget(amount_nanos=10 * USD)
    results = await asyncio.gather(*(counters.reserve("default", [budget], USD, 1, T0) for _ in range(200)))
    assert sum(isinstance(r, Reservation) for r in results) == 10


@pytest.mark.parametrize(
    ("period", "spend_at", "same_window", "next_window"),
    [
        (Period.DAILY, utc(2026, 1, 31, 0, 0), utc(2026, 1, 31, 23, 59, 59), utc(2026, 2, 1)),
        (Period.WEEKLY, utc(2026, 1, 5), utc(2026, 1, 11, 23, 59), utc(2026, 1, 12)),
        (Period.MONTHLY, utc(2026, 12, 1), utc(2026, 12, 31, 23, 59), utc(2027, 1, 1)),
        (Period.MONTHLY, utc(2024, 2, 1), utc(2024, 2, 29, 23, 59), utc(2024, 3, 1)),
        (Period.MONTHLY, utc(2023, 2, 1), utc(2023, 2, 28, 23, 59), utc(2023, 3, 1)),
        (Period.YEARLY, utc(2024, 1, 1), utc(2024, 12, 31, 23, 59, 59), utc(2025, 1, 1)),
    ],
)
async def test_period_rollover(
    make_budget: MakeBudget,
    counters: Counters,
    period: Period,
    spend_at: datetime,
    same_window: datetime,
    next_window: datetime,
) -> None:
    """Spend counts until the window's last instant and starts at zero in the next window."""
    clock = FakeClock(spend_at)
    budget = make_budget(period=period, amount_nanos=10 * USD)
    await counters.settle(
        await reserve(counters, [budget], 10 * USD, 5, clock.now()), 10 * USD, 5, clock.now()
    )
    clock.set(same_window)
    assert (await counters.usage(budget, clock.now())).amount_nanos == 10 * USD
    refused = await counters.reserve("default", [budget], 1, 0, clock.now())
    assert isinstance(refused, Rejection) and refused.resets_at == next_window
    clock.set(next_window)
    assert await counters.usage(budget, clock.now()) == Usage(0, 0, 0)
    await reserve(counters, [budget], 10 * USD, 5, clock.now())


async def test_one_time_never_resets(make_budget: MakeBudget, counters: Counters) -> None:
    """ONE_TIME (and a limit without a period) keeps its spend forever; rejections carry no reset time."""
    for period in (Period.ONE_TIME, None):
        budget = make_budget(period=period, amount_nanos=USD)
        await counters.settle(await reserve(counters, [budget], USD, 1, T0), USD, 1, T0)
        later = T0 + timedelta(days=3 * 365)
        assert (await counters.usage(budget, later)).amount_nanos == USD
        refused = await counters.reserve("default", [budget], 1, 0, later)
        assert (
            isinstance(refused, Rejection)
            and refused.resets_at is None
            and refused.retry_after(later) is None
        )


async def test_rejection_resets_when_budget_expires_first(
    make_budget: MakeBudget, counters: Counters
) -> None:
    """A budget expiring before its period ends frees up at its expiry."""
    expires = T0 + timedelta(hours=2)
    budget = make_budget(period=Period.ONE_TIME, amount_nanos=0, expires_at=expires)
    refused = await counters.reserve("default", [budget], 1, 0, T0)
    assert isinstance(refused, Rejection) and refused.resets_at == expires


async def test_rpm_rolling_window(make_budget: MakeBudget, counters: Counters) -> None:
    """At most N requests in any 60 s; a slot frees when the oldest request is 60 s old."""
    clock = FakeClock(T0)
    budget = make_budget(rpm=3)
    for _ in range(3):
        res = await reserve(counters, [budget], 0, 0, clock.now())
        await counters.release(res, clock.now())  # a released request still counts: it was admitted
        clock.advance(10)
    refused = await counters.reserve("default", [budget], 0, 0, clock.now())  # t=30
    assert isinstance(refused, Rejection)
    assert (refused.dimension, refused.limit, refused.used) == ("requests", 3, 3)
    assert refused.resets_at == T0 + timedelta(seconds=60)
    assert (await counters.usage(budget, clock.now())).requests == 3
    clock.advance(29.999)
    assert isinstance(await counters.reserve("default", [budget], 0, 0, clock.now()), Rejection)
    clock.advance(0.001)  # t=60: the first request has left the window
    await reserve(counters, [budget], 0, 0, clock.now())
    assert isinstance(await counters.reserve("default", [budget], 0, 0, clock.now()), Rejection)
    clock.advance(120)
    assert (await counters.usage(budget, clock.now())).requests == 0


async def test_reset_zeroes_period_but_keeps_reservations_in_flight(
    make_budget: MakeBudget, counters: Counters
) -> None:
    """reset-consumption zeroes spend, tokens and requests; a request in flight still settles right."""
    budget = make_budget(amount_nanos=10 * USD, rpm=2)
    await counters.settle(await reserve(counters, [budget], 4 * USD, 10, T0), 4 * USD, 10, T0)
    in_flight = await reserve(counters, [budget], 5 * USD, 10, T0)
    await counters.reset(budget, T0)
    assert await counters.usage(budget, T0) == Usage(0, 0, 0)
    refused = await counters.reserve("default", [budget], 6 * USD, 0, T0)  # 5 still reserved
    assert isinstance(refused, Rejection) and refused.used == 5 * USD
    await counters.settle(in_flight, 2 * USD, 7, T0)
    assert await counters.usage(budget, T0) == Usage(2 * USD, 7, 0)


async def test_settle_across_rollover_charges_the_new_window(
    make_budget: MakeBudget, counters: Counters
) -> None:
    """A request reserved before midnight and settled after counts in the new day, once."""
    clock = FakeClock(utc(2026, 3, 1, 23, 59, 50))
    budget = make_budget(period=Period.DAILY, amount_nanos=10 * USD)
    res = await reserve(counters, [budget], 9 * USD, 10, clock.now())
    clock.advance(20)
    assert await counters.usage(budget, clock.now()) == Usage(0, 0, 1)
    await counters.settle(res, 3 * USD, 10, clock.now())
    assert (await counters.usage(budget, clock.now())).amount_nanos == 3 * USD
    await reserve(counters, [budget], 7 * USD, 0, clock.now())  # no stale reservation is left


async def test_forget_drops_counters(make_budget: MakeBudget, counters: Counters) -> None:
    """After forget, usage is zero and a late settlement is ignored."""
    budget = make_budget(amount_nanos=10 * USD)
    res = await reserve(counters, [budget], USD, 1, T0)
    await counters.forget(budget.budget_id)
    await counters.settle(res, USD, 1, T0)
    assert await counters.usage(budget, T0) == Usage()
    await counters.reset(budget, T0)  # unknown budget: no-op
    assert await counters.usage(budget, T0) == Usage()


async def test_alerts_fire_once_per_period(make_budget: MakeBudget, counters: Counters) -> None:
    """Each threshold fires when first reached, once per period, and again after rollover or reset."""
    clock = FakeClock(utc(2026, 1, 30))
    alerts = (Alert("a50", 50, ("n1",)), Alert("a90", 90, ("n1",)))
    budget = make_budget(period=Period.MONTHLY, amount_nanos=100 * USD, alerts=alerts)

    async def spend(usd: int) -> list[str]:
        res = await reserve(counters, [budget], usd * USD, 0, clock.now())
        return [c.alert.id for c in await counters.settle(res, usd * USD, 0, clock.now())]

    assert await spend(49) == []
    assert await spend(1) == ["a50"]
    assert await spend(1) == []
    assert await spend(45) == ["a90"]
    assert await spend(1) == []
    clock.set(utc(2026, 2, 1))
    assert await spend(95) == ["a50", "a90"]  # both crossed in one settlement
    await counters.reset(budget, clock.now())
    res = await reserve(counters, [budget], 60 * USD, 0, clock.now())
    crossings = await counters.settle(res, 60 * USD, 0, clock.now())
    assert [c.alert.id for c in crossings] == ["a50"]
    assert crossings[0].used_nanos == 60 * USD and crossings[0].limit_nanos == 100 * USD
    assert crossings[0].period_start == utc(2026, 2, 1) and crossings[0].period_end == utc(2026, 3, 1)


async def test_period_change_starts_a_new_window(make_budget: MakeBudget, counters: Counters) -> None:
    """Changing a budget's period (PATCH) starts counting afresh in the new kind of window."""
    monthly = make_budget(period=Period.MONTHLY, amount_nanos=10 * USD)
    await counters.settle(await reserve(counters, [monthly], USD, 1, T0), USD, 1, T0)
    from dataclasses import replace

    daily = replace(monthly, period=Period.DAILY)
    assert (await counters.usage(daily, T0)).amount_nanos == 0
    many = await counters.usage_many([daily, make_budget()], T0)
    assert many == [Usage(0, 0, 1), Usage()]
