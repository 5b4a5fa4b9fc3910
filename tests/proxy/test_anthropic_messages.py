"""Anthropic's Messages API through the proxy, as Claude Code and the official `anthropic` SDK call it: the
real SDK (sync, async, streaming, `count_tokens`) -> the real proxy on a socket -> the fake upstream's
Messages API. Attribution from each source, budgets refusing in Anthropic's error shape, usage events priced
by genai-prices with cache reads and both cache-write TTLs at their own rates.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from genai_prices import Usage, calc_price

from orq_proxy.app import OrqProxy
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.fake_upstream import FakeUpstream, RecordedRequest
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.money import usd_to_nanos
from tests.waiting import wait_for

UPSTREAM_KEY = "sk-upstream-secret"
ADMIN, USER, OWNED = "sk-admin", "sk-user", "sk-owned"
KEYS = [
    {"key": ADMIN, "workspace": "ws", "admin": True, "id": "admin"},
    {"key": USER, "workspace": "ws", "id": "user_key"},
    {"key": OWNED, "workspace": "ws", "id": "owned_key", "owner": "dev-owner"},
]
MODEL = "claude-opus-4-7"
PROMPT = [{"role": "user", "content": "write me a short poem about budgets"}]


def upstreams(root: str) -> dict[str, Any]:
    """OpenAI-format default on the fake's `/v1`, and an Anthropic upstream on the fake's root (the SDK's
    own base URL convention: the proxy adds `/v1`)."""
    return {
        "openai": {"base_url": root + "/v1", "api_key": UPSTREAM_KEY, "default": True},
        "anthropic": {"base_url": root, "api": "anthropic", "api_key": UPSTREAM_KEY},
    }


@pytest.fixture
def root(fake_server: tuple[FakeUpstream, ServerThread]) -> str:
    return fake_server[1].url


@pytest.fixture
def proxy(
    proxy_factory: Any, fake: FakeUpstream, root: str
) -> Iterator[tuple[OrqProxy, ServerThread, MemorySink]]:
    sink = MemorySink()
    app, server = proxy_factory({"upstreams": upstreams(root), "api_keys": KEYS}, sinks=[sink])
    yield app, server, sink


def wait_events(sink: MemorySink, n: int) -> list[UsageEvent]:
    wait_for(lambda: len(sink.events) >= n, what=f"{n} usage events")
    time.sleep(0.05)  # nothing more should come
    assert len(sink.events) == n, sink.events
    return list(sink.events)


def client(server: ServerThread, key: str = USER, max_retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=max_retries)


def last_messages_request(fake: FakeUpstream) -> RecordedRequest:
    found = [r for r in fake.requests if r.path.startswith("/v1/messages")]
    assert found, [r.path for r in fake.requests]
    return found[-1]


def anthropic_nanos(model: str, usage: anthropic.types.Usage) -> tuple[int, int]:
    """(input, output) nano-USD of Anthropic's reported usage, straight from genai-prices (whose
    `input_tokens` is all of the input, cache reads and writes included)."""
    read = usage.cache_read_input_tokens or 0
    write = usage.cache_creation_input_tokens or 0
    write_1h = usage.cache_creation.ephemeral_1h_input_tokens if usage.cache_creation else 0
    price = calc_price(
        Usage(
            input_tokens=usage.input_tokens + read + write,
            output_tokens=usage.output_tokens,
            cache_read_tokens=read,
            cache_write_tokens=write,
            cache_write_1h_tokens=write_1h,
        ),
        model,
        provider_id="anthropic",
    )
    return usd_to_nanos(price.input_price), usd_to_nanos(price.output_price)


def test_sync_create_is_forwarded_metered_and_priced(proxy: Any, fake: FakeUpstream) -> None:
    """The SDK's call reaches the Anthropic upstream with the upstream's key (never the client's), the
    client's `anthropic-version` and `anthropic-beta` unchanged; the event carries Anthropic's usage with
    the cache split, priced at genai-prices' rates for each part."""
    _, server, sink = proxy
    with client(server) as c:
        message = c.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=PROMPT,
            extra_headers={
                "anthropic-beta": "prompt-caching-2024-07-31",
                "x-fake-cache-read-tokens": "3",
                "x-fake-cache-write-tokens": "2",
                "x-fake-cache-write-1h-tokens": "1",
            },
        )
    assert message.type == "message" and message.content[0].type == "text"
    usage = message.usage
    assert usage.cache_read_input_tokens == 3 and usage.cache_creation_input_tokens == 3
    sent = last_messages_request(fake)
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == UPSTREAM_KEY and "authorization" not in sent.headers
    assert sent.headers["anthropic-version"] == c.default_headers["anthropic-version"]
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert USER not in json.dumps(sent.headers)

    [event] = wait_events(sink, 1)
    total_input = usage.input_tokens + 3 + 3
    assert (event.provider, event.model, event.product) == ("anthropic", f"anthropic/{MODEL}", "messages")
    assert (event.status, event.http_status, event.stream) == ("OK", 200, False)
    assert (event.input_tokens, event.output_tokens) == (total_input, usage.output_tokens)
    assert event.total_tokens == total_input + usage.output_tokens
    assert (event.cached_input_tokens, event.cache_write_tokens, event.cache_write_1h_tokens) == (3, 3, 1)
    expected = anthropic_nanos(MODEL, usage)
    assert (event.input_cost_nanos, event.output_cost_nanos) == expected
    assert event.total_cost_nanos == sum(expected) > 0
    assert event.usage_source == "exact" and event.price_source == "genai-prices"


def test_cache_writes_are_priced_once_at_their_own_rate(proxy: Any, fake: FakeUpstream) -> None:
    """Against hand-computed figures for claude-opus-4-7 ($5 input, $0.50 cache read, $6.25 5-minute write,
    $10 1-hour write, $25 output per MTok): writes are neither counted twice nor billed at the input rate."""
    _, server, sink = proxy
    headers = {
        "x-fake-cache-read-tokens": "4",
        "x-fake-cache-write-tokens": "2",
        "x-fake-cache-write-1h-tokens": "2",
    }
    with client(server) as c:
        message = c.messages.create(model=MODEL, max_tokens=5, messages=PROMPT, extra_headers=headers)
    plain = message.usage.input_tokens
    [event] = wait_events(sink, 1)
    # 1 nano-USD = 1e-9 USD; per token: input 5000, read 500, 5m write 6250, 1h write 10000, output 25000.
    assert event.input_cost_nanos == plain * 5000 + 4 * 500 + 2 * 6250 + 2 * 10000
    assert event.output_cost_nanos == message.usage.output_tokens * 25000
    assert event.cache_write_cost_nanos == 2 * 6250 + 2 * 10000
    assert event.cached_cost_nanos == 4 * 500


def test_bearer_token_is_accepted_as_claude_code_sends_it(proxy: Any, fake: FakeUpstream) -> None:
    """`ANTHROPIC_AUTH_TOKEN` makes Claude Code send `Authorization: Bearer`: accepted too."""
    _, server, sink = proxy
    with anthropic.Anthropic(base_url=server.url, auth_token=USER, max_retries=0) as c:
        message = c.messages.create(model=MODEL, max_tokens=8, messages=PROMPT)
    assert message.usage.output_tokens > 0
    assert last_messages_request(fake).headers["x-api-key"] == UPSTREAM_KEY
    [event] = wait_events(sink, 1)
    assert event.api_key_id == "user_key"


def test_stream_usage_with_late_cache_split(proxy: Any, fake: FakeUpstream) -> None:
    """A stream whose 1-hour cache-write split only arrives in `message_delta`: the event still prices the
    1-hour writes at the 1-hour rate, and records TTFT."""
    _, server, sink = proxy
    headers = {
        "x-fake-cache-write-tokens": "1",
        "x-fake-cache-write-1h-tokens": "3",
        "x-fake-anthropic-late-usage": "1",
        "x-fake-words": "6",
    }
    with (
        client(server) as c,
        c.messages.stream(model=MODEL, max_tokens=50, messages=PROMPT, extra_headers=headers) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert len(text.split()) == 6
    [event] = wait_events(sink, 1)
    assert event.stream and event.ttft_ms is not None and event.status == "OK"
    assert event.output_tokens == final.usage.output_tokens == 6
    assert (event.cache_write_tokens, event.cache_write_1h_tokens) == (4, 3)
    assert event.cache_write_cost_nanos == 1 * 6250 + 3 * 10000
    # (The SDK's final message drops the late TTL split; the figures are Anthropic's rates per token.)
    assert event.input_cost_nanos == final.usage.input_tokens * 5000 + 1 * 6250 + 3 * 10000
    assert event.output_cost_nanos == 6 * 25000


def test_async_client(proxy: Any, fake: FakeUpstream) -> None:
    _, server, sink = proxy

    async def run() -> list[int]:
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key=USER, max_retries=0) as c:
            results = await asyncio.gather(
                *(c.messages.create(model=MODEL, max_tokens=16, messages=PROMPT) for _ in range(5))
            )
        return [r.usage.output_tokens for r in results]

    outputs = asyncio.run(run())
    events = wait_events(sink, 5)
    assert sorted(e.output_tokens for e in events) == sorted(outputs)
    assert all(e.total_cost_nanos > 0 and e.product == "messages" for e in events)


def test_count_tokens_is_answered_by_the_upstream(proxy: Any, fake: FakeUpstream) -> None:
    """`count_tokens` is the upstream's answer (never a local guess), and costs nothing."""
    _, server, sink = proxy
    with client(server) as c:
        counted = c.messages.count_tokens(model=MODEL, messages=PROMPT, system="be brief")
        created = c.messages.create(model=MODEL, max_tokens=4, messages=PROMPT, system="be brief")
    assert counted.input_tokens == created.usage.input_tokens > 0
    assert last_messages_request(fake).path == "/v1/messages"
    assert any(r.path == "/v1/messages/count_tokens" for r in fake.requests)
    counting, _ = sorted(wait_events(sink, 2), key=lambda e: e.product, reverse=True)
    assert counting.product == "messages.count_tokens"
    assert (counting.total_cost_nanos, counting.input_tokens, counting.status) == (0, 0, "OK")


def test_identity_sources(proxy: Any, fake: FakeUpstream) -> None:
    """Body `orq.identity` (upserted, never forwarded), then `X-ORQ-IDENTITY-ID`, then Anthropic's
    `metadata.user_id` (tag only), then the key's owner."""
    _, server, sink = proxy
    with client(server) as c:
        c.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=PROMPT,
            extra_body={"orq": {"identity": {"id": "dev-body", "display_name": "Body Dev"}}},
            metadata={"user_id": "dev-meta"},
        )
        body_sent = last_messages_request(fake).json
        c.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=PROMPT,
            metadata={"user_id": "dev-meta"},
            extra_headers={"X-ORQ-IDENTITY-ID": "dev-header"},
        )
        c.messages.create(model=MODEL, max_tokens=4, messages=PROMPT, metadata={"user_id": "dev-meta"})
    with client(server, OWNED) as c:
        c.messages.create(model=MODEL, max_tokens=4, messages=PROMPT)
        # An owner-only key: another user id is passed over (not refused), the owner is charged.
        c.messages.create(model=MODEL, max_tokens=4, messages=PROMPT, metadata={"user_id": "someone-else"})
    assert "orq" not in body_sent and body_sent["metadata"] == {"user_id": "dev-meta"}
    events = sorted(wait_events(sink, 5), key=lambda e: e.event_id)
    assert [(e.identity, e.identity_source) for e in events] == [
        ("dev-body", "body"),
        ("dev-header", "header"),
        ("dev-meta", "metadata"),
        ("dev-owner", "owner"),
        ("dev-owner", "owner"),
    ]
    response = httpx.get(server.url + "/v2/identities/dev-body", headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200 and "Body Dev" in response.text
    assert (
        httpx.get(
            server.url + "/v2/identities/dev-meta", headers={"Authorization": f"Bearer {ADMIN}"}
        ).status_code
        == 404
    )  # tagged, not created


def identity_budget(server: ServerThread, identity: str, amount: float) -> None:
    """A monthly cost budget of `amount` USD on `identity`, made through the budgets API."""
    created = httpx.post(
        server.url + "/v2/budgets",
        headers={"Authorization": f"Bearer {ADMIN}"},
        json={
            "scope": {"identity": {"identity_external_id": identity}},
            "limits": {"period": "BUDGET_PERIOD_MONTHLY", "amount": amount},
        },
    )
    assert created.status_code == 200, created.text


def test_budget_refusal_in_anthropic_shape(proxy: Any, fake: FakeUpstream) -> None:
    """A spent budget: `anthropic.RateLimitError` with Anthropic's error body, sent once (the SDK honours
    `x-should-retry: false` even with retries on), and the upstream never called."""
    _, server, sink = proxy
    identity_budget(server, "capped-dev", 0.000001)
    with client(server, max_retries=2) as c, pytest.raises(anthropic.RateLimitError) as raised:
        c.messages.create(
            model=MODEL, max_tokens=1000, messages=PROMPT, extra_headers={"X-ORQ-IDENTITY-ID": "capped-dev"}
        )
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error" and "Budget exceeded" in body["error"]["message"]
    assert not [r for r in fake.requests if r.path.startswith("/v1/messages")]
    [event] = wait_events(sink, 1)
    assert (event.http_status, event.identity, event.product) == (429, "capped-dev", "messages")


def test_a_screenshot_is_reserved_as_an_image_not_as_its_bytes(proxy: Any, fake: FakeUpstream) -> None:
    """Claude Code sends screenshots as base64 image blocks: a 1 MB one is reserved as one image (at most
    1,600 tokens), not as the quarter million tokens its base64 text would be, so a $0.10 budget admits it
    (reserved as bytes it would need ~$2.60 on this model, calibration's 2x seed included)."""
    _, server, sink = proxy
    identity_budget(server, "screenshot-dev", 0.10)
    screenshot = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(750_000)).decode()
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": screenshot}},
        {"type": "text", "text": "why is this button red"},
    ]
    with client(server) as c:
        answer = c.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": content}],  # type: ignore[typeddict-item]
            extra_headers={"X-ORQ-IDENTITY-ID": "screenshot-dev"},
        )
    assert answer.usage.input_tokens > 0
    [event] = wait_events(sink, 1)
    assert (event.http_status, event.identity) == (200, "screenshot-dev") and event.total_cost_nanos > 0


def test_proxy_errors_keep_anthropics_shape(proxy: Any, fake: FakeUpstream) -> None:
    _, server, _ = proxy
    with client(server, "sk-wrong") as c, pytest.raises(anthropic.AuthenticationError) as raised:
        c.messages.create(model=MODEL, max_tokens=4, messages=PROMPT)
    assert raised.value.body["type"] == "error"  # type: ignore[index]
    assert raised.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with client(server) as c, pytest.raises(anthropic.BadRequestError) as bad:
        c.messages.create(model="openai/gpt-4o-mini", max_tokens=4, messages=PROMPT)
    error = bad.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and "Anthropic" in error["message"]
    assert error["param"] == "model"
    # The upstream's own errors pass through as it sent them.
    with client(server) as c, pytest.raises(anthropic.InternalServerError) as upstream:
        c.messages.create(model=MODEL, max_tokens=4, messages=PROMPT, extra_headers={"x-fake-status": "529"})
    assert upstream.value.status_code == 529
    assert upstream.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_stream_cut_short_keeps_the_exact_input(proxy: Any, fake: FakeUpstream) -> None:
    """An upstream that dies after `message_start`: one event, estimated, whose input is the stream's own
    exact figure (not the proxy's guess) and whose output counts what arrived."""
    _, server, sink = proxy
    headers = {"x-fake-disconnect-after": "6", "x-fake-words": "40", "x-fake-cache-read-tokens": "2"}
    with (
        client(server) as c,
        pytest.raises(Exception, match=r"incomplete chunked read|peer closed"),  # the broken stream
        c.messages.stream(model=MODEL, max_tokens=100, messages=PROMPT, extra_headers=headers) as stream,
    ):
        for _ in stream.text_stream:
            pass
    [event] = wait_events(sink, 1)
    with client(server) as c:
        full = c.messages.create(
            model=MODEL, max_tokens=100, messages=PROMPT, extra_headers={"x-fake-cache-read-tokens": "2"}
        )
    assert event.usage_source == "estimated" and event.status == "ERROR"
    assert event.input_tokens == full.usage.input_tokens + 2 and event.cached_input_tokens == 2
    assert 0 < event.output_tokens < 40


def test_price_override_prices_cache_writes(proxy_factory: Any, fake: FakeUpstream, root: str) -> None:
    """`[prices."anthropic/..."]` with its own cache-write prices: each part at its configured rate."""
    sink = MemorySink()
    prices = {
        "anthropic/my-claude": {
            "input_per_mtok": 1.0,
            "output_per_mtok": 2.0,
            "cached_input_per_mtok": 0.1,
            "cache_write_per_mtok": 1.25,
            "cache_write_1h_per_mtok": 2.0,
        }
    }
    _, server = proxy_factory(
        {"upstreams": upstreams(root), "api_keys": KEYS, "prices": prices}, sinks=[sink]
    )
    headers = {
        "x-fake-cache-read-tokens": "2",
        "x-fake-cache-write-tokens": "3",
        "x-fake-cache-write-1h-tokens": "1",
    }
    with client(server) as c:
        message = c.messages.create(model="my-claude", max_tokens=4, messages=PROMPT, extra_headers=headers)
    [event] = wait_events(sink, 1)
    assert event.price_source == "override"
    assert event.cache_write_cost_nanos == 3 * 1250 + 1 * 2000
    assert event.input_cost_nanos == message.usage.input_tokens * 1000 + 2 * 100 + 3 * 1250 + 1 * 2000
    assert event.output_cost_nanos == message.usage.output_tokens * 2000
