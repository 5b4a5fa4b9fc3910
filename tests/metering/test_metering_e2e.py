"""Metering end to end: the real `openai` SDK -> the real proxy on a socket -> the fake upstream.

Each event's tokens must equal what the upstream reported, and its cost what `genai-prices` computes for
that usage; streams must reach the client exactly as OpenAI would send them; every ending (disconnect,
upstream death, upstream error) gives exactly one flagged event; identity metrics add up exactly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from genai_prices import Usage, calc_price
from orq_ai_sdk import Orq

from orq_proxy.app import OrqProxy
from orq_proxy.eventstore.duckdb import EVENTS_TABLE
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.money import usd_to_nanos

MESSAGES: list[Any] = [{"role": "user", "content": "count the words in this prompt"}]
UPSTREAM_KEY = "sk-upstream-secret"


def closing_client(server: ServerThread, request: pytest.FixtureRequest) -> openai.OpenAI:
    """An SDK client on the proxy, closed when the test ends (no leaked sockets)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    request.addfinalizer(client.close)
    return client


def wait_events(sink: MemorySink, n: int, timeout: float = 3.0) -> list[UsageEvent]:
    """The sink's events once there are `n` (and still `n` a moment later: never more than one each)."""
    deadline = time.monotonic() + timeout
    while len(sink.events) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {n} events, got {len(sink.events)}")
        time.sleep(0.01)
    time.sleep(0.15)  # longer than the bus flush interval: a duplicate would show up now
    assert len(sink.events) == n, [e.usage_note for e in sink.events]
    return list(sink.events)


def genai_cost(model: str, input_tokens: int, output_tokens: int, cached: int = 0) -> tuple[int, int, int]:
    """(input, output, total) nano-USD straight from genai-prices."""
    price = calc_price(
        Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached or None),
        model,
        provider_id="openai",
    )
    return usd_to_nanos(price.input_price), usd_to_nanos(price.output_price), usd_to_nanos(price.total_price)


def assert_cost(event: UsageEvent, model: str) -> None:
    expected = genai_cost(model, event.input_tokens, event.output_tokens, event.cached_input_tokens)
    assert (event.input_cost_nanos, event.output_cost_nanos, event.total_cost_nanos) == expected
    assert event.total_cost_nanos > 0 and event.price_source == "genai-prices"


@pytest.fixture
def metered(proxy_factory: Any) -> Iterator[tuple[OrqProxy, ServerThread, MemorySink, openai.OpenAI]]:
    sink = MemorySink()
    app, server = proxy_factory(sinks=[sink])
    with openai.OpenAI(base_url=server.url + "/v1", api_key="sk-client", max_retries=0) as client:
        yield app, server, sink, client


DETAILS = {"x-fake-cached-tokens": "3", "x-fake-reasoning-tokens": "2"}


def test_chat_json_exact_usage_and_cost(metered: Any, fake: FakeUpstream) -> None:
    """JSON chat: event tokens = the upstream's usage (details too), cost = genai-prices."""
    _, _, sink, client = metered
    out = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=DETAILS)
    assert out.usage is not None
    [event] = wait_events(sink, 1)
    assert (event.input_tokens, event.output_tokens, event.total_tokens) == (
        out.usage.prompt_tokens,
        out.usage.completion_tokens,
        out.usage.total_tokens,
    )
    assert out.usage.prompt_tokens_details and out.usage.completion_tokens_details
    assert event.cached_input_tokens == out.usage.prompt_tokens_details.cached_tokens == 3
    assert event.reasoning_tokens == out.usage.completion_tokens_details.reasoning_tokens == 2
    assert_cost(event, "gpt-4o")
    assert event.cached_cost_nanos == usd_to_nanos(Decimal("1.25") * 3 / 1_000_000)
    assert (event.status, event.http_status, event.usage_source, event.stream) == ("OK", 200, "exact", False)
    assert event.model == "openai/gpt-4o" and event.product == "chat.completions"
    assert event.latency_ms > 0 and event.ttft_ms is None


def raw_sse(url: str, key: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """The raw SSE bytes of a stream, with per-response ids and timestamps normalised."""
    headers = {"authorization": f"Bearer {key}", **(headers or {})}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200
        data = b"".join(r.iter_raw())
    data = re.sub(rb'"id":"chatcmpl-[0-9a-f]+"', b'"id":"X"', data)
    return re.sub(rb'"created":\d+', b'"created":0', data)


def test_stream_without_include_usage_identical_to_upstream(
    metered: Any, fake: FakeUpstream, upstream_url: str
) -> None:
    """No include_usage: the client gets byte for byte what the upstream sends without it, while the
    proxy asked the upstream for usage and recorded it exactly."""
    _, server, sink, _ = metered
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    via_proxy = raw_sse(server.url + "/v1/chat/completions", "sk-client", body)
    direct = raw_sse(upstream_url + "/chat/completions", UPSTREAM_KEY, body)
    assert via_proxy == direct
    assert b'"usage"' not in via_proxy
    sent = next(r for r in fake.requests if r.path == "/v1/chat/completions")
    assert sent.json["stream_options"] == {"include_usage": True}
    [event] = wait_events(sink, 1)
    assert event.usage_source == "exact" and event.stream and event.ttft_ms is not None
    assert event.input_tokens > 0 and event.output_tokens == 8


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_through_sdk(metered: Any, fake: FakeUpstream, include_usage: bool) -> None:
    """Through the SDK, both ways: the client sees usage only when it asked; the event is exact."""
    _, _, sink, client = metered
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-fake-words": "5"}, **kwargs
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
        reported = usage_chunks[0].usage
        assert all("usage" in c.model_fields_set for c in chunks)
    else:
        assert usage_chunks == [] and all(c.choices for c in chunks)
        assert not any("usage" in c.model_fields_set for c in chunks)
        reported = None
    assert len(text.split()) == 5
    [event] = wait_events(sink, 1)
    assert event.output_tokens == 5 and event.usage_source == "exact"
    if reported is not None:
        assert (event.input_tokens, event.total_tokens) == (reported.prompt_tokens, reported.total_tokens)
    assert_cost(event, "gpt-4o-mini")


@pytest.mark.parametrize("shape", ["openai", "litellm", "vllm-continuous", "on-finish"])
def test_injected_usage_hidden_whatever_chunk_carries_it(
    metered: Any, fake: FakeUpstream, upstream_url: str, shape: str
) -> None:
    """Whether the upstream sends usage as OpenAI (a `choices: []` chunk), LiteLLM (a chunk with an empty
    delta), vLLM's continuous stats (on every chunk) or on the finish chunk: a client that did not ask for
    usage gets no usage and no empty chunk, all the text, the same bytes as the upstream sends it without
    include_usage, and the event has the upstream's usage exactly."""
    _, server, sink, client = metered
    headers = {"x-fake-usage-chunk": shape, "x-fake-words": "5", **DETAILS}
    chunks = list(
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers)
    )
    assert not any(c.usage is not None or "usage" in c.model_fields_set for c in chunks)
    for c in chunks:  # every chunk says something: a role, text, or a finish_reason
        [choice] = c.choices
        assert choice.delta.role or choice.delta.content or choice.finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The quick brown fox jumps"
    assert chunks[-1].choices[0].finish_reason == "stop"
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    via_proxy = raw_sse(server.url + "/v1/chat/completions", "sk-client", body, headers)
    direct = raw_sse(upstream_url + "/chat/completions", UPSTREAM_KEY, body, headers)
    assert via_proxy == direct and b'"usage"' not in via_proxy
    with_usage = {**body, "stream_options": {"include_usage": True}}
    upstream_usage = raw_sse(upstream_url + "/chat/completions", UPSTREAM_KEY, with_usage, headers)
    assert upstream_usage.count(b'"usage":{') >= 1  # the upstream did send it, in its shape
    proxied = fake.requests[:2]  # the SDK's stream and the raw one, through the proxy, in that order
    assert [r.json["stream_options"] for r in proxied] == [{"include_usage": True}] * 2
    events = wait_events(sink, 2)
    for event in events:
        assert (event.usage_source, event.status, event.stream) == ("exact", "OK", True)
        # The fake's rule: 4 + 6 words of prompt, 5 words + 2 reasoning tokens, 3 cached.
        assert (event.input_tokens, event.output_tokens, event.total_tokens) == (10, 7, 17)
        assert (event.cached_input_tokens, event.reasoning_tokens) == (3, 2)
        assert_cost(event, "gpt-4o")


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api_exact(metered: Any, fake: FakeUpstream, stream: bool) -> None:
    """Responses API, JSON and SSE: tokens (cached, reasoning) = the upstream's usage; cost = genai-prices."""
    _, _, sink, client = metered
    if stream:
        events = list(
            client.responses.create(
                model="gpt-4o", input="three words here", stream=True, extra_headers=DETAILS
            )
        )
        completed = [e for e in events if e.type == "response.completed"]
        usage = completed[0].response.usage  # type: ignore[union-attr]
    else:
        usage = client.responses.create(model="gpt-4o", input="three words here", extra_headers=DETAILS).usage
    assert usage is not None
    [event] = wait_events(sink, 1)
    assert (event.input_tokens, event.output_tokens, event.total_tokens) == (
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
    )
    assert event.cached_input_tokens == usage.input_tokens_details.cached_tokens == 3
    assert event.reasoning_tokens == usage.output_tokens_details.reasoning_tokens == 2
    assert event.product == "responses" and event.stream is stream
    assert_cost(event, "gpt-4o")


def test_embeddings_and_legacy_completions(metered: Any, fake: FakeUpstream) -> None:
    """Embeddings (prompt tokens only) and legacy completions (JSON and stream) are metered exactly."""
    _, _, sink, client = metered
    emb = client.embeddings.create(model="text-embedding-3-small", input=["one two three", "four"])
    comp = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say something")
    streamed = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say it", stream=True))
    assert all(c.usage is None for c in streamed)
    events = sorted(wait_events(sink, 3), key=lambda e: e.event_id)
    assert (events[0].input_tokens, events[0].output_tokens) == (emb.usage.prompt_tokens, 0)
    assert events[0].product == "embeddings"
    assert comp.usage is not None
    assert (events[1].input_tokens, events[1].output_tokens) == (
        comp.usage.prompt_tokens,
        comp.usage.completion_tokens,
    )
    assert (
        events[2].usage_source == "exact"
        and events[2].output_tokens == 8
        and events[2].product == "completions"
    )
    assert_cost(events[0], "text-embedding-3-small")


def test_upstream_omits_usage_is_estimated(metered: Any, fake: FakeUpstream) -> None:
    """An upstream that sends no usage: estimated, flagged, counted on /metrics."""
    _, server, sink, client = metered
    client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"x-fake-omit-usage": "1"}
    )
    [event] = wait_events(sink, 1)
    assert event.usage_source == "estimated" and event.usage_note == "upstream sent no usage"
    assert event.input_tokens > 0 and event.output_tokens > 0 and event.status == "OK"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'orq_proxy_estimated_usage_total{provider="openai",model="gpt-4o"} 1' in metrics


def test_upstream_error_status(metered: Any, fake: FakeUpstream) -> None:
    """An upstream 500: the client gets it, one ERROR event with zero usage."""
    _, _, sink, client = metered
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-fake-status": "500"}
        )
    [event] = wait_events(sink, 1)
    assert (event.status, event.http_status, event.total_tokens, event.total_cost_nanos) == (
        "ERROR",
        500,
        0,
        0,
    )


def test_client_disconnect_mid_stream_one_flagged_event(metered: Any, fake: FakeUpstream) -> None:
    """The client leaving mid-stream: the upstream is cancelled and exactly one 499 event, estimated."""
    _, _, sink, client = metered
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-words": "40", "x-fake-chunk-delay-ms": "50"},
    )
    first = [next(iter(stream)) for _ in range(3)]
    assert first
    stream.close()
    [event] = wait_events(sink, 1)
    assert (event.status, event.http_status, event.usage_source) == ("ERROR", 499, "estimated")
    assert event.usage_note == "client disconnected before usage arrived"
    assert 0 < event.output_tokens < 40
    deadline = time.monotonic() + 3
    while not fake.requests[-1].disconnected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.requests[-1].disconnected


def test_upstream_death_mid_stream_one_flagged_event(metered: Any, fake: FakeUpstream) -> None:
    """The upstream dying mid-stream: the client sees a broken stream; one ERROR event, estimated."""
    _, _, sink, client = metered
    stream = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"x-fake-disconnect-after": "3"}
    )
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        list(stream)
    [event] = wait_events(sink, 1)
    assert (event.status, event.usage_source) == ("ERROR", "estimated")
    assert event.usage_note is not None and "upstream failed mid-response" in event.usage_note
    assert event.output_tokens >= 1


def test_events_reach_duckdb_and_jsonl_within_a_second(
    proxy_factory: Any, fake: FakeUpstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The default event store (what reporting reads) and a configured JSONL sink get the event quickly."""
    path = tmp_path / "events.jsonl"
    app, server = proxy_factory({"sinks": [{"type": "jsonl", "path": str(path)}]})
    client = closing_client(server, request)
    out = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    t0 = time.monotonic()
    while app.services.event_store.count() < 1 and time.monotonic() - t0 < 1.0:
        time.sleep(0.01)
    cur = app.services.event_store.cursor()
    row = cur.execute(f"SELECT input_tokens, output_tokens, status FROM {EVENTS_TABLE}").fetchall()
    assert out.usage is not None
    assert row == [(out.usage.prompt_tokens, out.usage.completion_tokens, "OK")]
    while not path.exists() and time.monotonic() - t0 < 1.0:
        time.sleep(0.01)
    assert (
        UsageEvent.model_validate_json(path.read_text().splitlines()[0]).input_tokens
        == out.usage.prompt_tokens
    )


def test_price_override_and_unknown_model(
    proxy_factory: Any, fake: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    """`[prices."openai/my-model"]` prices a model genai-prices does not know; another unknown one is 0,
    flagged, and counted on /metrics."""
    sink = MemorySink()
    prices = {"openai/my-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
    _, server = proxy_factory({"prices": prices}, sinks=[sink])
    client = closing_client(server, request)
    a = client.chat.completions.create(model="my-model", messages=MESSAGES)
    client.chat.completions.create(model="mystery-model", messages=MESSAGES)
    events = sorted(wait_events(sink, 2), key=lambda e: e.event_id)
    assert a.usage is not None
    assert events[0].price_source == "override"
    assert events[0].input_cost_nanos == a.usage.prompt_tokens * 1_000
    assert events[0].output_cost_nanos == a.usage.completion_tokens * 2_000
    assert (events[1].price_source, events[1].total_cost_nanos, events[1].status) == ("unknown", 0, "OK")
    text = httpx.get(server.url + "/metrics").text
    assert 'orq_proxy_unpriced_requests_total{provider="openai",model="mystery-model"} 1' in text
    assert (
        'orq_proxy_requests_total{provider="openai",model="my-model",product="chat.completions",status="OK"} 1'
        in text
    )
    assert 'orq_proxy_sink_events_dropped_total{sink="memory",reason="queue_full"} 0' in text


def test_include_metrics_exact_after_known_sequence(
    proxy_factory: Any, fake: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    """3 successes, 1 upstream error, 1 stream and 1 client disconnect for one identity: the 30-day
    metrics on `GET /v2/identities?include_metrics=true` equal the sums of the events, exactly."""
    sink = MemorySink()
    _, server = proxy_factory(sinks=[sink])
    client = closing_client(server, request)
    who = {"identity": {"id": "user_metrics"}}
    for words in ("3", "4", "5"):
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_body=who, extra_headers={"x-fake-words": words}
        )
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_body=who, extra_headers={"x-fake-status": "500"}
        )
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_body=who))
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_body=who,
        extra_headers={"x-fake-words": "40", "x-fake-chunk-delay-ms": "50"},
    )
    next(iter(stream))
    stream.close()
    events = wait_events(sink, 6)
    assert all(e.identity == "user_metrics" and e.identity_source == "body" for e in events)
    assert sum(e.status == "ERROR" for e in events) == 2
    with Orq(api_key="k", server_url=server.url, timeout_ms=10_000) as orq:
        [identity] = [
            i for i in orq.identities.list(include_metrics=True).data if i.external_id == "user_metrics"
        ]
    metrics = identity.metrics
    assert metrics is not None
    assert metrics.total_requests == 6
    assert metrics.error_rate == pytest.approx(2 / 6)
    assert metrics.total_tokens == sum(e.total_tokens for e in events)
    assert metrics.total_cost == round(sum(e.total_cost_nanos for e in events) / 1e9, 10)


def test_metrics_show_upstream_connections(metered: Any, fake: FakeUpstream) -> None:
    """/metrics gauges the upstream pool: none before the first request, then one kept alive and idle."""
    _, server, sink, client = metered
    before = httpx.get(server.url + "/metrics").text
    assert 'orq_proxy_upstream_connections{state="open"} 0' in before
    for _ in range(3):  # sequential requests reuse the one connection
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    wait_events(sink, 3)
    after = httpx.get(server.url + "/metrics").text
    assert 'orq_proxy_upstream_connections{state="open"} 1' in after
    assert 'orq_proxy_upstream_connections{state="idle"} 1' in after


def test_non_inference_calls_are_told_apart(
    metered: tuple[OrqProxy, ServerThread, MemorySink, openai.OpenAI],
) -> None:
    """`GET /v1/models` is a usage event with `product = "models"` and no usage: reports can group or filter
    by product, and `/metrics` counts requests per product, so listing models is not an LLM request."""
    _, server, sink, client = metered
    assert [m.id for m in client.models.list()]
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    events = wait_events(sink, 2)
    by_product = {e.product: e for e in events}
    assert set(by_product) == {"models", "chat.completions"}
    listing = by_product["models"]
    assert (listing.total_tokens, listing.total_cost_nanos, listing.usage_source) == (0, 0, "exact")
    text = httpx.get(server.url + "/metrics").text
    assert re.search(r'orq_proxy_requests_total\{[^}]*product="models",status="OK"\} 1', text), text
    assert re.search(r'orq_proxy_requests_total\{[^}]*product="chat.completions",status="OK"\} 1', text)
    start = min(e.timestamp for e in events).replace(microsecond=0)
    window = {"from_": start, "to": start + timedelta(minutes=5), "mode": "scalar"}
    with Orq(server_url=server.url) as orq:
        deadline = time.monotonic() + 5
        while True:  # the event store sees events within its sink's flush interval
            report = orq.reporting.query(metric="genai.requests", group_by=["product"], **window)
            counts = {row.dimensions["product"]: row.metrics["genai.requests"] for row in report.data or []}
            if sum(counts.values()) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        not_models = [{"field": "product", "op": "neq", "values": ["models"]}]
        inference = orq.reporting.query(metric="genai.requests", filters=not_models, **window)
    assert counts == {"models": 1, "chat.completions": 1}
    assert inference.data is not None and inference.data[0].metrics == {"genai.requests": 1}
