"""Forwarding through a real proxy on a socket, with the real openai SDK as the client."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from orq_proxy.app import build_app
from orq_proxy.config import ProxyConfig
from orq_proxy.testing.fake_upstream import FakeUpstream, build_fake_upstream
from orq_proxy.testing.servers import ServerThread, serve_in_thread

MESSAGES: list[Any] = [{"role": "user", "content": "hello there proxy"}]
UPSTREAM_KEY = "sk-upstream-secret"  # the fake's (tests/conftest.py)


ClientFactory = Callable[..., openai.OpenAI]


@pytest.fixture
def client_for() -> Iterator[ClientFactory]:
    """`client_for(server, key=..., prefix=...)`: an openai client on the proxy, closed after the test."""
    made: list[openai.OpenAI] = []

    def make(server: Any, key: str = "sk-client", prefix: str = "/v1", **kwargs: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=server.url + prefix, api_key=key, max_retries=0, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.mark.parametrize("prefix", ["/v1", "/v2/router", "/v3/router"])
def test_json_chat_forwarded_on_every_surface(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream, prefix: str
) -> None:
    """A chat completion on each surface reaches `{base_url}/chat/completions` and comes back intact."""
    _, server = proxy_factory()
    out = client_for(server, prefix=prefix).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert out.choices[0].message.content
    assert out.usage is not None and out.usage.prompt_tokens == 3 + 4
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"]


def test_prefix_routing_strips_provider_and_orq_fields(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream
) -> None:
    """`openai/gpt-4o` goes to upstream `openai` as `gpt-4o`; `orq` and `identity` never reach it."""
    _, server = proxy_factory()
    out = client_for(server).chat.completions.create(
        model="openai/gpt-4o",
        messages=MESSAGES,
        extra_body={"orq": {"identity": {"id": "u1"}}, "identity": {"id": "u2"}},
        extra_headers={"X-ORQ-IDENTITY-ID": "u3"},
    )
    assert out.model == "gpt-4o"
    sent = fake.requests[0]
    assert sent.json["model"] == "gpt-4o"
    assert "orq" not in sent.json and "identity" not in sent.json
    assert "x-orq-identity-id" not in sent.headers


def test_client_key_replaced_by_upstream_credential(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream
) -> None:
    """The proxy key never reaches the upstream; the configured credential does."""
    _, server = proxy_factory({"api_keys": [{"key": "sk-proxy-1"}]})
    client_for(server, key="sk-proxy-1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    headers = fake.requests[0].headers
    assert headers["authorization"] == "Bearer sk-upstream-secret"
    assert "sk-proxy-1" not in str(headers)
    assert headers.get("accept-encoding") == "identity"


def test_unknown_provider_is_400_naming_configured(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream
) -> None:
    """An unknown provider prefix gets a 400 in OpenAI's shape that lists the configured providers."""
    _, server = proxy_factory()
    with pytest.raises(openai.BadRequestError) as info:
        client_for(server).chat.completions.create(model="nope/gpt-4o", messages=MESSAGES)
    body = info.value.body
    assert isinstance(body, dict)
    assert body["code"] == "unknown_provider" and body["param"] == "model"
    assert "'nope'" in body["message"] and "openai" in body["message"]
    assert fake.requests == []


def test_bare_model_without_default_upstream_is_400(
    client_for: ClientFactory, upstream_url: str, proxy_factory: Any
) -> None:
    """With two upstreams and no default, a bare model name is a 400 that says how to fix it."""
    ups = {
        "a": {"base_url": upstream_url, "api_key": "sk-upstream-secret"},
        "b": {"base_url": upstream_url, "api_key": "sk-upstream-secret"},
    }
    _, server = proxy_factory({"upstreams": ups})
    with pytest.raises(openai.BadRequestError, match="no provider prefix"):
        client_for(server).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    out = client_for(server).chat.completions.create(model="b/gpt-4o", messages=MESSAGES)
    assert out.model == "gpt-4o"


def test_stream_is_not_buffered(client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream) -> None:
    """The client reads the first SSE event while the upstream is still producing the rest."""
    _, server = proxy_factory()
    delay_ms = 250
    stream = client_for(server).chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-chunk-delay-ms": str(delay_ms), "x-fake-words": "4"},
    )
    start = time.monotonic()
    arrivals = []
    for _chunk in stream:
        arrivals.append(time.monotonic() - start)
    # role chunk + 4 words + finish chunk; the upstream waits 250 ms before each word after the first.
    assert len(arrivals) == 6
    assert arrivals[0] < 0.15, arrivals
    # Buffering would deliver everything at once at the end; streaming spreads it over >= 3 delays.
    assert arrivals[-1] - arrivals[0] >= 3 * delay_ms / 1000 * 0.9, arrivals


async def test_async_client_stream_and_json(proxy_factory: Any, fake: FakeUpstream) -> None:
    """The async openai client works for JSON and streams (usage chunk on request)."""
    _, server = proxy_factory()
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    out = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert out.usage is not None and out.usage.completion_tokens == 8
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 8
    await client.close()


def test_responses_and_embeddings(client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream) -> None:
    """The Responses API (JSON and stream) and embeddings pass through."""
    _, server = proxy_factory()
    client = client_for(server, prefix="/v3/router")
    resp = client.responses.create(model="openai/gpt-4o", input="say something")
    assert resp.usage is not None and resp.usage.output_tokens == 8
    events = list(client.responses.create(model="gpt-4o", input="x y", stream=True))
    assert events[-1].type == "response.completed"
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a b c"])
    assert emb.usage.prompt_tokens == 3


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_upstream_errors_pass_through(
    proxy_factory: Any, fake: FakeUpstream, upstream_url: str, status: int
) -> None:
    """Upstream 4xx/5xx reach the client unchanged (status and body)."""
    _, server = proxy_factory()
    raw = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"x-fake-status": str(status)},
    )
    direct = httpx.post(
        upstream_url + "/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"x-fake-status": str(status), "authorization": "Bearer sk-upstream-secret"},
    )
    assert raw.status_code == status
    assert raw.json()["error"]["message"] == direct.json()["error"]["message"]


def test_unreachable_upstream_is_502(client_for: ClientFactory, proxy_factory: Any) -> None:
    """A refused connection is a 502 in OpenAI's shape."""
    dead = {"openai": {"base_url": "http://127.0.0.1:9/v1", "default": True}}
    _, server = proxy_factory({"upstreams": dead})
    with pytest.raises(openai.APIStatusError) as info:
        client_for(server).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 502
    assert isinstance(info.value.body, dict) and "unreachable" in info.value.body["message"]


@pytest.mark.parametrize(
    "answer",
    [b"\x16\x03\x01\x00\x2a not http at all", b"", b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\ncut"],
    ids=["garbage", "closes", "dies-mid-body"],
)
def test_broken_upstream_answers(client_for: ClientFactory, proxy_factory: Any, answer: bytes) -> None:
    """An upstream that answers garbage, or hangs up, before its headers is a 502; one that dies after
    them cuts the client's response short (the SDK sees a broken connection, not a clean answer)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:  # one connection: neither the proxy nor the client (max_retries=0) retries
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        ups = {"openai": {"base_url": f"http://127.0.0.1:{port}/v1", "default": True}}
        _, server = proxy_factory({"upstreams": ups})
        client = client_for(server)
        if answer.startswith(b"HTTP/1.1 200"):
            with pytest.raises(openai.APIConnectionError):
                client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        else:
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert info.value.status_code == 502
            assert isinstance(info.value.body, dict) and "unreachable" in info.value.body["message"]
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("read_timeout", [600.0, 0.05])
def test_slow_upstream_headers_is_504(
    client_for: ClientFactory, upstream_url: str, proxy_factory: Any, fake: FakeUpstream, read_timeout: float
) -> None:
    """No response headers within `headers_timeout` is a 504 (whichever of it and `read_timeout` is
    shorter bounds the wait)."""
    ups = {
        "openai": {
            "base_url": upstream_url,
            "api_key": "sk-upstream-secret",
            "headers_timeout": 0.1,
            "read_timeout": read_timeout,
        }
    }
    _, server = proxy_factory({"upstreams": ups})
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client_for(server).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-fake-latency-ms": "3000"}
        )
    assert info.value.status_code == 504
    assert time.monotonic() - start < 2.0


def test_client_disconnect_cancels_upstream(proxy_factory: Any, fake: FakeUpstream) -> None:
    """Closing the client mid-stream cancels the upstream request."""
    _, server = proxy_factory()
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            headers={"x-fake-chunk-delay-ms": "200", "x-fake-words": "50"},
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.monotonic() + 5
    while not (fake.requests and fake.requests[0].disconnected) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.requests[0].disconnected


def test_upstream_death_mid_stream_reaches_client(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream
) -> None:
    """An upstream that dies mid-stream gives the client a broken stream, not a clean end."""
    _, server = proxy_factory()
    with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError, httpx.ReadError)):
        list(
            client_for(server).chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"x-fake-disconnect-after": "3"}
            )
        )


def test_body_over_limit_is_413(client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream) -> None:
    """A body over `max_body_bytes` is refused with 413 before anything is forwarded."""
    _, server = proxy_factory({"server": {"max_body_bytes": 1000}})
    with pytest.raises(openai.APIStatusError) as info:
        client_for(server).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x" * 2000}]
        )
    assert info.value.status_code == 413
    assert fake.requests == []
    # Chunked upload without Content-Length is cut off the same way.
    r = httpx.post(server.url + "/v1/chat/completions", content=iter([b"{" + b" " * 800, b" " * 800 + b"}"]))
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer wrong"}, 401), ({"authorization": "Basic abc"}, 401)],
)
def test_proxy_requires_a_valid_key(
    proxy_factory: Any, fake: FakeUpstream, headers: Any, status: int
) -> None:
    """With keys configured, a missing or unknown key is a 401 in OpenAI's shape."""
    _, server = proxy_factory({"api_keys": [{"key": "sk-good"}]})
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "gpt-4o"}, headers=headers)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and "code" in err and "param" in err
    assert r.headers["x-request-id"]
    ok = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"authorization": "bearer sk-good"},
    )
    assert ok.status_code == 200


def test_invalid_json_is_400(proxy_factory: Any, fake: FakeUpstream) -> None:
    """A JSON body that does not parse is a 400 naming the problem."""
    _, server = proxy_factory()
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "gpt-4o", "orq": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "orq"


def test_get_models_goes_to_default(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream
) -> None:
    """Requests without a model (GET /models) go to the default upstream."""
    _, server = proxy_factory()
    models = client_for(server).models.list()
    assert any(m.id for m in models)


def test_health_and_request_id(proxy_factory: Any) -> None:
    """`/healthz` and `/readyz` answer; every proxied response carries a ULID `x-request-id`."""
    _, server = proxy_factory()
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert len(r.headers["x-request-id"]) == 26


async def test_many_concurrent_requests(proxy_factory: Any, fake: FakeUpstream) -> None:
    """100 concurrent requests all succeed through the pooled client."""
    _, server = proxy_factory()
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    outs = await asyncio.gather(
        *[client.chat.completions.create(model="gpt-4o", messages=MESSAGES) for _ in range(100)]
    )
    assert len({o.id for o in outs}) == 100
    await client.close()


def test_fake_requires_key_directly() -> None:
    """The fake upstream itself rejects a wrong key (so the credential test above can fail)."""
    fake = build_fake_upstream(api_key="right")
    with serve_in_thread(fake) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert r.status_code == 401


SPOOFED = {
    "X-Forwarded-For": "203.0.113.9",
    "Forwarded": "for=203.0.113.9;proto=https",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "victim.example",
    "X-Real-IP": "203.0.113.9",
}


def test_hop_by_hop_underscore_and_cookie_headers_not_forwarded(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream
) -> None:
    """Headers `Connection` names (RFC 9110 §7.6.1), names with `_` and the client's `Cookie` never reach
    the upstream; ordinary headers still do."""
    _, server = proxy_factory()
    client_for(server).chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers={
            "Connection": "keep-alive, X-Hop, x-other-hop",
            "X-Hop": "secret",
            "X-Other-Hop": "secret",
            "x_custom": "1",
            "transfer_encoding": "chunked",
            "Cookie": "session=abc",
            "X-Custom-Ok": "1",
        },
    )
    headers = fake.requests[0].headers
    for name in ("x-hop", "x-other-hop", "x_custom", "transfer_encoding", "cookie"):
        assert name not in headers, name
    assert headers["x-custom-ok"] == "1"


@pytest.fixture
def peer_proxy(upstream_url: str) -> Iterator[Callable[..., ServerThread]]:
    """`make(server_section=None)`: a proxy in front of the fake whose uvicorn leaves `scope["client"]` the
    TCP peer (`proxy_headers=False`; uvicorn's default rewrites it from a loopback client's
    X-Forwarded-For, and the upstream layer's X-Forwarded-For is built from `scope["client"]`)."""
    servers: list[ServerThread] = []

    def make(server_section: dict[str, Any] | None = None) -> ServerThread:
        config = ProxyConfig.model_validate(
            {
                "server": server_section or {},
                "upstreams": {"openai": {"base_url": upstream_url, "api_key": UPSTREAM_KEY, "default": True}},
            }
        )
        server = ServerThread(build_app(config), proxy_headers=False).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def test_forwarded_for_is_the_peer_and_spoofed_values_are_dropped(
    client_for: ClientFactory, peer_proxy: Callable[..., ServerThread], fake: FakeUpstream
) -> None:
    """By default the client's X-Forwarded-* / Forwarded / X-Real-IP are dropped and X-Forwarded-For /
    Forwarded name the real peer (127.0.0.1) alone."""
    server = peer_proxy()
    client_for(server).chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=SPOOFED)
    headers = fake.requests[0].headers
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["forwarded"] == "for=127.0.0.1"
    for name in ("x-forwarded-proto", "x-forwarded-host", "x-real-ip"):
        assert name not in headers, name
    assert "203.0.113.9" not in str(headers)


def test_trusted_forwarded_headers_get_the_peer_appended(
    client_for: ClientFactory, peer_proxy: Callable[..., ServerThread], fake: FakeUpstream
) -> None:
    """With `trust_forwarded_headers = true` (behind a front proxy) the peer is appended to the client's
    X-Forwarded-For and Forwarded chains, and the other forwarding headers pass as sent."""
    server = peer_proxy({"trust_forwarded_headers": True})
    client_for(server).chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=SPOOFED)
    headers = fake.requests[0].headers
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["forwarded"] == "for=203.0.113.9;proto=https, for=127.0.0.1"
    assert (headers["x-forwarded-proto"], headers["x-forwarded-host"], headers["x-real-ip"]) == (
        "https",
        "victim.example",
        "203.0.113.9",
    )


def test_served_proxy_does_not_take_a_loopback_clients_forwarded_for(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream
) -> None:
    """As `orq-proxy serve` runs it (`uvicorn_options`), a loopback client's spoofed X-Forwarded-For does not
    become its address: the upstream sees the peer."""
    _, server = proxy_factory()
    client_for(server).chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=SPOOFED)
    assert fake.requests[0].headers["x-forwarded-for"] == "127.0.0.1"


def test_upstream_death_mid_stream_is_one_warning_line(
    client_for: ClientFactory, proxy_factory: Any, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The expected failure is logged once, as a warning line naming the request; the server's error log
    gets no "Exception in ASGI application" traceback for the abort (it used to log both)."""
    import logging

    class Recorder(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    _, server = proxy_factory()  # (uvicorn configures its loggers here: add the recorder after it)
    server_log = Recorder()
    logging.getLogger("uvicorn.error").addHandler(server_log)  # sees what passes the logger's filters
    try:
        with caplog.at_level(logging.WARNING, logger="orq_proxy"):
            for _ in range(3):
                with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError, httpx.ReadError)):
                    list(
                        client_for(server).chat.completions.create(
                            model="gpt-4o",
                            messages=MESSAGES,
                            stream=True,
                            extra_headers={"x-fake-disconnect-after": "3"},
                        )
                    )
            time.sleep(0.2)  # the server logs after the response is torn down
    finally:
        logging.getLogger("uvicorn.error").removeHandler(server_log)
    ours = [r for r in caplog.records if r.name == "orq_proxy.proxy.upstream"]
    assert len(ours) == 3 and all("upstream failed mid-response" in r.getMessage() for r in ours)
    assert all(r.exc_info is None for r in ours)
    assert [r.getMessage() for r in server_log.records if r.exc_info] == []
