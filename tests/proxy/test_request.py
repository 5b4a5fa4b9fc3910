"""The request layer: the key is checked from the headers before the body is read; dot-segment paths are
refused. Real sockets for "the server did not wait for the body", a scripted `receive` for "never read"."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

import httpx
import pytest
from starlette.types import Message

from orq_proxy.app import build_app
from orq_proxy.config import ProxyConfig
from orq_proxy.proxy.request import has_dot_segment
from orq_proxy.testing.fake_upstream import FakeUpstream

KEY = "sk-proxy-request"
LIMIT = 32 * 1024 * 1024  # the default max_body_bytes: a body of exactly this size is allowed
CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


def _head(*, key: str | None, length: int, close: bool = False) -> bytes:
    """A request head; `close` asks the server to close the connection after its answer (which ends
    `_read_response`). Without it only the server's own decision closes the connection."""
    lines = [
        f"POST {CHAT} HTTP/1.1",
        "host: proxy",
        "content-type: application/json",
        f"content-length: {length}",
    ]
    if key is not None:
        lines.append(f"authorization: Bearer {key}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and what came of the body until the server closed the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def test_unauthenticated_32_mib_post_is_401_before_any_body_is_sent(
    proxy_factory: Any, fake: FakeUpstream
) -> None:
    """A POST announcing a 32 MiB body without a key gets its 401 while not one body byte was sent, and
    the server closes the connection instead of waiting for (or reading) the body."""
    _, server = proxy_factory({"api_keys": [{"key": KEY}]})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(_head(key=None, length=LIMIT))  # the body is never sent
        status, headers, body = _read_response(sock)  # a server waiting for the body times out here
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["x-request-id"] and headers["connection"] == "close"
    assert fake.requests == []


def test_wrong_key_is_401_before_the_body_is_read(proxy_factory: Any, fake: FakeUpstream) -> None:
    """An unknown key with part of a 32 MiB body sent: 401, connection closed, nothing forwarded."""
    _, server = proxy_factory({"api_keys": [{"key": KEY}]})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(_head(key="sk-wrong", length=LIMIT) + b'{"model": "gpt-4o", "messages": [')
        status, headers, _ = _read_response(sock)
    assert status == 401 and headers["connection"] == "close"
    assert fake.requests == []


def test_authenticated_body_sent_in_parts_is_read_and_forwarded(
    proxy_factory: Any, fake: FakeUpstream
) -> None:
    """With a valid key the body is read in full (sent in two writes) and forwarded."""
    _, server = proxy_factory({"api_keys": [{"key": KEY}]})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(_head(key=KEY, length=len(BODY), close=True) + BODY[:10])
        sock.sendall(BODY[10:])
        status, headers, body = _read_response(sock)
    assert status == 200 and headers["x-request-id"]
    assert json.loads(body)["choices"][0]["message"]["content"]
    assert [r.json for r in fake.requests] == [json.loads(BODY)]


@pytest.mark.parametrize(
    ("key", "length", "body", "status", "code"),
    [
        (KEY, LIMIT + 1, b"", 413, "request_too_large"),  # announced too large: refused before reading
        (KEY, 9, b"{not json", 400, "invalid_json"),
        (None, LIMIT + 1, b"", 401, "invalid_api_key"),  # the key first, then the body's rules
        (None, 9, b"{not json", 401, "invalid_api_key"),
    ],
    ids=["413", "400", "401-over-413", "401-over-400"],
)
def test_body_rules_apply_to_authenticated_callers(
    proxy_factory: Any, fake: FakeUpstream, key: str | None, length: int, body: bytes, status: int, code: str
) -> None:
    """413 and 400 keep their order for a valid key; without one the 401 comes first."""
    _, server = proxy_factory({"api_keys": [{"key": KEY}]})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(_head(key=key, length=length, close=True) + body)
        got, headers, answer = _read_response(sock)
    assert (got, json.loads(answer)["error"]["code"]) == (status, code)
    assert headers["x-request-id"]
    assert fake.requests == []


async def test_unauthenticated_request_never_calls_receive(upstream_url: str) -> None:
    """Through `build_app`'s stack, a request without a valid key is answered without a single `receive()`:
    its body is not read at all."""
    config = ProxyConfig.model_validate(
        {"api_keys": [{"key": KEY}], "upstreams": {"openai": {"base_url": upstream_url, "default": True}}}
    )
    app = build_app(config)
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the body was read")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(LIMIT).encode())],
        "client": ("127.0.0.1", 5000),
    }
    async with app.lifespan():
        await app(scope, receive, send)
    assert sent[0]["status"] == 401
    assert (b"connection", b"close") in sent[0]["headers"]


async def test_open_mode_still_reads_the_body(proxy_factory: Any, fake: FakeUpstream) -> None:
    """Without keys (open mode) every caller passes auth and the body is read, parsed and forwarded."""
    _, server = proxy_factory()
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post(CHAT, content=BODY, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.headers["x-request-id"]
    assert fake.requests[0].json == json.loads(BODY)


# ---------------------------------------------------------------------------------------------------------
# Dot segments


@pytest.mark.parametrize(
    ("path", "dotted"),
    [
        ("/chat/completions", False),
        ("/models/gpt-4.1", False),
        ("/files/a..b", False),
        ("/files/...", False),
        ("/.well-known/x", False),
        ("/files/100%25", False),
        ("/..", True),
        ("/.", True),
        ("/../../admin/keys", True),
        ("/./chat/completions", True),
        ("/chat/completions/.", True),
        ("/a/../b", True),
        ("/a\\..\\b", True),  # a backslash some servers read as `/`
        ("/..;/admin", True),  # servlet containers read `..;` as `..`
        ("/%2e%2e/admin", True),  # decoded once more (the server decoded the request's `%252e%252e`)
        ("/%2E%2e/admin", True),
        ("/.%2e/admin", True),
        ("/%252e%252e/admin", True),
        ("/%2e%2e%2fadmin", True),
    ],
)
def test_has_dot_segment(path: str, dotted: bool) -> None:
    """`.`/`..` segments are found whatever their encoding or separator; dots inside a name are fine."""
    assert has_dot_segment(path) is dotted


DOT_PATHS = [
    "/v1/../../admin/keys",
    "/v1/%2e%2e/%2e%2e/admin/keys",
    "/v1/%2E%2e/admin",
    "/v1/./chat/completions",
    "/v1/chat/completions/.",
    "/v1/%2e/chat/completions",
    "/v1/..%2fadmin",
    "/v1/..%5cadmin",
    "/v1/%252e%252e/admin",
    "/v1/..;/admin",
    "/v2/router/../admin",
    "/v3/router/%2e%2e/admin",
]


@pytest.mark.parametrize("path", DOT_PATHS)
def test_dot_segment_paths_are_400_and_never_forwarded(
    proxy_factory: Any, fake: FakeUpstream, path: str
) -> None:
    """A path with a dot segment (raw, encoded, mixed case, behind `\\` or `;`) is a 400 in OpenAI's
    shape naming the path as sent, and the upstream never sees it (http.client sends it as written)."""
    _, server = proxy_factory()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("POST", path, body=BODY, headers={"content-type": "application/json"})
        r = conn.getresponse()
        error = json.loads(r.read())["error"]
    finally:
        conn.close()
    assert r.status == 400 and r.getheader("x-request-id")
    assert error["code"] == "invalid_path" and error["type"] == "invalid_request_error"
    assert path in error["message"]
    assert fake.requests == []


def test_dots_inside_names_are_forwarded(proxy_factory: Any, fake: FakeUpstream) -> None:
    """A dot inside a segment (`gpt-4.1`) is no dot segment: the request reaches the upstream."""
    _, server = proxy_factory()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/v1/models/gpt-4.1")
        conn.getresponse().read()
    finally:
        conn.close()
    assert [r.path for r in fake.requests] == ["/v1/models/gpt-4.1"]


MULTIPART = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--\r\n'


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/v1/audio/transcriptions", True),
        ("/v1/audio/translations", True),
        ("/v1/images/edits", True),
        ("/v1/images/variations", True),
        ("/v1/files", True),
        ("/v1/uploads/upload_abc/parts", True),
        ("/v1/containers/cntr_1/files", True),
        ("/v1/videos", True),
        ("/v2/router/audio/transcriptions", True),
        ("/v1/chat/completions", False),
        ("/v1/responses", False),
        ("/v1/embeddings", False),
        ("/v1/audio/speech", False),
        ("/v1/images/generations", False),
        ("/v1/uploads", False),
        ("/v1/files/file_1/content", False),
    ],
)
def test_multipart_is_forwarded_unparsed_only_to_upload_apis(
    proxy_factory: Any, fake: FakeUpstream, path: str, forwarded: bool
) -> None:
    """A multipart body reaches the upstream as sent on the APIs that take uploads; on any other path it
    is a 400 (those take JSON, and the proxy must read the body to attribute, budget and meter it)."""
    _, server = proxy_factory()
    response = httpx.post(
        server.url + path, content=MULTIPART, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    if forwarded:
        assert [(r.path, r.body) for r in fake.requests] == [(path.replace("/v2/router", "/v1"), MULTIPART)]
        assert response.status_code == 404  # the fake has none of these APIs: its own answer
    else:
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
        assert "takes a JSON body, not multipart/form-data" in response.json()["error"]["message"]
        assert fake.requests == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", None, "application/json"])
def test_non_json_bodies_are_400_whatever_the_content_type(
    proxy_factory: Any, fake: FakeUpstream, content_type: str | None
) -> None:
    """JSON with NaN, an array or plain text: a 400 naming the problem under any content type, and the
    upstream never sees it; a JSON object under `text/plain` is still read as JSON."""
    _, server = proxy_factory()
    headers = {"content-type": content_type} if content_type else {}
    for raw, needle in [
        (b'{"model": "gpt-4o", "temperature": NaN}', "NaN"),
        (b'["gpt-4o"]', "must be a JSON object, got an array"),
        (b"hello", "not valid JSON"),
    ]:
        response = httpx.post(server.url + CHAT, content=raw, headers=headers)
        assert response.status_code == 400 and needle in response.json()["error"]["message"], raw
    assert fake.requests == []
    response = httpx.post(server.url + CHAT, content=BODY, headers=headers)
    assert response.status_code == 200 and fake.requests[0].json["model"] == "gpt-4o"
