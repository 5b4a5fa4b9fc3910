"""Alert webhooks: payload, retries with backoff, never blocking; end to end through the proxy."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orq_proxy.budgets.alerts import AlertDispatcher, alert_payload
from orq_proxy.budgets.counters import AlertCrossing
from orq_proxy.budgets.models import Alert, Budget, Period
from orq_proxy.config import NotifierConfig
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.servers import ServerThread, serve_in_thread

MakeBudget = Callable[..., Budget]
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


class Receiver:
    """A webhook endpoint that fails the first `fail` POSTs with 500, then records them."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.attempts = 0
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    async def hook(self, request: Request) -> Response:
        body = await request.json()
        with self.lock:
            self.attempts += 1
            if self.attempts <= self.fail:
                return JSONResponse({"error": "try later"}, status_code=500)
            self.received.append(body)
        return JSONResponse({"ok": True})


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, ServerThread]]:
    hooks = Receiver(fail=2)
    app = Starlette(routes=[Route("/hook", hooks.hook, methods=["POST"])])
    with serve_in_thread(app) as server:
        yield hooks, server


def crossing(make_budget: MakeBudget, notifiers: tuple[str, ...] = ("n1",)) -> AlertCrossing:
    alert = Alert("a1", 80, notifiers)
    budget = make_budget(amount_nanos=10**9, alerts=(alert,), period=Period.MONTHLY)
    return AlertCrossing(
        budget,
        alert,
        800_000_000,
        10**9,
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 4, 1, tzinfo=UTC),
        START,
    )


def test_payload(make_budget: MakeBudget) -> None:
    """The notification names the budget, alert, threshold, spend and period."""
    payload = alert_payload(crossing(make_budget))
    assert payload["type"] == "budget.threshold_reached"
    assert (payload["alert_id"], payload["threshold_percent"]) == ("a1", 80)
    assert (payload["used"], payload["limit"], payload["used_percent"]) == (0.8, 1.0, 80.0)
    assert (
        payload["period_start"] == "2026-03-01T00:00:00Z" and payload["period_end"] == "2026-04-01T00:00:00Z"
    )
    assert payload["budget"]["budgetId"] == payload["budget_id"] and payload["currency"] == "usd"


async def test_delivery_retries_with_backoff(
    make_budget: MakeBudget, receiver: tuple[Receiver, ServerThread]
) -> None:
    """A webhook failing twice gets the notification on the third attempt; unknown notifiers are counted."""
    hooks, server = receiver
    notifiers = {"n1": NotifierConfig(url=server.url + "/hook")}
    alerts = AlertDispatcher(notifiers, backoff=0.01)
    started = time.perf_counter()
    alerts.notify(crossing(make_budget, ("n1", "ghost")))
    assert time.perf_counter() - started < 0.01  # never blocks
    await alerts.drain(5)
    assert hooks.attempts == 3 and len(hooks.received) == 1
    assert hooks.received[0]["notifier_id"] == "n1" and hooks.received[0]["alert_id"] == "a1"
    assert (alerts.sent, alerts.failed, alerts.dropped) == (1, 1, 0)
    await alerts.aclose()


async def test_gives_up_after_attempts(make_budget: MakeBudget) -> None:
    """An unreachable webhook is retried `attempts` times, then counted as failed."""
    dead = AlertDispatcher(
        {"n1": NotifierConfig(url="http://127.0.0.1:9/hook")}, attempts=2, backoff=0.01, timeout=1
    )
    dead.notify(crossing(make_budget))
    await dead.drain(5)
    assert (dead.sent, dead.failed) == (0, 1)
    await dead.aclose()


async def test_full_queue_drops_and_counts(make_budget: MakeBudget) -> None:
    """Past `max_queue` waiting notifications, more are dropped (counted), never blocking."""
    alerts = AlertDispatcher({}, max_queue=2)
    for _ in range(5):
        alerts.notify(crossing(make_budget))
    assert alerts.dropped == 3
    await alerts.aclose(0.5)
    with pytest.raises(ValueError):
        AlertDispatcher({}, attempts=0)


def test_alert_fires_once_through_the_proxy(
    proxy_factory: Any, fake: Any, receiver: tuple[Receiver, ServerThread]
) -> None:
    """Crossing 50% of a budget with real requests POSTs one notification, however many requests follow."""
    hooks, hook_server = receiver
    hooks.fail = 0
    config = {
        "api_keys": [{"key": "sk-admin", "workspace": "ws", "admin": True}],
        "prices": {"openai/test-model": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}},
        "notifiers": {"ops": {"url": hook_server.url + "/hook"}},
    }
    app, server = proxy_factory(config, clock=FakeClock(START))
    response = httpx.post(
        server.url + "/v2/budgets",
        headers={"authorization": "Bearer sk-admin"},
        json={
            "scope": {"workspace": {}},
            "limits": {"period": "BUDGET_PERIOD_DAILY", "amount": 0.1},
            "alerts": [{"threshold_percent": 50, "notifier_ids": ["ops"]}],
        },
    )
    assert response.status_code == 200, response.text
    with openai.OpenAI(base_url=server.url + "/v1", api_key="sk-admin", max_retries=0) as client:
        for _ in range(4):  # 22M nano-USD each: 50% of 100M is reached by the third
            client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "hello there"}], max_tokens=10
            )
    deadline = time.monotonic() + 5
    while not hooks.received and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # room for a (wrong) second notification to arrive
    assert len(hooks.received) == 1
    note = hooks.received[0]
    assert note["notifier_id"] == "ops" and note["used"] == 0.066 and note["threshold_percent"] == 50
    assert app.services.budget_alerts.sent == 1


async def test_start_and_restart(make_budget: MakeBudget) -> None:
    """start() is idempotent and the worker comes back after aclose()."""
    alerts = AlertDispatcher({})
    await alerts.start()
    await alerts.start()
    await alerts.aclose()
    alerts.notify(crossing(make_budget, ()))
    await asyncio.wait_for(alerts.drain(1), 2)
    await alerts.aclose()
