"""Output that cannot outrun its reservation: when a budget applies, the output cap the gate reserved is
forwarded as the upstream's own limit (chat `max_completion_tokens`, legacy `max_tokens`, Responses
`max_output_tokens`), so the answer stops there (`finish_reason: "length"`, or an incomplete Response).
Without a budget the request is forwarded byte for byte. Through a real proxy, the `openai` SDK and the
fake upstream (which answers `x-fake-words` words unless a cap stops it, as OpenAI does).

`openai/test-model` costs 1,000 nano-USD per input token and 2,000 per output token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest

from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.usage.events import UsageEvent
from tests.waiting import wait_for

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ADMIN, USER = "sk-admin", "sk-user"
KEYS = [
    {"key": ADMIN, "workspace": "ws", "admin": True, "id": "admin"},
    {"key": USER, "workspace": "ws", "id": "user_key", "project": "proj"},
]
PRICES = {"openai/test-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
MESSAGES = [{"role": "user", "content": "hello there"}]
DEFAULT_CAP = 20  # `[budgets] default_max_output_tokens` here
LONG = {"x-fake-words": "50"}  # the upstream would answer 50 words without a cap


class Proxy:
    def __init__(self, url: str, sink: MemorySink) -> None:
        self.url, self.sink = url, sink
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=USER, max_retries=0, timeout=10)

    def budget(self, limits: dict[str, Any] | None = None) -> str:
        response = httpx.post(
            self.url + "/v2/budgets",
            json={"scope": {"workspace": {}}, "limits": limits or {"amount": 1.0}},
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        budget_id: str = response.json()["budget"]["budgetId"]
        return budget_id

    def event(self, index: int = 0) -> UsageEvent:
        wait_for(lambda: len(self.sink.events) > index)
        return self.sink.events[index]


@pytest.fixture
def proxy(proxy_factory: Any, fake: FakeUpstream) -> Iterator[Proxy]:
    sink = MemorySink()
    config = {"api_keys": KEYS, "prices": PRICES, "budgets": {"default_max_output_tokens": DEFAULT_CAP}}
    app, server = proxy_factory(config, clock=FakeClock(START), sinks=[sink])
    app.budget_gate.calibration = None  # exact reservations here; calibrated ones: test_budget_calibration.py
    proxy = Proxy(server.url, sink)
    yield proxy
    proxy.client.close()


def forwarded(fake: FakeUpstream) -> dict[str, Any]:
    assert len(fake.requests) == 1
    body: dict[str, Any] = fake.requests[0].json
    return body


# --- chat ------------------------------------------------------------------------------------------------


def test_chat_json_without_a_cap_is_capped_at_the_reservation(proxy: Proxy, fake: FakeUpstream) -> None:
    """No max_tokens: the default the gate reserved goes upstream as `max_completion_tokens`; the answer
    stops there with finish_reason "length", and the event says the cap was applied."""
    proxy.budget()
    answer = proxy.client.chat.completions.create(model="test-model", messages=MESSAGES, extra_headers=LONG)  # type: ignore[arg-type]
    assert forwarded(fake)["max_completion_tokens"] == DEFAULT_CAP and "max_tokens" not in forwarded(fake)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == DEFAULT_CAP
    event = proxy.event()
    assert event.metadata["output_capped"] == str(DEFAULT_CAP) and event.output_tokens == DEFAULT_CAP


def test_chat_stream_is_capped_and_ends_cleanly(proxy: Proxy, fake: FakeUpstream) -> None:
    """A stream without a cap: capped upstream, so its last chunk says "length" and it ends with [DONE]."""
    proxy.budget()
    stream = proxy.client.chat.completions.create(
        model="test-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_headers=LONG,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == DEFAULT_CAP
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert forwarded(fake)["max_completion_tokens"] == DEFAULT_CAP
    event = proxy.event()
    assert event.stream and event.usage_source == "exact" and event.output_tokens == DEFAULT_CAP
    assert event.metadata["output_capped"] == str(DEFAULT_CAP)


def test_chat_caps_every_field_an_upstream_may_read(proxy: Proxy, fake: FakeUpstream) -> None:
    """`max_completion_tokens: 5` reserves 5; a `max_tokens: 1000` sent alongside it is lowered to 5 (an
    upstream may read that one instead)."""
    proxy.budget()
    proxy.client.chat.completions.create(
        model="test-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_completion_tokens=5,
        max_tokens=1000,
        extra_headers=LONG,
    )
    body = forwarded(fake)
    assert (body["max_completion_tokens"], body["max_tokens"]) == (5, 5)
    assert proxy.event().metadata["output_capped"] == "5"


@pytest.mark.parametrize("value", ["9999", -1, 0, 12.5, True])
def test_chat_cap_the_gate_could_not_read_is_replaced(proxy: Proxy, fake: FakeUpstream, value: Any) -> None:
    """A cap that is not a positive integer reserves the default, and the default replaces it upstream, in
    the field the client used (a lenient upstream reads "9999" as 9999, llama.cpp reads -1 as no limit)."""
    proxy.budget()
    body = {"model": "test-model", "messages": MESSAGES, "max_tokens": value}
    response = httpx.post(
        proxy.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {USER}", **LONG}
    )
    assert response.status_code == 200
    cap = 12 if value == 12.5 else DEFAULT_CAP  # a float is read as its integer part, and sent as that
    sent = forwarded(fake)
    assert sent["max_tokens"] == cap and "max_completion_tokens" not in sent
    assert response.json()["usage"]["completion_tokens"] == cap


def test_client_cap_within_the_reservation_is_forwarded_untouched(proxy: Proxy, fake: FakeUpstream) -> None:
    """A request whose own cap is what the gate reserved is not changed: the client's bytes go upstream."""
    proxy.budget()
    raw = json.dumps({"model": "test-model", "messages": MESSAGES, "max_tokens": 7}).encode()
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        content=raw,
        headers={"authorization": f"Bearer {USER}", "content-type": "application/json"},
    )
    assert response.status_code == 200 and fake.requests[0].body == raw
    assert "output_capped" not in proxy.event().metadata


def test_no_budget_means_byte_for_byte_forwarding(proxy: Proxy, fake: FakeUpstream) -> None:
    """Without a budget nothing is added: no cap, the body exactly as sent, the upstream's full answer."""
    raw = b'{"model":"test-model",  "messages":[{"role":"user","content":"hello there"}]}'
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        content=raw,
        headers={"authorization": f"Bearer {USER}", "content-type": "application/json", **LONG},
    )
    assert response.status_code == 200 and fake.requests[0].body == raw
    assert response.json()["usage"]["completion_tokens"] == 50
    assert "output_capped" not in proxy.event().metadata


def test_concurrent_uncapped_requests_stay_within_the_limit(proxy: Proxy, fake: FakeUpstream) -> None:
    """20 concurrent requests without max_tokens against a budget fitting ~5 reservations: the upstream
    would write 50 words each (2.5x the reserved 20), but the cap holds them to it: charged <= limit."""
    estimate = 7 * 1_000 + DEFAULT_CAP * 2_000  # 47,000 nano-USD
    limit = 5 * estimate + 1_000
    proxy.budget({"amount": limit / 1e9})

    async def burst() -> list[httpx.Response]:
        body = {"model": "test-model", "messages": MESSAGES}
        headers = {"authorization": f"Bearer {USER}", "x-fake-latency-ms": "50", **LONG}
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(20))
            )

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert statuses.count(200) == 5 and statuses.count(429) == 15
    wait_for(lambda: len(proxy.sink.events) == 20)
    served = [e for e in proxy.sink.events if e.http_status == 200]
    assert all(e.output_tokens == DEFAULT_CAP for e in served)
    assert sum(e.total_cost_nanos for e in proxy.sink.events) <= limit


# --- legacy completions ----------------------------------------------------------------------------------


def test_legacy_completion_without_a_cap_keeps_its_default_of_16(proxy: Proxy, fake: FakeUpstream) -> None:
    """Legacy completions stop at 16 tokens when max_tokens is absent (OpenAI's default): the gate reserves
    16 and forwards `max_tokens: 16`, the same answer as before, now bounded for any upstream."""
    proxy.budget()
    answer = proxy.client.completions.create(model="test-model", prompt="hello there", extra_headers=LONG)
    assert forwarded(fake)["max_tokens"] == 16
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 16
    assert proxy.event().metadata["output_capped"] == "16"


# --- responses -------------------------------------------------------------------------------------------


def test_responses_json_is_capped(proxy: Proxy, fake: FakeUpstream) -> None:
    """Responses without max_output_tokens: the reservation goes upstream as `max_output_tokens`, and the
    Response comes back incomplete at that many output tokens."""
    proxy.budget()
    response = proxy.client.responses.create(model="test-model", input="hello there", extra_headers=LONG)
    assert forwarded(fake)["max_output_tokens"] == DEFAULT_CAP
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == DEFAULT_CAP
    assert proxy.event().metadata["output_capped"] == str(DEFAULT_CAP)


def test_responses_stream_is_capped(proxy: Proxy, fake: FakeUpstream) -> None:
    """A Responses stream: capped upstream, it ends with `response.incomplete` at the reserved output."""
    proxy.budget()
    events = list(
        proxy.client.responses.create(
            model="test-model", input="hello there", stream=True, extra_headers=LONG
        )
    )
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == DEFAULT_CAP and events[-1].type == "response.incomplete"
    assert forwarded(fake)["max_output_tokens"] == DEFAULT_CAP
    event = proxy.event()
    assert event.stream and event.output_tokens == DEFAULT_CAP
    assert event.metadata["output_capped"] == str(DEFAULT_CAP)
