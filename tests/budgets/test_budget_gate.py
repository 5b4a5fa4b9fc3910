"""The budget gate in the real stack: the `openai` SDK -> proxy (build_app) -> fake upstream, on sockets.

Prices are overridden so costs are exact: `openai/test-model` costs 1,000,000 nano-USD per input token
and 2,000,000 per output token. The request below is estimated at 7 input + 10 output tokens
(27,000,000 nano-USD) and the fake upstream reports 6 + 8 (22,000,000 nano-USD).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
import redis
from pydantic import ValidationError
from ulid import ULID

from orq_proxy.app import OrqProxy
from orq_proxy.budgets.counters import InMemoryCounters
from orq_proxy.budgets.redis_counters import RedisCounters, redis_counters_from_url
from orq_proxy.config import ProxyConfig
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.estimate import estimate_input_tokens
from tests.waiting import wait_for

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ADMIN = "sk-admin"
USER = "sk-user"
KEYS = [
    {"key": ADMIN, "workspace": "ws", "admin": True, "id": "admin"},
    {"key": USER, "workspace": "ws", "id": "user_key", "project": "proj"},
]
PRICES = {"openai/test-model": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}}
IN_NANOS, OUT_NANOS = 1_000_000, 2_000_000
MESSAGES = [{"role": "user", "content": "hello there"}]
EST_NANOS = 7 * IN_NANOS + 10 * OUT_NANOS  # 27,000,000
ACTUAL_NANOS = 6 * IN_NANOS + 8 * OUT_NANOS  # 22,000,000


class Gate:
    """A proxy with budgets, its memory sink, and helpers."""

    def __init__(self, app: OrqProxy, server: ServerThread, sink: MemorySink) -> None:
        self.app, self.server, self.sink = app, server, sink
        # These tests pin the plain estimate (and its documented bound): calibrated reservations, which
        # change with what was settled before, are tested in test_budget_calibration.py.
        app.budget_gate.calibration = None
        self.counters: InMemoryCounters = app.services.budget_counters
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=10)

    def budget(self, body: dict[str, Any]) -> str:
        response = httpx.post(
            self.server.url + "/v2/budgets",
            json=body,
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        budget_id: str = response.json()["budget"]["budgetId"]
        return budget_id

    def usage(self, budget_id: str) -> dict[str, Any]:
        response = httpx.get(
            f"{self.server.url}/v2/budgets/{budget_id}",
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        usage: dict[str, Any] = response.json()["budget"]["usage"]
        return usage

    def chat(self, **kwargs: Any) -> Any:
        kwargs.setdefault("messages", MESSAGES)
        kwargs.setdefault("max_tokens", 10)
        return self.client.chat.completions.create(model="test-model", **kwargs)

    def reserved(self, budget_id: str) -> tuple[int, int]:
        return self.counters.reserved(budget_id)

    def settled(self, budget_id: str, events: int, timeout: float = 5.0) -> None:
        """Wait until no reservation is in flight and the sink holds `events` events."""
        wait_for(lambda: self.reserved(budget_id) == (0, 0) and len(self.sink.events) >= events, timeout)


@pytest.fixture
def gate(proxy_factory: Any, fake: FakeUpstream) -> Iterator[Gate]:
    sink = MemorySink()
    app, server = proxy_factory({"api_keys": KEYS, "prices": PRICES}, clock=FakeClock(START), sinks=[sink])
    gate = Gate(app, server, sink)
    yield gate
    gate.client.close()


def test_budget_exceeded_is_429_through_openai_sdk(gate: Gate) -> None:
    """Requests pass while their estimate fits, then get 429 `budget_exceeded` with the rejection detail."""
    budget_id = gate.budget(
        {
            "scope": {"project": {"project_id": "proj"}},
            "limits": {"period": "BUDGET_PERIOD_MONTHLY", "amount": 0.05},
        }
    )
    gate.chat()
    gate.chat()  # 22 spent + 27 estimated = 49 <= 50 million nano-USD
    gate.settled(budget_id, 2)
    with pytest.raises(openai.RateLimitError) as info:
        gate.chat()
    error = info.value
    assert error.status_code == 429
    body = error.body
    assert isinstance(body, dict) and body["code"] == "budget_exceeded" and body["type"] == "rate_limit_error"
    assert body["param"] is None
    rejection = body["rejection"]
    assert rejection["scope_kind"] == "BUDGET_SCOPE_KIND_PROJECT" and rejection["scope_target_id"] == "proj"
    assert rejection["budget_id"] == budget_id and rejection["dimension"] == "cost"
    assert (rejection["limit"], rejection["used"], rejection["requested"]) == (0.05, 0.044, 0.027)
    assert rejection["resets_at"] == "2026-04-01T00:00:00Z" and rejection["code"] == "budget_exceeded"
    assert "Budget exceeded for project proj" in body["message"]
    headers = error.response.headers
    reset = datetime(2026, 4, 1, tzinfo=UTC)
    assert headers["retry-after"] == str(math.ceil((reset - START).total_seconds()))
    assert headers["x-ratelimit-limit"] == "0.05" and headers["x-ratelimit-remaining"] == "0.006"
    assert headers["x-ratelimit-reset"] == str(int(reset.timestamp()))
    usage = gate.usage(budget_id)
    assert usage == {"amount": 0.044, "tokens": 28, "requests": 2}  # the refused request is not counted
    gate.budget({"scope": {"api_key": {"api_key_id": "user_key"}}, "limits": {"amount": 1.0}})
    with pytest.raises(openai.RateLimitError):  # every applicable budget must pass, not just one
        gate.chat()


def test_rate_limit_is_429_rate_limited(gate: Gate) -> None:
    """Past requests_per_minute, 429 `rate_limited` with Retry-After until the window frees a slot."""
    budget_id = gate.budget(
        {"scope": {"api_key": {"api_key_id": "user_key"}}, "rate_limit": {"requests_per_minute": 2}}
    )
    gate.chat()
    gate.chat()
    with pytest.raises(openai.RateLimitError) as info:
        gate.chat()
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "rate_limited"
    assert body["rejection"]["dimension"] == "requests" and body["rejection"]["limit"] == 2
    assert info.value.response.headers["retry-after"] == "60"  # the fake clock does not move
    assert info.value.response.headers["x-ratelimit-remaining"] == "0"
    assert gate.usage(budget_id)["requests"] == 2


def test_identity_budget_only_applies_to_that_identity(gate: Gate) -> None:
    """An identity-scoped budget blocks that identity (header or body) and nobody else."""
    gate.budget({"scope": {"identity": {"identity_external_id": "u1"}}, "limits": {"amount": 0}})
    with pytest.raises(openai.RateLimitError):
        gate.chat(extra_headers={"X-ORQ-IDENTITY-ID": "u1"})
    with pytest.raises(openai.RateLimitError):
        gate.chat(extra_body={"orq": {"identity": {"id": "u1"}}})
    gate.chat(extra_headers={"X-ORQ-IDENTITY-ID": "u2"})
    gate.chat()


def test_cel_budget_on_metadata(gate: Gate) -> None:
    """A CEL budget matches on request metadata; requests without the key are not affected."""
    gate.budget(
        {"match": {"cel": 'metadata.team == "ml" && model == "test-model"'}, "limits": {"token_limit": 0}}
    )
    with pytest.raises(openai.RateLimitError) as info:
        gate.chat(metadata={"team": "ml"})
    assert isinstance(info.value.body, dict)
    assert info.value.body["rejection"]["scope_kind"] == "BUDGET_SCOPE_KIND_CUSTOM"
    assert info.value.body["rejection"]["dimension"] == "tokens"
    gate.chat(metadata={"team": "ops"})
    gate.chat()


def test_usage_equals_what_metering_charged(gate: Gate) -> None:
    """After mixed requests (JSON, stream, errors), usage on get and list equals the events' totals."""
    budget_id = gate.budget({"scope": {"workspace": {}}, "limits": {"amount": 100.0, "token_limit": 10**6}})
    gate.chat()
    gate.chat(extra_headers={"x-fake-words": "3"})
    list(gate.chat(stream=True))
    list(gate.chat(stream=True, stream_options={"include_usage": True}))
    with pytest.raises(openai.InternalServerError):
        gate.chat(extra_headers={"x-fake-status": "500"})
    gate.client.embeddings.create(model="test-model", input="one two three")
    gate.settled(budget_id, 6)
    events = gate.sink.events
    cost = sum(e.total_cost_nanos for e in events)
    tokens = sum(e.total_tokens for e in events)
    assert cost > 0 and tokens > 0
    usage = gate.usage(budget_id)
    assert usage == {"amount": cost / 1e9, "tokens": tokens, "requests": 6}
    listed = httpx.get(gate.server.url + "/v2/budgets", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert listed["data"][0]["usage"] == usage


def test_stream_settles_with_actual_usage(gate: Gate) -> None:
    """A stream whose client did not ask for usage is still charged its exact usage."""
    budget_id = gate.budget(
        {"scope": {"workspace": {}}, "limits": {"period": "BUDGET_PERIOD_DAILY", "token_limit": 1000}}
    )
    chunks = list(gate.chat(stream=True))
    assert all(c.usage is None for c in chunks)  # hidden from this client
    gate.settled(budget_id, 1)
    assert gate.usage(budget_id)["tokens"] == 14
    assert gate.sink.events[0].usage_source == "exact"


def test_no_reservation_leak_on_upstream_timeout(
    proxy_factory: Any, fake: FakeUpstream, upstream_url: str, request: pytest.FixtureRequest
) -> None:
    """An upstream timeout (504) settles the reservation with what metering charged; nothing stays reserved."""
    sink = MemorySink()
    config = {
        "api_keys": KEYS,
        "prices": PRICES,
        "upstreams": {
            "openai": {"base_url": upstream_url, "api_key": "sk-upstream-secret", "headers_timeout": 0.2}
        },
    }
    app, server = proxy_factory(config, clock=FakeClock(START), sinks=[sink])
    gate = Gate(app, server, sink)
    request.addfinalizer(gate.client.close)
    budget_id = gate.budget({"scope": {"workspace": {}}, "limits": {"amount": 1.0}})
    with pytest.raises(openai.APIStatusError) as info:
        gate.chat(extra_headers={"x-fake-latency-ms": "2000"})
    assert info.value.status_code == 504
    gate.settled(budget_id, 1)
    event = gate.sink.events[0]
    assert event.http_status == 504
    assert gate.usage(budget_id)["amount"] == event.total_cost_nanos / 1e9


async def read_one_chunk_and_leave(url: str) -> None:
    """A streamed chat request whose client reads its first chunk and goes away (upstream 200 ms per chunk)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        request = {"model": "test-model", "messages": MESSAGES, "max_tokens": 10, "stream": True}
        headers = {"authorization": f"Bearer {USER}", "x-fake-chunk-delay-ms": "200"}
        async with client.stream("POST", "/v1/chat/completions", json=request, headers=headers) as response:
            assert response.status_code == 200
            async for _chunk in response.aiter_raw():
                break


def test_no_reservation_leak_on_client_disconnect(gate: Gate) -> None:
    """A client that goes away mid-stream leaves no reservation; what it used is charged once."""
    budget_id = gate.budget({"scope": {"workspace": {}}, "limits": {"amount": 1.0}})

    asyncio.run(read_one_chunk_and_leave(gate.server.url))
    gate.settled(budget_id, 1)
    event = gate.sink.events[0]
    assert event.http_status == 499
    assert gate.usage(budget_id) == {
        "amount": event.total_cost_nanos / 1e9,
        "tokens": event.total_tokens,
        "requests": 1,
    }


def test_no_reservation_leak_on_upstream_error(gate: Gate) -> None:
    """An upstream error answer is charged nothing and releases everything."""
    budget_id = gate.budget({"scope": {"workspace": {}}, "limits": {"amount": 1.0}})
    with pytest.raises(openai.InternalServerError):
        gate.chat(extra_headers={"x-fake-status": "503"})
    gate.settled(budget_id, 1)
    assert gate.usage(budget_id) == {"amount": 0, "tokens": 0, "requests": 1}


def test_concurrent_requests_cannot_overshoot(gate: Gate) -> None:
    """200 concurrent requests against a budget that fits ~10 estimates: never charged past the limit."""
    limit = 10 * EST_NANOS
    budget_id = gate.budget({"scope": {"workspace": {}}, "limits": {"amount": limit / 1e9}})
    statuses = asyncio.run(burst(gate, 200, MESSAGES, 10, latency_ms=50))
    gate.settled(budget_id, len(statuses))  # refused requests are usage events too (429, no cost)
    charged = sum(e.total_cost_nanos for e in gate.sink.events)
    assert statuses.count(200) >= 10 and statuses.count(429) > 100
    assert set(statuses) == {200, 429}
    refused = [e for e in gate.sink.events if e.http_status == 429]
    assert len(refused) == statuses.count(429)
    assert all(e.status == "ERROR" and e.total_cost_nanos == e.total_tokens == 0 for e in refused)
    assert charged <= limit
    assert gate.usage(budget_id)["amount"] == charged / 1e9


def test_overshoot_bound_when_actual_exceeds_estimate(gate: Gate) -> None:
    """When usage beats its estimate, the charge stays within limit + the sum of the excesses."""
    # One-letter words: ~2 bytes per word, so the 4-bytes-per-token estimate is about half the truth.
    messages = [{"role": "user", "content": " ".join("a" * 1 for _ in range(40))}]
    body = {"messages": messages, "max_tokens": 8}
    est = estimate_input_tokens(body) * IN_NANOS + 8 * OUT_NANOS
    actual = (40 + 4) * IN_NANOS + 8 * OUT_NANOS
    assert actual > est
    limit = 10 * est
    budget_id = gate.budget({"scope": {"workspace": {}}, "limits": {"amount": limit / 1e9}})
    statuses = asyncio.run(burst(gate, 200, messages, 8, latency_ms=50))
    admitted = statuses.count(200)
    gate.settled(budget_id, len(statuses))
    served = [e for e in gate.sink.events if e.http_status == 200]
    charged = sum(e.total_cost_nanos for e in served)
    assert len(served) == admitted and all(e.total_cost_nanos == actual for e in served)
    assert charged > limit  # the estimate was wrong, so some overshoot happens...
    assert charged <= limit + admitted * (actual - est)  # ...but never more than the documented bound


async def burst(
    gate: Gate, n: int, messages: list[dict[str, str]], max_tokens: int, latency_ms: int
) -> list[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=gate.server.url, timeout=30, limits=limits) as client:
        body = {"model": "test-model", "messages": messages, "max_tokens": max_tokens}
        headers = {"authorization": f"Bearer {USER}", "x-fake-latency-ms": str(latency_ms)}
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(n))
        )
    return [r.status_code for r in responses]


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_gate(proxy_factory: Any, fake: FakeUpstream, redis_url: str) -> Iterator[Gate]:
    """A gate whose counters live in Redis (random key prefix, deleted afterwards)."""
    prefix = f"test-orq:{ULID()}:"
    counters = redis_counters_from_url(REDIS_URL, prefix=prefix)
    sink = MemorySink()
    app, server = proxy_factory(
        {"api_keys": KEYS, "prices": PRICES}, clock=FakeClock(START), sinks=[sink], budget_counters=counters
    )
    gate = Gate(app, server, sink)
    sync = redis.Redis.from_url(REDIS_URL)

    def reserved(budget_id: str) -> tuple[int, int]:
        values = sync.hmget(f"{prefix}{{ws}}:{budget_id}:h", ["rn", "rt"])
        return int(values[0] or 0), int(values[1] or 0)

    gate.reserved = reserved  # type: ignore[method-assign]
    yield gate
    gate.client.close()
    assert server.loop is not None
    asyncio.run_coroutine_threadsafe(counters.aclose(), server.loop).result(10)
    keys = list(sync.scan_iter(match=prefix + "*", count=1000))
    if keys:
        sync.delete(*keys)
    sync.close()


def test_redis_counters_through_the_proxy(redis_gate: Gate) -> None:
    """With Redis counters: 429s, usage equal to metering, and the concurrency bound all hold."""
    gate = redis_gate
    limit = 10 * EST_NANOS
    budget_id = gate.budget({"scope": {"workspace": {}}, "limits": {"amount": limit / 1e9}})
    statuses = asyncio.run(burst(gate, 100, MESSAGES, 10, latency_ms=50))
    gate.settled(budget_id, len(statuses))
    charged = sum(e.total_cost_nanos for e in gate.sink.events)
    assert statuses.count(200) >= 10 and statuses.count(429) > 50 and charged <= limit
    assert gate.usage(budget_id) == {
        "amount": charged / 1e9,
        "tokens": sum(e.total_tokens for e in gate.sink.events),
        "requests": statuses.count(200),
    }
    with pytest.raises(openai.RateLimitError) as info:
        while True:
            gate.chat()
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "budget_exceeded"


def test_storage_counters_setting(proxy_factory: Any, fake: FakeUpstream, redis_url: str) -> None:
    """`[storage] counters` picks the backend; anything else is a config error naming the key."""
    app, _ = proxy_factory({"storage": {"counters": REDIS_URL}})
    assert isinstance(app.services.budget_counters, RedisCounters)
    app, _ = proxy_factory({})
    assert isinstance(app.services.budget_counters, InMemoryCounters)
    with pytest.raises(ValidationError, match="counters must be 'memory' or a redis:// URL"):
        ProxyConfig.model_validate({"storage": {"counters": "postgres://x"}})


def test_sdk_default_retries_do_not_repeat_a_refusal(gate: Gate, fake: FakeUpstream) -> None:
    """The openai SDK retries 429 twice by default; the proxy's own 429 says `x-should-retry: false`, so
    a refused call is one request and one error event, for a budget and for a rate limit alike."""
    gate.budget({"scope": {"project": {"project_id": "proj"}}, "rate_limit": {"requests_per_minute": 1}})
    gate.budget({"scope": {"api_key": {"api_key_id": "user_key"}}, "limits": {"amount": 0.0}})
    with openai.OpenAI(base_url=gate.server.url + "/v1", api_key=USER, timeout=10) as retrying:
        assert retrying.max_retries == 2  # the SDK's default, which this test is about
        with pytest.raises(openai.RateLimitError) as info:  # the amount-0 budget refuses first
            retrying.chat.completions.create(model="test-model", messages=MESSAGES, max_tokens=10)
        assert info.value.response.headers["x-should-retry"] == "false"
    wait_for(lambda: len(gate.sink.events) >= 1)
    time.sleep(0.3)  # longer than the bus flush: retried requests would show up as more events
    assert [e.http_status for e in gate.sink.events] == [429]
    assert fake.requests == []


@pytest.mark.parametrize("size", [10_000, 1_000_000])
def test_an_anthropic_image_counts_as_one_image_whatever_its_size(size: int) -> None:
    """An image block (base64 or URL) counts `IMAGE_TOKENS`; a document's base64 still counts as its text
    (bytes/4: a PDF's pages are billed as text and images, which its size bounds)."""
    from orq_proxy.usage.estimate import IMAGE_TOKENS

    def message(*blocks: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": [*blocks, {"type": "text", "text": "abcd" * 5}]}]}

    text_only = estimate_input_tokens(message())
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * size}}
    by_url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "A" * size},
    }
    assert estimate_input_tokens(message(image)) == text_only + IMAGE_TOKENS
    assert estimate_input_tokens(message(image, by_url)) == text_only + 2 * IMAGE_TOKENS
    assert estimate_input_tokens(message(pdf)) >= text_only + size // 4


def test_redis_settlement_of_a_client_that_left_lands_once(
    proxy_factory: Any, fake: FakeUpstream, redis_url: str
) -> None:
    """With Redis counters the gate sends each settlement at once and takes its reply by callback (no task,
    no await): 20 clients that leave mid-stream each leave no reservation in Redis and are charged once."""
    from ulid import ULID

    from orq_proxy.budgets.redis_counters import redis_counters_from_url

    prefix = f"test-orq:{ULID()}:"
    counters = redis_counters_from_url(redis_url, prefix=prefix)
    sink = MemorySink()
    app, server = proxy_factory(
        {"api_keys": KEYS, "prices": PRICES}, clock=FakeClock(START), sinks=[sink], budget_counters=counters
    )
    gate = Gate(app, server, sink)
    budget_id = gate.budget({"scope": {"workspace": {}}, "limits": {"amount": 1.0}})

    async def twenty() -> None:
        await asyncio.gather(*(read_one_chunk_and_leave(server.url) for _ in range(20)))

    asyncio.run(twenty())
    wait_for(lambda: len(sink.events) >= 20)
    assert {e.http_status for e in sink.events} == {499}
    charged = sum(e.total_cost_nanos for e in sink.events)
    wait_for(lambda: gate.usage(budget_id)["amount"] * 1e9 == pytest.approx(charged))
    assert gate.usage(budget_id)["requests"] == 20
    assert server.loop is not None
    assert not app.budget_gate._pending  # every reply came back
    asyncio.run_coroutine_threadsafe(counters.aclose(), server.loop).result(10)
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    assert any(key.endswith(b":h") for key in keys)  # the budget's counters are there...
    assert not [key for key in keys if b":res:" in key]  # ...and no reservation is still open
    assert all(client.zcard(key) == 0 for key in keys if key.endswith(b":rs"))
    if keys:
        client.delete(*keys)
    client.close()
