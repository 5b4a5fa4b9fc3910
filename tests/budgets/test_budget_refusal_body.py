"""The 429 for a cost or token limit says what the request asked for and what was left, so a client can
tell "too big a request" (lower max_tokens) from "budget gone" (wait). Through a real proxy and the SDK.

`openai/test-model` costs 1,000 nano-USD per input token and 2,000 per output token; the chat below is
estimated at 7 input tokens + its `max_tokens`, and the fake upstream counts 6 + 8.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest

from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.fake_upstream import FakeUpstream

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ADMIN, USER = "sk-admin", "sk-user"
KEYS = [
    {"key": ADMIN, "workspace": "ws", "admin": True, "id": "admin"},
    {"key": USER, "workspace": "ws", "id": "user_key", "project": "proj"},
]
PRICES = {"openai/test-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
MESSAGES = [{"role": "user", "content": "hello there"}]


class Proxy:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=USER, max_retries=0, timeout=10)

    def budget(self, limits: dict[str, Any]) -> str:
        response = httpx.post(
            self.url + "/v2/budgets",
            json={"scope": {"workspace": {}}, "limits": limits},
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        budget_id: str = response.json()["budget"]["budgetId"]
        return budget_id

    def refused(self, max_tokens: int) -> openai.RateLimitError:
        with pytest.raises(openai.RateLimitError) as info:
            self.client.chat.completions.create(model="test-model", messages=MESSAGES, max_tokens=max_tokens)  # type: ignore[arg-type]
        return info.value

    def spent(self, budget_id: str) -> float:
        response = httpx.get(
            f"{self.url}/v2/budgets/{budget_id}", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10
        )
        amount: float = response.json()["budget"]["usage"]["amount"]
        return amount


@pytest.fixture
def proxy(proxy_factory: Any, fake: FakeUpstream) -> Iterator[Proxy]:
    app, server = proxy_factory({"api_keys": KEYS, "prices": PRICES}, clock=FakeClock(START))
    app.budget_gate.calibration = None  # exact reservations here; calibrated ones: test_budget_calibration.py
    proxy = Proxy(server.url)
    yield proxy
    proxy.client.close()


def rejection(error: openai.RateLimitError) -> dict[str, Any]:
    assert isinstance(error.body, dict)
    detail: dict[str, Any] = error.body["rejection"]
    return detail


def test_too_big_a_request_says_requested_and_remaining(proxy: Proxy) -> None:
    """A fresh $0.001 budget and a request reserving $0.002007: all of it remains, the request is too big."""
    proxy.budget({"amount": 0.001})
    error = proxy.refused(max_tokens=1000)
    detail = rejection(error)
    assert detail["requested"] == pytest.approx((7 * 1_000 + 1000 * 2_000) / 1e9)
    assert detail["remaining"] == pytest.approx(0.001) and detail["used"] == 0
    assert error.response.headers["x-ratelimit-remaining"] == "0.001"
    message = detail["message"]
    assert "0.001 USD left" in message and "reserves up to 0.002007 USD" in message
    assert message.endswith("(lower max_tokens to fit)") and error.message.endswith(message)


def test_budget_gone_says_nothing_remains(proxy: Proxy) -> None:
    """Once spend has used the limit up, the refusal says 0 remains, whatever the request asks for."""
    budget_id = proxy.budget({"amount": 0.0001})  # 100,000 nano-USD: four answers of 22,000 fit
    for _ in range(100):
        try:
            proxy.client.chat.completions.create(model="test-model", messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
        except openai.RateLimitError:
            break
    deadline = time.monotonic() + 5
    while proxy.spent(budget_id) < 0.000088 and time.monotonic() < deadline:
        time.sleep(0.01)
    detail = rejection(proxy.refused(max_tokens=8))
    used = 4 * 22_000 / 1e9
    assert detail["used"] == pytest.approx(used)
    assert detail["remaining"] == pytest.approx(0.0001 - used)
    assert detail["requested"] == pytest.approx((7 * 1_000 + 8 * 2_000) / 1e9)
    assert detail["requested"] > detail["remaining"]


def test_token_limit_refusal_in_tokens(proxy: Proxy) -> None:
    """A token limit's refusal counts in tokens: requested 7 + 200, remaining the whole 100."""
    proxy.budget({"token_limit": 100})
    error = proxy.refused(max_tokens=200)
    detail = rejection(error)
    assert (detail["dimension"], detail["requested"], detail["remaining"], detail["used"]) == (
        "tokens",
        207,
        100,
        0,
    )
    assert "100 tokens left; this request reserves up to 207 tokens" in detail["message"]
    assert error.response.headers["x-ratelimit-remaining"] == "100"
