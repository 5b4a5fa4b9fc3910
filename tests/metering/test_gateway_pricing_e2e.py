"""Upstreams named for a gateway (`[upstreams.vllm]`), end to end: the real `openai` SDK -> the real proxy on a
socket -> the fake upstream. Their calls cost what OpenAI charges for the model, in the usage event and in
the budget gate's reservation alike, and `prices_as` picks the provider outright.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
from genai_prices import Usage, calc_price

from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.money import usd_to_nanos

MESSAGES: list[Any] = [{"role": "user", "content": "count the words in this prompt"}]
UPSTREAM_KEY = "sk-upstream-secret"
ADMIN, USER = "sk-admin", "sk-user"
KEYS = [
    {"key": ADMIN, "workspace": "ws", "admin": True, "id": "admin"},
    {"key": USER, "workspace": "ws", "id": "user_key", "project": "proj"},
]


def upstreams(url: str) -> dict[str, Any]:
    """Two upstreams on the fake: `vllm` (default, no provider by that name) and `gw` (`prices_as`)."""
    return {
        "vllm": {"base_url": url, "api_key": UPSTREAM_KEY, "default": True},
        "gw": {"base_url": url, "api_key": UPSTREAM_KEY, "prices_as": "openai"},
    }


def wait_events(sink: MemorySink, n: int, timeout: float = 3.0) -> list[UsageEvent]:
    deadline = time.monotonic() + timeout
    while len(sink.events) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {n} events, got {len(sink.events)}")
        time.sleep(0.01)
    return list(sink.events)


def openai_nanos(model: str, input_tokens: int, output_tokens: int) -> tuple[int, int]:
    """(input, output) nano-USD of this usage at OpenAI's price, straight from genai-prices."""
    price = calc_price(
        Usage(input_tokens=input_tokens, output_tokens=output_tokens), model, provider_id="openai"
    )
    return usd_to_nanos(price.input_price), usd_to_nanos(price.output_price)


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [("gpt-4o-mini", "gpt-4o-mini"), ("vllm/openai/gpt-4o-mini", "gpt-4o-mini"), ("gw/gpt-4o", "gpt-4o")],
)
def test_gateway_upstream_event_costs_openai_price(
    proxy_factory: Any, fake: FakeUpstream, upstream_url: str, model: str, priced_as: str
) -> None:
    """The usage event of a call through a gateway-named upstream costs OpenAI's price for the fake's
    token counts, not $0."""
    sink = MemorySink()
    _, server = proxy_factory({"upstreams": upstreams(upstream_url)}, sinks=[sink])
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as client:
        out = client.chat.completions.create(model=model, messages=MESSAGES)
    assert out.usage is not None and out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    [event] = wait_events(sink, 1)
    assert (event.input_tokens, event.output_tokens) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    expected = openai_nanos(priced_as, out.usage.prompt_tokens, out.usage.completion_tokens)
    assert (event.input_cost_nanos, event.output_cost_nanos) == expected
    assert event.total_cost_nanos == sum(expected) > 0
    assert event.price_source == "genai-prices" and event.provider in ("vllm", "gw")


def test_gateway_model_unknown_everywhere_stays_flagged(
    proxy_factory: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    """A model no provider prices is still 0, `price_source="unknown"`, and counted on /metrics."""
    sink = MemorySink()
    _, server = proxy_factory({"upstreams": upstreams(upstream_url)}, sinks=[sink])
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as client:
        client.chat.completions.create(model="mystery-model", messages=MESSAGES)
    [event] = wait_events(sink, 1)
    assert (event.price_source, event.total_cost_nanos, event.status) == ("unknown", 0, "OK")
    text = httpx.get(server.url + "/metrics").text
    assert 'orq_proxy_unpriced_requests_total{provider="vllm",model="mystery-model"} 1' in text


def test_budget_on_gateway_upstream_reserves_its_price(
    proxy_factory: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    """The budget gate prices a gateway upstream's estimate like metering does: a request whose estimate
    exceeds a $0.000001 budget is refused (estimated at $0 it would pass)."""
    app, server = proxy_factory(
        {"upstreams": upstreams(upstream_url), "api_keys": KEYS}, sinks=[MemorySink()]
    )
    assert app.budget_gate.pricer is app.services.pricer
    response = httpx.post(
        server.url + "/v2/budgets",
        json={"scope": {"project": {"project_id": "proj"}}, "limits": {"amount": 0.000001}},
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    with (
        openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0) as client,
        pytest.raises(openai.RateLimitError) as info,
    ):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "budget_exceeded"
    # at least the 10 output tokens of the cap, at OpenAI's gpt-4o-mini output price
    assert round(body["rejection"]["requested"] * 1e9) >= openai_nanos("gpt-4o-mini", 0, 10)[1] > 0
    assert fake.requests == []  # refused before the upstream
