"""Budget counters: reserve before forwarding, settle after, atomically across every matching budget.

Per budget and period the counters hold what was spent (settled) and what is reserved by requests in
flight. A request is admitted only if, for every budget that applies, `spent + reserved + estimate` stays
within each limit; then the estimate is added to `reserved` of all of them at once (all-or-nothing).
Settling replaces the estimate by the actual cost and tokens, exactly once; releasing drops it. Hence
the invariant `spent + reserved <= limit` holds at every admission, and the only overshoot is what actual
usage exceeded its estimate by (see docs/architecture.md, "Budget overshoot bound").

Rate limits are a rolling 60-second window of admitted requests per budget (a released request still
counts: it was admitted). Spend, tokens and requests are counted for every budget a request matches, also
on dimensions the budget does not limit, so `usage` always shows all three.

Failure policy: budgets fail closed. A backend that cannot answer raises; the middleware turns that into
503 (or lets the request through when configured to fail open).

`InMemoryCounters` never awaits between reading and writing, so each call is atomic on its event loop.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol

from orq_proxy.budgets.models import ALERT_DIMENSION_COST, Alert, Budget, Period, Usage
from orq_proxy.budgets.periods import window

__all__ = [
    "RATE_WINDOW_SECONDS",
    "AlertCrossing",
    "Counters",
    "Dimension",
    "InMemoryCounters",
    "Rejection",
    "Reservation",
    "ReservedBudget",
    "frees_at",
]

RATE_WINDOW_SECONDS = 60.0

Dimension = Literal["cost", "tokens", "requests"]


@dataclass(slots=True)
class ReservedBudget:
    """One budget's part of a reservation: the budget as it was, and the start of the window (Unix seconds)
    the amounts were reserved in."""

    budget: Budget
    period_start: float


@dataclass(slots=True)
class Reservation:
    """What `reserve` set aside for one request; settle or release it exactly once (later calls no-op)."""

    reservation_id: str
    workspace: str
    parts: tuple[ReservedBudget, ...]
    cost_nanos: int
    tokens: int
    done: bool = False


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request was refused: the first budget and dimension over its limit.

    `limit`, `used` and `requested` are nano-USD for cost, tokens for tokens, requests for requests.
    `resets_at` is when the budget frees up (period end, the rate window sliding, or the budget
    expiring), None when it never does (ONE_TIME).
    """

    budget: Budget
    dimension: Dimension
    limit: int
    used: int
    requested: int
    resets_at: datetime | None

    def retry_after(self, now: datetime) -> float | None:
        """Seconds until `resets_at`, or None."""
        return None if self.resets_at is None else max(0.0, (self.resets_at - now).total_seconds())


@dataclass(frozen=True, slots=True)
class AlertCrossing:
    """An alert whose threshold the budget's spend reached in this period, for the first time."""

    budget: Budget
    alert: Alert
    used_nanos: int
    limit_nanos: int
    period_start: datetime
    period_end: datetime | None
    at: datetime


def frees_at(budget: Budget, window_end: datetime | None) -> datetime | None:
    """When a budget refusing on cost or tokens frees up: its window's end, or its expiry if sooner."""
    if budget.expires_at is not None and (window_end is None or budget.expires_at < window_end):
        return budget.expires_at
    return window_end


class Counters(Protocol):
    """Per-budget period counters and rate windows. Every method is atomic with respect to the others.

    Implementations: `InMemoryCounters` (one process), `RedisCounters` (many replicas, one Lua script).

    Attributes:
        in_process: True when no call ever suspends (in memory); the middleware then settles inline,
            otherwise in a task shielded from the request's cancellation.

    Optional: `settle_nowait(reservation, actual_cost_nanos, actual_tokens, now)`, which sends the settlement
    at once and returns a future of its alert crossings, or None when it cannot (the middleware then awaits
    `settle`). `RedisCounters` has it: the gate then settles with no task and no `await`.
    """

    in_process: bool

    async def reserve(
        self, workspace: str, budgets: Sequence[Budget], cost_nanos: int, tokens: int, now: datetime
    ) -> Reservation | Rejection:
        """Reserve `cost_nanos` and `tokens` against every budget, and count one request, or none of it."""
        ...

    async def settle(
        self, reservation: Reservation, actual_cost_nanos: int, actual_tokens: int, now: datetime
    ) -> list[AlertCrossing]:
        """Replace the reservation by the actual usage (once; later calls no-op); return alerts crossed."""
        ...

    async def release(self, reservation: Reservation, now: datetime) -> None:
        """Drop the reservation without charging anything (once; later calls no-op)."""
        ...

    async def usage(self, budget: Budget, now: datetime) -> Usage:
        """Settled consumption in the current period; requests in the last 60 s."""
        ...

    async def usage_many(self, budgets: Sequence[Budget], now: datetime) -> list[Usage]:
        """`usage` of several budgets (one round trip for remote backends)."""
        ...

    async def reset(self, budget: Budget, now: datetime) -> None:
        """Zero the current period's spend, tokens and request window; re-arm its alerts.

        Reservations in flight stay reserved and settle normally.
        """
        ...

    async def forget(self, budget_id: str) -> None:
        """Drop every counter of a deleted budget."""
        ...

    async def aclose(self) -> None:
        """Release connections (a remote backend); the lifespan calls it after the gate's settlements."""
        ...


@dataclass(slots=True)
class _State:
    period: Period
    time_zone: str | None
    start: datetime
    end: datetime | None
    start_ts: float
    end_ts: float  # inf for ONE_TIME
    spent_nanos: int = 0
    spent_tokens: int = 0
    reserved_nanos: int = 0
    reserved_tokens: int = 0
    requests: deque[float] = field(default_factory=deque)
    fired: set[str] = field(default_factory=set)


class InMemoryCounters:
    """`Counters` in this process's memory. Calls never await internally, so each one is atomic."""

    in_process = True  # calls never suspend: the middleware may await them without shielding

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._states)

    def reserved(self, budget_id: str) -> tuple[int, int]:
        """`(nano-USD, tokens)` reserved against a budget by requests in flight (0, 0 when idle)."""
        state = self._states.get(budget_id)
        return (0, 0) if state is None else (state.reserved_nanos, state.reserved_tokens)

    # -- internals ---------------------------------------------------------------------------------------

    def _state(self, budget: Budget, now: datetime, now_ts: float) -> _State:
        """The budget's state for the window containing `now`, rolling over to a new window if needed."""
        period = budget.period or Period.ONE_TIME
        state = self._states.get(budget.budget_id)
        # (A clock that went back before `start` keeps counting in the current window.)
        if (
            state is not None
            and now_ts < state.end_ts
            and state.period is period
            and state.time_zone == budget.time_zone
        ):
            return state
        start, end = window(period, now, budget.time_zone)
        start_ts, end_ts = start.timestamp(), end.timestamp() if end is not None else math.inf
        if state is None:
            state = self._states[budget.budget_id] = _State(
                period, budget.time_zone, start, end, start_ts, end_ts
            )
            return state
        # A new window (or a new period kind): consumption and reservations of the old one are history.
        state.period, state.time_zone, state.start, state.end = period, budget.time_zone, start, end
        state.start_ts, state.end_ts = start_ts, end_ts
        state.spent_nanos = state.spent_tokens = state.reserved_nanos = state.reserved_tokens = 0
        state.fired.clear()
        return state

    @staticmethod
    def _prune(state: _State, now_ts: float) -> deque[float]:
        window_start = now_ts - RATE_WINDOW_SECONDS
        requests = state.requests
        while requests and requests[0] <= window_start:
            requests.popleft()
        return requests

    # -- protocol ----------------------------------------------------------------------------------------

    async def reserve(
        self, workspace: str, budgets: Sequence[Budget], cost_nanos: int, tokens: int, now: datetime
    ) -> Reservation | Rejection:
        now_ts = now.timestamp()
        get = self._states.get
        states = []
        # Check every budget first; write only if all pass (all-or-nothing, no await in between).
        for budget in budgets:
            state = get(budget.budget_id)
            if (  # the fast path of `_state`, inlined: this runs for every budget of every request
                state is None
                or now_ts >= state.end_ts
                or state.period is not (budget.period or Period.ONE_TIME)
                or state.time_zone != budget.time_zone
            ):
                state = self._state(budget, now, now_ts)
            states.append(state)
            rejection = self._check(budget, state, cost_nanos, tokens, now, now_ts)
            if rejection is not None:
                return rejection
        parts = []
        window_start = now_ts - RATE_WINDOW_SECONDS
        for budget, state in zip(budgets, states, strict=True):
            state.reserved_nanos += cost_nanos
            state.reserved_tokens += tokens
            requests = state.requests
            while requests and requests[0] <= window_start:
                requests.popleft()
            requests.append(now_ts)
            parts.append(ReservedBudget(budget, state.start_ts))
        self._next_id += 1
        return Reservation(f"r{self._next_id}", workspace, tuple(parts), cost_nanos, tokens)

    def _check(
        self, budget: Budget, state: _State, cost_nanos: int, tokens: int, now: datetime, now_ts: float
    ) -> Rejection | None:
        rpm = budget.requests_per_minute
        if rpm is not None:
            requests = self._prune(state, now_ts)
            if len(requests) >= rpm:
                # Free again when the oldest request that keeps the window full slides out of it.
                oldest = requests[len(requests) - rpm]
                resets = now + timedelta(seconds=oldest + RATE_WINDOW_SECONDS - now_ts)
                return Rejection(budget, "requests", rpm, len(requests), 1, resets)
        limit = budget.amount_nanos
        if limit is not None:
            used = state.spent_nanos + state.reserved_nanos
            # Reaching the limit closes the budget even for requests priced at zero (unknown models).
            if used >= limit or used + cost_nanos > limit:
                return Rejection(budget, "cost", limit, used, cost_nanos, frees_at(budget, state.end))
        limit = budget.token_limit
        if limit is not None:
            used = state.spent_tokens + state.reserved_tokens
            if used >= limit or used + tokens > limit:
                return Rejection(budget, "tokens", limit, used, tokens, frees_at(budget, state.end))
        return None

    async def settle(
        self, reservation: Reservation, actual_cost_nanos: int, actual_tokens: int, now: datetime
    ) -> list[AlertCrossing]:
        if reservation.done:
            return []
        reservation.done = True
        crossings: list[AlertCrossing] = []
        now_ts = now.timestamp()
        cost, tokens = reservation.cost_nanos, reservation.tokens
        for part in reservation.parts:
            budget = part.budget
            state = self._states.get(budget.budget_id)
            if state is None:
                continue  # deleted meanwhile
            if now_ts >= state.end_ts or state.period is not (budget.period or Period.ONE_TIME):
                state = self._state(budget, now, now_ts)
            if state.start_ts == part.period_start:
                # (never below zero: a reset or period change may have zeroed what this reserved)
                state.reserved_nanos = reserved if (reserved := state.reserved_nanos - cost) > 0 else 0
                state.reserved_tokens = reserved if (reserved := state.reserved_tokens - tokens) > 0 else 0
            # else: the window rolled over while the request ran; its reservation went with the old window,
            # and the actual usage counts in the window the request finished in.
            state.spent_nanos += actual_cost_nanos
            state.spent_tokens += actual_tokens
            if budget.alerts:
                crossings.extend(self._crossed(budget, state, now))
        return crossings

    @staticmethod
    def _unreserve(state: _State, reservation: Reservation) -> None:
        state.reserved_nanos = max(0, state.reserved_nanos - reservation.cost_nanos)
        state.reserved_tokens = max(0, state.reserved_tokens - reservation.tokens)

    @staticmethod
    def _crossed(budget: Budget, state: _State, now: datetime) -> list[AlertCrossing]:
        limit = budget.amount_nanos
        if not budget.alerts or not limit:
            return []
        out = []
        for alert in budget.alerts:
            if alert.dimension != ALERT_DIMENSION_COST or alert.id in state.fired:
                continue
            if state.spent_nanos * 100 >= alert.threshold_percent * limit:
                state.fired.add(alert.id)
                out.append(
                    AlertCrossing(budget, alert, state.spent_nanos, limit, state.start, state.end, now)
                )
        return out

    async def release(self, reservation: Reservation, now: datetime) -> None:
        if reservation.done:
            return
        reservation.done = True
        for part in reservation.parts:
            state = self._states.get(part.budget.budget_id)
            if state is not None and state.start_ts == part.period_start:
                self._unreserve(state, reservation)

    async def usage(self, budget: Budget, now: datetime) -> Usage:
        if budget.budget_id not in self._states:
            return Usage()
        now_ts = now.timestamp()
        state = self._state(budget, now, now_ts)
        requests = self._prune(state, now_ts)
        return Usage(state.spent_nanos, state.spent_tokens, len(requests))

    async def usage_many(self, budgets: Sequence[Budget], now: datetime) -> list[Usage]:
        return [await self.usage(b, now) for b in budgets]

    async def reset(self, budget: Budget, now: datetime) -> None:
        state = self._states.get(budget.budget_id)
        if state is None:
            return
        state = self._state(budget, now, now.timestamp())
        state.spent_nanos = state.spent_tokens = 0
        state.requests.clear()
        state.fired.clear()

    async def forget(self, budget_id: str) -> None:
        self._states.pop(budget_id, None)

    async def aclose(self) -> None:
        return None  # nothing held

    def restore(
        self,
        budget: Budget,
        spent_nanos: int,
        spent_tokens: int,
        request_times: Sequence[float],
        now: datetime,
    ) -> None:
        """Set a budget's current-window consumption from the ledger (startup, before any request).

        Alerts whose threshold the restored spend already reached count as fired for this window, so a
        restart does not send them again.
        """
        now_ts = now.timestamp()
        self._states.pop(budget.budget_id, None)
        state = self._state(budget, now, now_ts)
        state.spent_nanos = spent_nanos
        state.spent_tokens = spent_tokens
        state.requests.extend(t for t in request_times if t > now_ts - RATE_WINDOW_SECONDS)
        self._crossed(budget, state, now)  # (marks them fired; nothing is sent)
