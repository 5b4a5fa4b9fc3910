"""`UpstreamApp` over a `ScriptedForwarder`: no sockets, every answer and failure scripted, the ASGI app
driven directly with a scripted `receive` and a recording `send` (so streaming is seen message by message)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.types import Message, Scope

from orq_proxy.context import SCOPE_KEY, RequestContext
from orq_proxy.proxy import upstream as upstream_module
from orq_proxy.proxy._http1 import ConnectionPool
from orq_proxy.proxy.upstream import (
    Forwarder,
    UpstreamApp,
    UpstreamConnectError,
    UpstreamReadError,
    UpstreamStreamError,
    UpstreamTarget,
    origin_of,
)
from orq_proxy.testing import ScriptedAnswer, ScriptedForwarder

TARGET = UpstreamTarget(
    "http://upstream.test:8080/v1",
    api_key="sk-up",
    connect_timeout=1.0,
    headers_timeout=2.0,
    read_timeout=3.0,
)
BODY = b'{"model":"gpt-4o","messages":[]}'


class Client:
    """The server's side of one request: `receive` reports a disconnect once `leave()` is called, `send`
    records every message (and `body_sent` is set on each body message).

    With `leave_on_last`, the client leaves while the last body message is being written, as servers report
    a disconnect once a response is complete.
    """

    def __init__(self, *, leave_on_last: bool = False) -> None:
        self.messages: list[Message] = []
        self.receives = 0
        self.receiving = asyncio.Event()
        self.gone = asyncio.Event()
        self.body_sent = asyncio.Event()
        self.leave_on_last = leave_on_last

    def leave(self) -> None:
        self.gone.set()

    async def receive(self) -> Message:
        self.receives += 1
        self.receiving.set()
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body":
            self.body_sent.set()
            if self.leave_on_last and not message.get("more_body", False):
                self.leave()
                await asyncio.sleep(0)  # the write takes a turn of the loop: the watcher sees the disconnect

    @property
    def start(self) -> Message:
        assert self.messages[0]["type"] == "http.response.start"
        return self.messages[0]

    @property
    def bodies(self) -> list[tuple[bytes, bool]]:
        return [(m["body"], m.get("more_body", False)) for m in self.messages[1:]]

    def json(self) -> Any:
        return json.loads(b"".join(body for body, _ in self.bodies))


def context(**fields: Any) -> RequestContext:
    values: dict[str, Any] = {
        "request_id": "01JREQUEST0000000000000000",
        "received_at": datetime(2026, 5, 1, tzinfo=UTC),
        "started": 0.0,
        "method": "POST",
        "path": "/chat/completions",
        "surface": "/v1",
        "raw_body": BODY,
        "provider": "openai",
    }
    return RequestContext(**{**values, **fields})


def http_scope(
    ctx: RequestContext, headers: list[tuple[bytes, bytes]] | None = None, query: bytes = b""
) -> Scope:
    return {
        "type": "http",
        "method": ctx.method,
        "path": ctx.surface + ctx.path,
        "raw_path": (ctx.surface + ctx.path).encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers if headers is not None else [(b"content-type", b"application/json")],
        SCOPE_KEY: ctx,
    }


async def forward(
    forwarder: ScriptedForwarder,
    ctx: RequestContext | None = None,
    client: Client | None = None,
    **scope: Any,
) -> tuple[RequestContext, Client]:
    """One request through `UpstreamApp` over `forwarder`."""
    ctx = ctx or context()
    client = client or Client()
    app = UpstreamApp({"openai": TARGET}, forwarder=forwarder)
    await app(http_scope(ctx, **scope), client.receive, client.send)
    return ctx, client


def test_both_forwarders_satisfy_the_protocol() -> None:
    """`ConnectionPool` and `ScriptedForwarder` are both `Forwarder`s (checked by mypy here)."""
    forwarders: list[Forwarder] = [ConnectionPool(), ScriptedForwarder(ScriptedAnswer())]
    assert len(forwarders) == 2


async def test_request_goes_out_as_built_and_a_json_answer_is_one_message() -> None:
    """Origin, target (base path, client path, escaped query), method, body and the target's timeouts reach
    the forwarder; a one-chunk answer is a single final body message and the exchange is released."""
    forwarder = ScriptedForwarder(ScriptedAnswer(status=201, body=[b'{"id":"x"}']))
    ctx, client = await forward(forwarder, query=b"a=1&b=x y")
    (sent,) = forwarder.requests
    assert sent.origin == origin_of(TARGET.base_url)
    assert (sent.method, sent.target, sent.body) == ("POST", b"/v1/chat/completions?a=1&b=x%20y", BODY)
    assert (sent.connect_timeout, sent.headers_timeout, sent.read_timeout) == (1.0, 2.0, 3.0)
    assert client.start["status"] == 201
    assert client.bodies == [(b'{"id":"x"}', False)]
    assert forwarder.responses[0].released and not forwarder.responses[0].closed
    assert ctx.upstream_error is None and not ctx.client_disconnected


async def test_changed_body_is_serialized_again() -> None:
    """A layer that edited the parsed body gets it re-serialized compactly (non-ASCII kept as UTF-8)."""
    forwarder = ScriptedForwarder(ScriptedAnswer())
    ctx = context(body={"model": "gpt-4o", "note": "é"}, body_changed=True)
    await forward(forwarder, ctx)
    assert forwarder.requests[0].body == '{"model":"gpt-4o","note":"é"}'.encode()


async def test_request_headers_dropped_and_added() -> None:
    """Hop-by-hop, framing, the client's credentials, `x-orq-*` and its accept-encoding are dropped; the
    upstream credential and `accept-encoding: identity` are added; everything else passes as sent."""
    forwarder = ScriptedForwarder(ScriptedAnswer())
    headers = [
        (b"host", b"proxy.local"),
        (b"content-length", b"33"),
        (b"connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"te", b"trailers"),
        (b"authorization", b"Bearer sk-client"),
        (b"api-key", b"k"),
        (b"x-api-key", b"k"),
        (b"accept-encoding", b"gzip"),
        (b"expect", b"100-continue"),
        (b"x-orq-identity-id", b"u1"),
        (b"content-type", b"application/json"),
        (b"openai-organization", b"org-1"),
    ]
    await forward(forwarder, headers=headers)
    assert forwarder.requests[0].headers == [
        (b"content-type", b"application/json"),
        (b"openai-organization", b"org-1"),
        (b"accept-encoding", b"identity"),
        (b"authorization", b"Bearer sk-up"),
    ]


async def forwarded_headers(
    headers: list[tuple[bytes, bytes]],
    *,
    client: tuple[str, int] | None = ("10.0.0.7", 5000),
    trusted: bool = False,
) -> list[tuple[bytes, bytes]]:
    """The headers one request with `headers` from `client` reaches the forwarder with (minus the two the
    upstream layer always adds)."""
    forwarder = ScriptedForwarder(ScriptedAnswer())
    app = UpstreamApp({"openai": TARGET}, forwarder=forwarder, trust_forwarded_headers=trusted)
    ctx = context()
    scope = http_scope(ctx, headers)
    if client is not None:
        scope["client"] = client
    await app(scope, Client().receive, Client().send)
    sent = forwarder.requests[0].headers
    assert sent[-2:] == [(b"accept-encoding", b"identity"), (b"authorization", b"Bearer sk-up")]
    return sent[:-2]


@pytest.mark.parametrize(
    ("connection", "kept"),
    [
        ([b"x-hop"], [b"x-other", b"x-keep"]),
        ([b"keep-alive, X-Hop ,x-other"], [b"x-keep"]),
        ([b"keep-alive", b"x-hop, x-other"], [b"x-keep"]),
        ([b"Upgrade, x-hop,,"], [b"x-other", b"x-keep"]),
        ([b"keep-alive"], [b"x-hop", b"x-other", b"x-keep"]),
    ],
)
async def test_headers_named_in_connection_are_dropped(connection: list[bytes], kept: list[bytes]) -> None:
    """Whatever `Connection` lists (any case, spacing, several header lines) is hop-by-hop: dropped."""
    headers = [
        (b"x-hop", b"1"),
        (b"x-other", b"2"),
        *((b"connection", c) for c in connection),
        (b"x-keep", b"3"),
    ]
    sent = await forwarded_headers(headers, client=None)
    assert [k for k, _ in sent] == kept


async def test_underscore_names_and_cookie_are_dropped() -> None:
    """Names with `_` (read as `-` by some servers: `transfer_encoding`) and the client's cookies stay here."""
    headers = [
        (b"transfer_encoding", b"chunked"),
        (b"x_custom", b"1"),
        (b"cookie", b"session=abc"),
        (b"x-custom", b"2"),
    ]
    assert await forwarded_headers(headers, client=None) == [(b"x-custom", b"2")]


SPOOFING = [
    (b"content-type", b"application/json"),
    (b"x-forwarded-for", b"198.51.100.1"),
    (b"x-forwarded-for", b"198.51.100.2"),
    (b"forwarded", b"for=198.51.100.1"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-host", b"a.example"),
    (b"x-forwarded-port", b"443"),
    (b"x-forwarded-prefix", b"/api"),
    (b"x-real-ip", b"198.51.100.1"),
]


@pytest.mark.parametrize(
    ("client", "trusted", "expected"),
    [
        (
            ("10.0.0.7", 5000),
            False,
            [(b"x-forwarded-for", b"10.0.0.7"), (b"forwarded", b"for=10.0.0.7")],
        ),
        (
            ("2001:db8::7", 5000),
            False,
            [(b"x-forwarded-for", b"2001:db8::7"), (b"forwarded", b'for="[2001:db8::7]"')],
        ),
        (None, False, []),
        (
            ("10.0.0.7", 5000),
            True,
            [
                (b"x-forwarded-proto", b"https"),
                (b"x-forwarded-host", b"a.example"),
                (b"x-forwarded-port", b"443"),
                (b"x-forwarded-prefix", b"/api"),
                (b"x-real-ip", b"198.51.100.1"),
                (b"x-forwarded-for", b"198.51.100.1, 198.51.100.2, 10.0.0.7"),
                (b"forwarded", b"for=198.51.100.1, for=10.0.0.7"),
            ],
        ),
        (
            None,
            True,
            [
                (b"x-forwarded-proto", b"https"),
                (b"x-forwarded-host", b"a.example"),
                (b"x-forwarded-port", b"443"),
                (b"x-forwarded-prefix", b"/api"),
                (b"x-real-ip", b"198.51.100.1"),
                (b"x-forwarded-for", b"198.51.100.1, 198.51.100.2"),
                (b"forwarded", b"for=198.51.100.1"),
            ],
        ),
    ],
    ids=["peer", "ipv6-peer", "no-peer", "trusted", "trusted-no-peer"],
)
async def test_forwarded_headers_from_the_peer(
    client: tuple[str, int] | None, trusted: bool, expected: list[tuple[bytes, bytes]]
) -> None:
    """Not trusted: the client's forwarding headers are dropped and the peer alone is named (IPv6 quoted and
    bracketed in `Forwarded`, RFC 7239). Trusted: the peer is appended to the client's chains (several
    X-Forwarded-For lines joined in order) and the rest pass."""
    sent = await forwarded_headers(SPOOFING, client=client, trusted=trusted)
    assert sent == [(b"content-type", b"application/json"), *expected]


async def test_header_verdicts_are_bounded_and_follow_the_trust_setting() -> None:
    """The per-name cache holds at most `_VERDICTS_MAX` client-chosen names (the rest are still judged), and
    changing `trust_forwarded_headers` on a used app takes effect at once."""
    forwarder = ScriptedForwarder(ScriptedAnswer(), ScriptedAnswer(), ScriptedAnswer())
    app = UpstreamApp({"openai": TARGET}, forwarder=forwarder)
    many = [(f"x-name-{i}".encode(), b"1") for i in range(upstream_module._VERDICTS_MAX + 10)]
    headers = [*many, (b"x_late", b"1"), (b"x-forwarded-for", b"198.51.100.1")]
    scope = {**http_scope(context(), headers), "client": ("10.0.0.7", 5000)}
    await app(scope, Client().receive, Client().send)
    assert len(app._header_verdicts) == upstream_module._VERDICTS_MAX
    names = [k for k, _ in forwarder.requests[0].headers]
    assert names[: len(many)] == [k for k, _ in many] and b"x_late" not in names
    assert (b"x-forwarded-for", b"10.0.0.7") in forwarder.requests[0].headers
    app.trust_forwarded_headers = True
    await app({**scope, "headers": headers[-1:]}, Client().receive, Client().send)
    assert (b"x-forwarded-for", b"198.51.100.1, 10.0.0.7") in forwarder.requests[1].headers
    app.trust_forwarded_headers = False
    await app({**scope, "headers": headers[-1:]}, Client().receive, Client().send)
    assert (b"x-forwarded-for", b"10.0.0.7") in forwarder.requests[2].headers


async def test_response_headers_dropped_and_renamed() -> None:
    """Hop-by-hop response headers, `server` and `date` are dropped, names lowercased, and the upstream's
    `x-request-id` becomes `x-upstream-request-id` (`x-request-id` is the proxy's)."""
    answer = ScriptedAnswer(
        headers=[
            (b"Content-Type", b"text/event-stream"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Server", b"uvicorn"),
            (b"Date", b"Fri, 01 May 2026 00:00:00 GMT"),
            (b"X-Request-Id", b"req_up"),
            (b"x-ratelimit-remaining-requests", b"99"),
        ]
    )
    _, client = await forward(ScriptedForwarder(answer))
    assert client.start["headers"] == [
        (b"content-type", b"text/event-stream"),
        (b"x-upstream-request-id", b"req_up"),
        (b"x-ratelimit-remaining-requests", b"99"),
    ]


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        (ScriptedAnswer(error=UpstreamConnectError("refused")), 502, "upstream unreachable: refused"),
        (ScriptedAnswer(error=UpstreamConnectError()), 502, "upstream unreachable: UpstreamConnectError"),
        (
            ScriptedAnswer(error=TimeoutError("slow")),
            504,
            "upstream timed out before sending response headers",
        ),
    ],
    ids=["connect-error", "connect-error-without-message", "headers-timeout"],
)
async def test_failure_before_headers_is_mapped(answer: ScriptedAnswer, status: int, message: str) -> None:
    """No answer is a 502, no headers in time a 504, both in OpenAI's shape, and the context says why."""
    ctx, client = await forward(ScriptedForwarder(answer))
    assert client.start["status"] == status
    assert client.json()["error"]["message"] == message
    assert client.json()["error"]["code"] == "upstream_error"
    assert ctx.upstream_error == message


async def test_header_with_a_line_break_is_400_before_sending() -> None:
    """A header value the forwarder refuses (a CR/LF would split the request) is a 400 naming it."""
    forwarder = ScriptedForwarder(ScriptedAnswer())
    ctx, client = await forward(forwarder, headers=[(b"x-a", b"1\r\nx-injected: 1")])
    assert client.start["status"] == 400
    assert client.json()["error"]["code"] == "invalid_header"
    assert forwarder.responses == [] and ctx.upstream_error is None


async def test_unknown_provider_is_502_without_forwarding() -> None:
    """A provider with no target (routing should have refused it) is a 502 and nothing is sent."""
    forwarder = ScriptedForwarder(ScriptedAnswer())
    _, client = await forward(forwarder, context(provider="other"))
    assert client.start["status"] == 502
    assert "'other'" in client.json()["error"]["message"]
    assert forwarder.requests == []


async def test_stream_chunks_go_out_one_for_one_as_they_arrive() -> None:
    """Each upstream chunk is one body message, sent before the next one exists; the last one ends it."""
    more = asyncio.Event()
    forwarder = ScriptedForwarder(
        ScriptedAnswer(body=[b"data: 1\n\n", more, b"data: 2\n\n", b"data: [DONE]\n\n"])
    )
    client = Client()
    running = asyncio.create_task(forward(forwarder, client=client))
    await client.body_sent.wait()
    assert client.bodies == [(b"data: 1\n\n", True)]  # out while the upstream is still producing
    more.set()
    await running
    assert client.bodies == [(b"data: 1\n\n", True), (b"data: 2\n\n", True), (b"data: [DONE]\n\n", False)]
    assert forwarder.responses[0].released


async def test_empty_body_still_ends_the_response() -> None:
    """An answer without a body (204) ends with one empty final message."""
    _, client = await forward(ScriptedForwarder(ScriptedAnswer(status=204, headers=[], body=[])))
    assert client.start["status"] == 204
    assert client.bodies == [(b"", False)]


@pytest.mark.parametrize(
    "failure", [UpstreamReadError("connection lost"), TimeoutError("read_timeout")], ids=["dies", "stalls"]
)
async def test_upstream_failure_mid_stream_aborts_the_client_response(failure: Exception) -> None:
    """After the headers, a dead or stalled upstream raises `UpstreamStreamError` (the server then aborts
    the connection): no final body message, so the client cannot mistake it for a complete answer."""
    forwarder = ScriptedForwarder(ScriptedAnswer(body=[b"data: 1\n\n", failure]))
    ctx = context()
    with pytest.raises(UpstreamStreamError, match="mid-response") as info:
        await forward(forwarder, ctx)
    assert info.value.__cause__ is failure
    response = forwarder.responses[0]
    assert response.closed and not response.released
    assert ctx.upstream_error is not None and "mid-response" in ctx.upstream_error


async def test_mid_stream_death_sends_no_final_message() -> None:
    """What the client got before the death is all it gets, and nothing says "complete"."""
    forwarder = ScriptedForwarder(ScriptedAnswer(body=[b"a", b"b", UpstreamReadError("gone")]))
    client = Client()
    with pytest.raises(UpstreamStreamError):
        await forward(forwarder, client=client)
    assert client.bodies == [(b"a", True), (b"b", True)]


@pytest.mark.parametrize("where", ["before-headers", "mid-body"])
async def test_client_disconnect_cancels_the_upstream(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A client that leaves cancels the exchange: the upstream response is closed, the request ends
    quietly (not as a cancelled task), and the context says the client went away."""
    monkeypatch.setattr(upstream_module, "WATCH_AFTER", 0.0)  # watch from the first turn of the loop
    never = asyncio.Event()
    if where == "before-headers":
        answer = ScriptedAnswer(before=[never])
    else:
        answer = ScriptedAnswer(body=[b"data: 1\n\n", never])
    forwarder = ScriptedForwarder(answer)
    ctx, client = context(), Client()
    running = asyncio.create_task(forward(forwarder, ctx, client))
    if where == "mid-body":
        await client.body_sent.wait()
    else:
        await asyncio.sleep(0)  # the request is waiting for headers that never come
    client.leave()
    await running
    assert not running.cancelled() and ctx.client_disconnected
    if where == "mid-body":
        assert forwarder.responses[0].closed and not forwarder.responses[0].released
        assert client.bodies == [(b"data: 1\n\n", True)]
    else:
        assert forwarder.responses == [] and client.messages == []
    assert forwarder.connection_counts() == (0, 0)


async def test_disconnect_after_the_last_message_is_the_normal_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers report a disconnect once the response is complete: that is not a client leaving."""
    monkeypatch.setattr(upstream_module, "WATCH_AFTER", 0.0)
    more = asyncio.Event()
    forwarder = ScriptedForwarder(ScriptedAnswer(body=[b"a", more, b"b"]))
    ctx, client = context(), Client(leave_on_last=True)
    running = asyncio.create_task(forward(forwarder, ctx, client))
    await client.receiving.wait()  # the watcher is waiting while the body is still coming
    more.set()
    await running
    assert client.receives == 1
    assert not ctx.client_disconnected
    assert forwarder.responses[0].released
    assert client.bodies == [(b"a", True), (b"b", False)]


async def test_forwarder_ownership_and_connection_counts() -> None:
    """A given forwarder is used, counted for /metrics and closed by `aclose()`; without one the pool is
    made on `startup()`, and made again after `aclose()`."""
    forwarder = ScriptedForwarder(ScriptedAnswer())
    app = UpstreamApp({"openai": TARGET}, forwarder=forwarder)
    assert app.forwarder is forwarder and app.connection_counts() == (0, 0)
    client = Client()
    await app(http_scope(context()), client.receive, client.send)
    assert app.connection_counts() == (1, 1)  # the exchange's connection, idle again
    await app.aclose()
    assert forwarder.closed and app.forwarder is forwarder
    client = Client()
    await app(http_scope(context()), client.receive, client.send)
    assert client.start["status"] == 502  # a closed forwarder refuses, as the pool does

    default = UpstreamApp({"openai": TARGET})
    assert default.connection_counts() == (0, 0)
    await default.startup()
    pool = default.forwarder
    assert isinstance(pool, ConnectionPool) and pool.limit == 1000 and pool.keepalive_timeout == 4.0
    await default.aclose()
    assert default.connection_counts() == (0, 0)
    assert default.forwarder is not pool


async def test_scripted_forwarder_answers_in_order_and_by_request() -> None:
    """The n-th request gets the n-th answer (the last repeats); a callable answers from the request."""

    def by_path(request: Any) -> ScriptedAnswer:
        return ScriptedAnswer(status=404 if request.target.endswith(b"/missing") else 200)

    forwarder = ScriptedForwarder(ScriptedAnswer(status=429), by_path)
    statuses = []
    for path in ("/chat/completions", "/missing", "/models"):
        _, client = await forward(forwarder, context(path=path))
        statuses.append(client.start["status"])
    assert statuses == [429, 404, 200]
    assert [r.header(b"authorization") for r in forwarder.requests] == [b"Bearer sk-up"] * 3
    with pytest.raises(ValueError, match="at least one"):
        ScriptedForwarder()


async def test_scripted_delays_and_a_wait_before_the_end() -> None:
    """A number is a delay (0 here: one turn of the loop); a step after the last chunk means the end only
    shows once it is done, so the body closes with an empty final message."""
    forwarder = ScriptedForwarder(ScriptedAnswer(before=[0.0], body=[b"x", 0.0]))
    _, client = await forward(forwarder)
    assert client.bodies == [(b"x", True), (b"", False)]
    assert forwarder.responses[0].chunks_read == 1
