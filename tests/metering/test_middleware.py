"""MeteringMiddleware around an inline ASGI app: forwarding one for one, usage injection and hiding,
exactly one settlement on every ending, estimates, statuses, hooks and listeners."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from orq_proxy.auth import Principal
from orq_proxy.context import SCOPE_KEY, MissingContext, RequestContext, ResolvedIdentity
from orq_proxy.metering.middleware import MeteringMiddleware
from orq_proxy.metering.prometheus import PrometheusMetrics
from orq_proxy.testing.clock import FakeClock
from orq_proxy.usage.estimate import estimate_input_tokens, estimate_tokens_from_bytes
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.pricing import Cost, Pricer, TokenUsage

SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
JSON = [(b"content-type", b"application/json"), (b"content-length", b"99")]
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def chunk(content: str, *, usage: bool) -> bytes:
    tail = ',"usage":null' if usage else ""
    return (
        b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,'
        b'"delta":{"content":"' + content.encode() + b'"}}]' + tail.encode() + b"}\n\n"
    )


USAGE_CHUNK = (
    b'data: {"id":"c","model":"gpt-4o","choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n"
)
DONE = b"data: [DONE]\n\n"


class Bus:
    def __init__(self) -> None:
        self.events: list[UsageEvent] = []

    def put_nowait(self, event: UsageEvent) -> None:
        self.events.append(event)


Step = bytes | Callable[[], None] | BaseException


def upstream_app(
    status: int, headers: Sequence[tuple[bytes, bytes]], steps: Sequence[Step], *, end: bool = True
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An inline upstream: response start, then each step (bytes = a body chunk, callable = run it,
    exception = raise it), then the final empty body message when `end`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        for step in steps:
            if isinstance(step, BaseException):
                raise step
            if callable(step):
                step()
                continue
            await send({"type": "http.response.body", "body": step, "more_body": True})
        if end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


class Harness:
    def __init__(self, body: dict[str, Any] | None = None, *, product: str = "chat.completions") -> None:
        self.clock = FakeClock(datetime(2026, 5, 1, tzinfo=UTC))
        self.bus = Bus()
        self.pricer = Pricer()
        self.prom = PrometheusMetrics()
        self.listened: list[UsageEvent] = []
        self.hooked: list[UsageEvent] = []
        body = (
            body if body is not None else {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        )
        raw = json.dumps(body).encode()
        self.ctx = RequestContext(
            request_id="01JREQUEST0000000000000000",
            received_at=self.clock.now(),
            started=self.clock.monotonic(),
            method="POST",
            path="/chat/completions",
            surface="/v1",
            raw_body=raw,
            body=body,
            principal=Principal(workspace="ws", project="pr", key_id="key1"),
            provider="openai",
            model=body.get("model"),
            model_ref=f"openai/{body.get('model')}",
            product=product,
            stream=bool(body.get("stream")),
            identity=ResolvedIdentity(external_id="user_1", source="header", tags=["beta"]),
            metadata={"team": "a"},
        )
        self.ctx.settle_hooks.append(self.hooked.append)
        self.sent: list[Message] = []
        self.fail_send_after: int | None = None

    async def run(self, app: Any) -> UsageEvent:
        mw = MeteringMiddleware(
            app,
            bus=self.bus,
            pricer=self.pricer,
            clock=self.clock,
            listeners=[self.listened.append],
            prom=self.prom,
        )
        scope: Scope = {"type": "http", SCOPE_KEY: self.ctx}

        async def receive() -> Message:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}  # pragma: no cover

        async def send(message: Message) -> None:
            if self.fail_send_after is not None and len(self.sent) >= self.fail_send_after:
                raise OSError("client went away")
            self.sent.append(message)

        try:
            await mw(scope, receive, send)
        finally:
            assert len(self.bus.events) == 1, "exactly one event per request"
            assert self.hooked == self.bus.events and self.listened == self.bus.events
            assert_as_validated(self.bus.events[0])
        return self.bus.events[0]

    @property
    def body_chunks(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def assert_as_validated(event: UsageEvent) -> None:
    """An event built without validation (`UsageEvent.trusted`) is exactly what validating its values gives:
    every field, in declaration order, each of the type validation produces."""
    assert list(event.__dict__) == list(UsageEvent.model_fields)
    validated = UsageEvent.model_validate(event.model_dump(), strict=True)
    assert validated == event
    assert [type(v) for v in event.__dict__.values()] == [type(v) for v in validated.__dict__.values()]
    assert event.model_fields_set == validated.model_fields_set


def stream_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi there"}], "stream": True, **extra}


async def test_stream_without_include_usage_injects_and_hides() -> None:
    """The upstream is asked for usage; the client gets exactly the chunks OpenAI sends without it."""
    h = Harness(stream_body())
    app = upstream_app(
        200,
        [*SSE, (b"content-length", b"1000")],
        [chunk("Hel", usage=True), lambda: h.clock.advance(0.25), chunk("lo", usage=True), USAGE_CHUNK, DONE],
    )
    h.clock.advance(0.1)
    event = await h.run(app)
    assert h.ctx.body is not None and h.ctx.body["stream_options"] == {"include_usage": True}
    assert h.ctx.body_changed
    assert h.body_chunks == [chunk("Hel", usage=False), chunk("lo", usage=False), DONE, b""]
    start = h.sent[0]
    assert (b"content-length", b"1000") not in start["headers"]
    assert (event.input_tokens, event.output_tokens, event.total_tokens) == (12, 3, 15)
    assert event.usage_source == "exact" and event.usage_note is None
    assert event.stream and event.status == "OK" and event.http_status == 200
    assert event.ttft_ms == 100.0 and event.latency_ms == 350.0
    cost = Pricer().cost("openai", "gpt-4o", TokenUsage(12, 3))
    assert cost.source == "genai-prices" and cost.total_nanos > 0
    assert (event.input_cost_nanos, event.output_cost_nanos, event.total_cost_nanos) == (
        cost.input_nanos,
        cost.output_nanos,
        cost.total_nanos,
    )
    assert event.event_id == h.ctx.request_id and event.timestamp == h.ctx.received_at
    assert (event.workspace, event.project, event.api_key_id) == ("ws", "pr", "key1")
    assert (event.identity, event.identity_source, event.identity_tags) == ("user_1", "header", ["beta"])
    assert event.model == "openai/gpt-4o" and event.product == "chat.completions"
    assert event.metadata == {"team": "a"}


@pytest.mark.parametrize("options", [{"include_usage": False}, {"continuous": 1}])
async def test_existing_stream_options_kept_when_injecting(options: dict[str, Any]) -> None:
    """Other stream options survive; include_usage is forced on upstream."""
    h = Harness(stream_body(stream_options=options))
    await h.run(upstream_app(200, SSE, [USAGE_CHUNK, DONE]))
    assert h.ctx.body is not None
    assert h.ctx.body["stream_options"] == {**options, "include_usage": True}
    assert h.body_chunks == [DONE, b""]


async def test_client_asking_for_usage_gets_bytes_untouched() -> None:
    """With include_usage set by the client, every chunk is forwarded as is, one for one."""
    h = Harness(stream_body(stream_options={"include_usage": True}))
    chunks = [chunk("a", usage=True), chunk("b", usage=True), USAGE_CHUNK, DONE]
    event = await h.run(upstream_app(200, [*SSE, (b"content-length", b"5")], chunks))
    assert not h.ctx.body_changed
    assert h.body_chunks == [*chunks, b""]
    assert (b"content-length", b"5") in h.sent[0]["headers"]
    assert event.total_tokens == 15 and event.usage_source == "exact"


async def test_split_chunks_forwarded_as_complete_lines_only() -> None:
    """When rewriting, a chunk cut mid-line holds back only that unfinished line."""
    h = Harness(stream_body())
    whole = chunk("abc", usage=True)
    app = upstream_app(200, SSE, [whole[:20], whole[20:], USAGE_CHUNK[:10], USAGE_CHUNK[10:] + DONE])
    event = await h.run(app)
    assert b"".join(h.body_chunks) == chunk("abc", usage=False) + DONE
    assert h.body_chunks[0] == chunk("abc", usage=False)  # the first piece alone was not sent
    assert event.total_tokens == 15


async def test_non_stream_json_exact() -> None:
    """JSON answer: bytes untouched, usage exact, no ttft."""
    h = Harness()
    body = json.dumps({"model": "gpt-4o", "choices": [], "usage": USAGE}).encode()
    event = await h.run(upstream_app(200, JSON, [body[:7], body[7:]]))
    assert h.body_chunks == [body[:7], body[7:], b""]
    assert (b"content-length", b"99") in h.sent[0]["headers"]
    assert event.total_tokens == 15 and event.ttft_ms is None and not event.stream


async def test_upstream_error_status_is_error_with_zero_usage() -> None:
    """An upstream 4xx/5xx: ERROR, the status the client got, no usage billed (exact zero)."""
    h = Harness(stream_body())
    err = b'{"error":{"message":"bad","type":"invalid_request_error"}}'
    event = await h.run(upstream_app(400, [(b"content-type", b"application/json")], [err]))
    assert h.body_chunks == [err, b""]
    assert (event.status, event.http_status, event.total_tokens, event.usage_source) == (
        "ERROR",
        400,
        0,
        "exact",
    )


async def test_upstream_omits_usage_estimates_from_request_and_deltas() -> None:
    """No usage in a complete stream: estimated from the request and the text seen, and flagged."""
    body = stream_body()
    h = Harness(body)
    event = await h.run(
        upstream_app(200, SSE, [chunk("abcdefgh", usage=False), chunk("ij", usage=False), DONE])
    )
    assert event.usage_source == "estimated" and event.usage_note == "upstream sent no usage"
    assert event.input_tokens == estimate_input_tokens(body, len(h.ctx.raw_body))
    assert event.output_tokens == estimate_tokens_from_bytes(10) == 3
    assert event.status == "OK"
    assert h.prom.estimated


async def test_exception_mid_stream_settles_once_flagged_and_reraises() -> None:
    """The upstream dying mid-stream: one ERROR event, estimated, the exception propagates."""
    h = Harness(stream_body())
    h.ctx.upstream_error = "upstream failed mid-response: boom"
    app = upstream_app(200, SSE, [chunk("abcd", usage=True), RuntimeError("boom")], end=False)
    with pytest.raises(RuntimeError, match="boom"):
        await h.run(app)
    event = h.bus.events[0]
    assert (event.status, event.http_status, event.usage_source) == ("ERROR", 200, "estimated")
    assert event.usage_note == "upstream failed mid-response: boom"
    assert event.output_tokens == 1


async def test_exception_without_context_note_names_the_type() -> None:
    """An exception before any response: 500, ERROR, the estimate names the failure."""
    h = Harness()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError("bug")

    with pytest.raises(ValueError):
        await h.run(app)
    event = h.bus.events[0]
    assert (event.status, event.http_status) == ("ERROR", 500)
    assert event.usage_note == "request failed: ValueError" and event.output_tokens == 0


async def test_client_disconnect_on_send_is_499_estimated() -> None:
    """The client going away mid-stream (send raises): one 499 event, estimated, error propagates."""
    h = Harness(stream_body())
    h.fail_send_after = 2
    app = upstream_app(200, SSE, [chunk("abcd", usage=True), chunk("efgh", usage=True), USAGE_CHUNK, DONE])
    with pytest.raises(OSError):
        await h.run(app)
    event = h.bus.events[0]
    assert (event.status, event.http_status, event.usage_source) == ("ERROR", 499, "estimated")
    assert event.usage_note == "client disconnected before usage arrived"
    assert event.output_tokens == estimate_tokens_from_bytes(8)


async def test_client_disconnect_flagged_by_upstream_app_quiet_return() -> None:
    """An upstream app that notices the disconnect and returns quietly still yields a 499 event."""
    h = Harness(stream_body())

    def leave() -> None:
        h.ctx.client_disconnected = True

    await h.run(upstream_app(200, SSE, [chunk("ab", usage=True), leave], end=False))
    event = h.bus.events[0]
    assert (event.http_status, event.usage_source) == (499, "estimated")


async def test_disconnect_after_usage_keeps_exact_usage() -> None:
    """Usage that arrived before the client left is exact, not estimated."""
    h = Harness(stream_body(stream_options={"include_usage": True}))

    def leave() -> None:
        h.ctx.client_disconnected = True

    await h.run(upstream_app(200, SSE, [chunk("ab", usage=True), USAGE_CHUNK, leave], end=False))
    event = h.bus.events[0]
    assert (event.http_status, event.usage_source, event.total_tokens) == (499, "exact", 15)


async def test_cancellation_settles_once() -> None:
    """Task cancellation mid-stream: one event, and the CancelledError propagates."""
    h = Harness(stream_body())
    app = upstream_app(200, SSE, [chunk("ab", usage=True), asyncio.CancelledError()], end=False)
    with pytest.raises(asyncio.CancelledError):
        await h.run(app)
    assert h.bus.events[0].status == "ERROR"


async def test_failing_hooks_and_listeners_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A raising settle hook or listener is logged; the rest still run and the event is queued."""
    h = Harness()

    def bad(event: UsageEvent) -> None:
        raise RuntimeError("hook bug")

    h.ctx.settle_hooks.insert(0, bad)
    body = json.dumps({"usage": USAGE}).encode()
    mw_listeners: list[Callable[[UsageEvent], None]] = [bad, h.listened.append]
    mw = MeteringMiddleware(
        upstream_app(200, JSON, [body]), bus=h.bus, pricer=h.pricer, clock=h.clock, listeners=mw_listeners
    )

    async def send(message: Message) -> None:
        pass

    async def receive() -> Message:  # pragma: no cover - never called
        return {"type": "http.disconnect"}

    await mw({"type": "http", SCOPE_KEY: h.ctx}, receive, send)
    assert len(h.bus.events) == 1 and h.hooked == h.bus.events and h.listened == h.bus.events
    assert "settle hook" in caplog.text and "usage listener" in caplog.text


async def test_unknown_model_priced_zero_and_counted() -> None:
    """An unpriced model costs 0, is flagged `unknown` and counted on /metrics; never an error."""
    h = Harness({"model": "no-such-model-xyz", "messages": []})
    body = json.dumps({"model": "no-such-model-xyz", "usage": USAGE}).encode()
    event = await h.run(upstream_app(200, JSON, [body]))
    assert (event.price_source, event.total_cost_nanos, event.status) == ("unknown", 0, "OK")
    assert (
        'orq_proxy_unpriced_requests_total{provider="openai",model="no-such-model-xyz"} 1' in h.prom.render()
    )


async def test_price_override_used() -> None:
    """A config override prices the model (input $1/M, output $2/M)."""
    h = Harness()
    h.pricer = Pricer({"openai/gpt-4o": (1.0, 2.0, None)})
    event = await h.run(upstream_app(200, JSON, [json.dumps({"usage": USAGE}).encode()]))
    assert event.price_source == "override"
    assert (event.input_cost_nanos, event.output_cost_nanos) == (12_000, 6_000)


async def test_served_model_priced_when_requested_name_unknown() -> None:
    """If the requested alias has no price but the answering model does, the latter prices it."""
    h = Harness({"model": "my-alias", "messages": []})
    body = json.dumps({"model": "gpt-4o", "usage": USAGE}).encode()
    event = await h.run(upstream_app(200, JSON, [body]))
    assert event.price_source == "genai-prices"
    assert event.total_cost_nanos == Pricer().cost("openai", "gpt-4o", TokenUsage(12, 3)).total_nanos


async def test_responses_stream_not_injected() -> None:
    """Responses API streams always carry usage: no injection, bytes untouched."""
    body = {"model": "gpt-4o", "input": "hi", "stream": True}
    h = Harness(body, product="responses")
    completed = {
        "type": "response.completed",
        "response": {"model": "gpt-4o", "usage": {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}},
    }
    data = b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n"
    event = await h.run(upstream_app(200, SSE, [data]))
    assert not h.ctx.body_changed and "stream_options" not in body
    assert h.ctx.body == body and h.body_chunks == [data, b""]
    assert (event.input_tokens, event.output_tokens) == (4, 2)


async def test_non_token_product_without_usage_is_exact_zero() -> None:
    """A non-LLM call (e.g. GET /models) records zero usage without an estimate."""
    h = Harness({"model": "gpt-4o"}, product="other")
    event = await h.run(upstream_app(200, JSON, [b'{"data":[]}']))
    assert (event.usage_source, event.total_tokens) == ("exact", 0)


async def test_compressed_stream_not_rewritten() -> None:
    """A compressed body cannot be read: forwarded untouched, usage estimated."""
    h = Harness(stream_body())
    event = await h.run(upstream_app(200, [*SSE, (b"content-encoding", b"gzip")], [b"\x1f\x8b..."]))
    assert h.body_chunks == [b"\x1f\x8b...", b""]
    assert event.usage_source == "estimated"


async def test_non_http_and_context_free_requests_pass_through() -> None:
    """Lifespan/websocket scopes are not metered; an HTTP scope without a context is a wiring bug, said
    as such (`MissingContext`), never a silently unmetered request."""
    h = Harness()
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    mw = MeteringMiddleware(app, bus=h.bus, pricer=h.pricer, clock=h.clock)

    async def noop_receive() -> Message:  # pragma: no cover - never called
        return {}

    async def noop_send(message: Message) -> None:  # pragma: no cover - never called
        pass

    await mw({"type": "lifespan"}, noop_receive, noop_send)
    with pytest.raises(MissingContext):
        await mw({"type": "http"}, noop_receive, noop_send)
    assert seen == ["lifespan"] and h.bus.events == []


async def test_bad_stream_options_left_for_upstream() -> None:
    """A non-object `stream_options` is not touched (the upstream rejects it as usual)."""
    h = Harness(stream_body(stream_options="yes"))
    await h.run(upstream_app(400, JSON, [b'{"error":{}}']))
    assert h.ctx.body is not None and h.ctx.body["stream_options"] == "yes" and not h.ctx.body_changed


async def test_event_build_failure_logged_and_request_unaffected(caplog: pytest.LogCaptureFixture) -> None:
    """If the event cannot be built (a bug), the request still completes and the error is logged."""
    h = Harness()

    class BrokenPricer(Pricer):
        def cost(self, provider: str | None, model: str | None, usage: TokenUsage) -> Cost:
            raise RuntimeError("a bug in pricing")

    mw = MeteringMiddleware(upstream_app(200, JSON, [b"{}"]), bus=h.bus, pricer=BrokenPricer(), clock=h.clock)

    async def send(message: Message) -> None:
        h.sent.append(message)

    async def receive() -> Message:  # pragma: no cover - never called
        return {}

    with caplog.at_level(logging.ERROR):
        await mw({"type": "http", SCOPE_KEY: h.ctx}, receive, send)
    assert h.bus.events == [] and len(h.sent) == 3
    assert "could not build its usage event" in caplog.text


async def test_prometheus_counts_requests() -> None:
    """The middleware feeds the Prometheus counters."""
    h = Harness()
    await h.run(upstream_app(200, JSON, [json.dumps({"usage": USAGE}).encode()]))
    text = h.prom.render()
    assert (
        'orq_proxy_requests_total{provider="openai",model="gpt-4o",product="chat.completions",status="OK"} 1'
        in text
    )
    assert 'orq_proxy_tokens_total{provider="openai",model="gpt-4o",type="input"} 12' in text
