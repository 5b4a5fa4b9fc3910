"""BudgetMiddleware around inline ASGI apps: settle once, release on every failure, fail closed/open."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from orq_proxy.auth import Principal
from orq_proxy.budgets.alerts import AlertDispatcher
from orq_proxy.budgets.counters import AlertCrossing, InMemoryCounters, Rejection, Reservation
from orq_proxy.budgets.matching import RequestFacts
from orq_proxy.budgets.middleware import BudgetMiddleware
from orq_proxy.budgets.models import Alert, Budget, ScopeKind
from orq_proxy.budgets.store import InMemoryBudgetStore
from orq_proxy.context import SCOPE_KEY, MissingContext, RequestContext, ResolvedIdentity
from orq_proxy.testing.clock import FakeClock
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.pricing import Pricer

MakeBudget = Callable[..., Budget]
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
PRICER = Pricer({"openai/test-model": (1000.0, 2000.0, None)})
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}
EST_NANOS = 27_000_000


def make_scope(identity: str | None = "u1", body: dict[str, Any] | None = None) -> dict[str, Any]:
    body = BODY if body is None else body
    raw = json.dumps(body).encode()
    ctx = RequestContext(
        request_id="r1",
        received_at=START,
        started=0.0,
        method="POST",
        path="/chat/completions",
        surface="/v1",
        raw_body=raw,
        body=dict(body),
        principal=Principal(workspace="default", project="p1", key_id="k1"),
        provider="openai",
        model="test-model",
        model_ref="test-model",
        product="chat.completions",
        identity=ResolvedIdentity(identity, "header") if identity else None,
    )
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], SCOPE_KEY: ctx}


def event(cost: int, tokens: int) -> UsageEvent:
    return UsageEvent(
        event_id="r1",
        timestamp=START,
        workspace="default",
        project="p1",
        api_key_id="k1",
        total_cost_nanos=cost,
        total_tokens=tokens,
    )


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        self.messages.append(dict(message))

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))


async def receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 and, like metering, calls the settle hooks once with the final event."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})
    for hook in scope[SCOPE_KEY].settle_hooks:
        hook(event(5_000_000, 9))


async def setup(*budgets: Budget) -> tuple[InMemoryBudgetStore, InMemoryCounters]:
    store = InMemoryBudgetStore()
    for budget in budgets:
        await store.create(budget)
    return store, InMemoryCounters()


def gate(app: Any, store: Any, counters: Any, **kwargs: Any) -> BudgetMiddleware:
    kwargs.setdefault("calibrate", False)  # the plain estimate; calibration: test_budget_calibration.py
    return BudgetMiddleware(
        app, store=store, counters=counters, pricer=PRICER, clock=FakeClock(START), **kwargs
    )


async def test_settles_actual_usage(make_budget: MakeBudget) -> None:
    """A served request is charged the event's cost and tokens, and nothing stays reserved."""
    budget = make_budget(amount_nanos=10**9)
    store, counters = await setup(budget)
    send = Recorder()
    await gate(ok_app, store, counters)(make_scope(), receive, send)
    assert send.status == 200
    usage = await counters.usage(budget, START)
    assert (usage.amount_nanos, usage.tokens, usage.requests) == (5_000_000, 9, 1)
    assert counters.reserved(budget.budget_id) == (0, 0)


async def test_estimate(make_budget: MakeBudget) -> None:
    """Estimate = input tokens from the body + its output cap (or the default), priced; embeddings: input."""
    middleware = gate(ok_app, *(await setup()), default_max_output_tokens=100)
    assert middleware.estimate(make_scope()[SCOPE_KEY]) == (EST_NANOS, 17)
    no_cap = {k: v for k, v in BODY.items() if k != "max_tokens"}
    assert middleware.estimate(make_scope(body=no_cap)[SCOPE_KEY]) == (7_000_000 + 200_000_000, 107)
    ctx = make_scope(body={"model": "test-model", "input": "one two"})[SCOPE_KEY]
    ctx.product = "embeddings"
    assert middleware.estimate(ctx) == (2_000_000, 2)
    with pytest.raises(ValueError, match="default_max_output_tokens"):
        gate(ok_app, *(await setup()), default_max_output_tokens=0)


@pytest.mark.parametrize("when", ["before_response", "after_response"])
async def test_exception_before_metering_releases(make_budget: MakeBudget, when: str) -> None:
    """If the inner app raises and no event was produced, the reservation is released."""
    budget = make_budget(amount_nanos=10**9)
    store, counters = await setup(budget)

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        if when == "after_response":
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await gate(failing, store, counters)(make_scope(), receive, Recorder())
    assert counters.reserved(budget.budget_id) == (0, 0)
    assert (await counters.usage(budget, START)).amount_nanos == 0


async def test_exception_after_settle_hook_settles_once(make_budget: MakeBudget) -> None:
    """An event produced before an exception is charged, once, even if hooks are called twice."""
    budget = make_budget(amount_nanos=10**9)
    store, counters = await setup(budget)

    async def settles_then_fails(scope: Any, receive: Any, send: Any) -> None:
        for hook in scope[SCOPE_KEY].settle_hooks:
            hook(event(3_000_000, 4))
            hook(event(3_000_000, 4))
        raise ConnectionError("upstream died")

    with pytest.raises(ConnectionError):
        await gate(settles_then_fails, store, counters)(make_scope(), receive, Recorder())
    usage = await counters.usage(budget, START)
    assert (usage.amount_nanos, usage.tokens) == (3_000_000, 4)
    assert counters.reserved(budget.budget_id) == (0, 0)


async def test_cancellation_still_releases(make_budget: MakeBudget) -> None:
    """A request task cancelled mid-flight (server shutdown, disconnect) leaves no reservation."""
    budget = make_budget(amount_nanos=10**9)
    store, counters = await setup(budget)
    entered = asyncio.Event()

    async def hangs(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await asyncio.sleep(3600)

    middleware = gate(hangs, store, counters)
    task = asyncio.ensure_future(middleware(make_scope(), receive, Recorder()))
    await entered.wait()
    assert counters.reserved(budget.budget_id) == (EST_NANOS, 17)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await middleware.drain()
    assert counters.reserved(budget.budget_id) == (0, 0)


async def test_no_budgets_no_reservation() -> None:
    """Without matching budgets the request goes straight through, counters untouched."""
    store, counters = await setup()
    send = Recorder()
    await gate(ok_app, store, counters)(make_scope(), receive, send)
    assert send.status == 200 and len(counters) == 0


async def test_non_http_and_unauthenticated_pass_through() -> None:
    """Lifespan and requests without a principal are not gated; a request without a context is a wiring
    bug and says so (the one rule of `get_context`)."""
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["type"])

    class Exploding:
        async def matching(self, facts: RequestFacts, now: datetime) -> list[Budget]:
            raise AssertionError("must not be called")

    middleware = gate(app, Exploding(), InMemoryCounters())
    await middleware({"type": "lifespan"}, receive, Recorder())
    with pytest.raises(MissingContext, match="must run inside RequestMiddleware"):
        await middleware({"type": "http", "headers": []}, receive, Recorder())
    scope = make_scope()
    scope[SCOPE_KEY].principal = None
    await middleware(scope, receive, Recorder())
    assert calls == ["lifespan", "http"]


class BrokenStore:
    async def matching(self, facts: RequestFacts, now: datetime) -> list[Budget]:
        raise ConnectionError("state backend down")


class BrokenCounters(InMemoryCounters):
    async def reserve(
        self, workspace: str, budgets: Sequence[Budget], cost_nanos: int, tokens: int, now: datetime
    ) -> Reservation | Rejection:
        raise TimeoutError("redis timeout")


async def test_backend_failure_fails_closed(make_budget: MakeBudget) -> None:
    """A store or counters failure answers 503 (OpenAI shape) without calling the upstream."""
    called: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(1)

    store, _ = await setup(make_budget(amount_nanos=10))
    for middleware in (gate(app, BrokenStore(), InMemoryCounters()), gate(app, store, BrokenCounters())):
        send = Recorder()
        scope = make_scope()
        await middleware(scope, receive, send)
        assert send.status == 503 and send.json["error"]["code"] == "budget_unavailable"
    assert called == []


async def test_backend_failure_can_fail_open(make_budget: MakeBudget) -> None:
    """With fail_open the request is forwarded when the backend fails."""
    store, _ = await setup(make_budget(amount_nanos=10))
    for middleware in (
        gate(ok_app, BrokenStore(), InMemoryCounters(), fail_open=True),
        gate(ok_app, store, BrokenCounters(), fail_open=True),
    ):
        send = Recorder()
        await middleware(make_scope(), receive, send)
        assert send.status == 200


async def test_rejection_sets_status_and_skips_app(make_budget: MakeBudget) -> None:
    """A refused request never reaches the inner app."""
    called: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(1)

    budget = make_budget(kind=None, cel="true", amount_nanos=EST_NANOS - 1, period=None)
    store, counters = await setup(budget)
    scope = make_scope()
    send = Recorder()
    await gate(app, store, counters)(scope, receive, send)
    assert send.status == 429 and called == []
    error = send.json["error"]
    assert error["rejection"]["scope_kind"] == "BUDGET_SCOPE_KIND_CUSTOM"
    assert error["rejection"]["scope_target_id"] == budget.budget_id
    assert "resets_at" not in error["rejection"]  # ONE_TIME never resets
    headers = dict(send.messages[0]["headers"])
    assert b"retry-after" not in headers and b"x-ratelimit-reset" not in headers
    assert "lower max_tokens to fit" in error["message"]


class RecordingAlerts(AlertDispatcher):
    def __init__(self) -> None:
        super().__init__({})
        self.crossings: list[AlertCrossing] = []

    def notify(self, crossing: AlertCrossing) -> None:
        self.crossings.append(crossing)


async def test_settlement_hands_crossed_alerts_to_the_dispatcher(make_budget: MakeBudget) -> None:
    """An alert crossed by a settlement is notified once."""
    budget = make_budget(
        kind=ScopeKind.IDENTITY, target="u1", amount_nanos=12_000_000, alerts=(Alert("a1", 50, ("n1",)),)
    )
    store, counters = await setup(budget)
    alerts = RecordingAlerts()

    async def cheap(scope: Any, receive: Any, send: Any) -> None:
        for hook in scope[SCOPE_KEY].settle_hooks:
            hook(event(3_000_000, 1))

    budget_big = make_budget(kind=ScopeKind.API_KEY, target="k1", amount_nanos=10**12)
    await store.create(budget_big)
    middleware = gate(cheap, store, counters, alerts=alerts)
    # estimated at 5 + 1 tokens = 7M nano-USD, charged 3M: two fit (50% reached at 6M), the third does not
    tiny = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    statuses = []
    for _ in range(3):
        send = Recorder()
        await middleware(make_scope(body=tiny), receive, send)
        statuses.append(send.messages[0]["status"] if send.messages else 200)
    assert statuses == [200, 200, 429]
    assert [(c.alert.id, c.used_nanos) for c in alerts.crossings] == [("a1", 6_000_000)]


class RemoteLikeCounters(InMemoryCounters):
    """Counters whose release suspends (like a network backend) until `proceed` is set."""

    in_process = False

    def __init__(self) -> None:
        super().__init__()
        self.proceed = asyncio.Event()
        self.releasing = asyncio.Event()

    async def release(self, reservation: Reservation, now: datetime) -> None:
        self.releasing.set()
        await self.proceed.wait()
        await super().release(reservation, now)


async def test_remote_settlement_survives_repeated_cancellation(make_budget: MakeBudget) -> None:
    """With a suspending backend, settlement runs shielded: cancelling the request again cannot stop it."""
    budget = make_budget(amount_nanos=10**9)
    store = InMemoryBudgetStore()
    await store.create(budget)
    counters = RemoteLikeCounters()
    entered = asyncio.Event()

    async def hangs(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await asyncio.sleep(3600)

    middleware = gate(hangs, store, counters)
    task = asyncio.ensure_future(middleware(make_scope(), receive, Recorder()))
    await entered.wait()
    task.cancel()
    await counters.releasing.wait()  # the request is in its finally, awaiting the shielded release
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counters.reserved(budget.budget_id) == (EST_NANOS, 17)  # still in flight
    counters.proceed.set()
    await middleware.drain()
    assert counters.reserved(budget.budget_id) == (0, 0)
