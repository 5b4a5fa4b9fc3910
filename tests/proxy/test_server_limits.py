"""The inbound protocol's limits (`proxy/server.py`) on real sockets: header size and count caps (431), one
read deadline per request (408 or close), idle keep-alive, and normal clients unaffected.

Each proxy gets short timeouts so each test takes about a second. Raw sockets say what a client sends and
when; `_read_until_closed` fails a test whose server never closes the connection.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from orq_proxy.config import ServerConfig
from orq_proxy.proxy.server import LimitedHttpToolsProtocol
from orq_proxy.testing.servers import ServerThread

MAX_HEADER_BYTES = 64 * 1024  # the default, which these proxies keep
READ_TIMEOUT = 0.5
KEEP_ALIVE = 1.5
SLACK = 3.0  # seconds a busy CI machine may add to a deadline
LIMITS = {"server": {"request_read_timeout": READ_TIMEOUT, "keep_alive_timeout": KEEP_ALIVE}}
CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def server(proxy_factory: Any) -> ServerThread:
    server: ServerThread = proxy_factory(LIMITS)[1]
    return server


@pytest.fixture
def problems() -> Iterator[list[logging.LogRecord]]:
    """Records at ERROR or with a traceback from the proxy and uvicorn while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info or record.levelno >= logging.ERROR:
                records.append(record)

    handler = Keep()
    loggers = [logging.getLogger(name) for name in ("orq_proxy", "uvicorn.error")]
    for log in loggers:
        log.addHandler(handler)
    yield records
    for log in loggers:
        log.removeHandler(handler)


Connect = Callable[[ServerThread], socket.socket]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """`connect(server)`: a raw client socket (TCP_NODELAY, a timeout), closed when the test ends."""
    with contextlib.ExitStack() as stack:

        def make(server: ServerThread) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT + SLACK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return stack.enter_context(sock)

        yield make


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close); times out otherwise."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _head(size: int, *, path: bytes = b"/healthz") -> bytes:
    """A GET head of exactly `size` bytes (request line, headers and the blank line), padded by one header."""
    start = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


# ---------------------------------------------------------------------------------------------------------
# Header size and count


def test_an_endless_header_is_refused_once_past_the_limit(server: ServerThread, connect: Connect) -> None:
    """A 1 MiB header sent in 16 KiB pieces gets 431 after ~64 KiB, before the rest of it is sent."""
    sock = connect(server)
    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    sock.sendall(start)
    piece, sent = b"a" * 16384, len(start)
    while sent <= MAX_HEADER_BYTES:
        assert not select.select([sock], [], [], 0.01)[0], f"answered after only {sent} bytes"
        sock.sendall(piece)
        sent += len(piece)
    # Past the limit by less than a piece: answered without waiting for the rest of the 1 MiB.
    assert select.select([sock], [], [], SLACK)[0], f"no answer after {sent} bytes"
    response = _read_until_closed(sock)
    assert _status(response) == 431
    assert b"connection: close" in response.lower()


@pytest.mark.parametrize(("size", "status"), [(MAX_HEADER_BYTES, 200), (MAX_HEADER_BYTES + 1, 431)])
def test_a_head_of_exactly_the_limit_is_served(
    server: ServerThread, size: int, status: int, connect: Connect
) -> None:
    """The limit counts the request line, the headers and the blank line, and is inclusive."""
    sock = connect(server)
    sock.sendall(_head(size))
    assert _status(_read_until_closed(sock)) == status


@pytest.mark.parametrize(("count", "status"), [(100, 200), (101, 431)])
def test_too_many_headers_get_431(server: ServerThread, count: int, status: int, connect: Connect) -> None:
    """At most `max_headers` header fields (Host and Connection included)."""
    fields = b"".join(b"X-Field-%d: v\r\n" % i for i in range(count - 2))
    sock = connect(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields + b"\r\n")
    assert _status(_read_until_closed(sock)) == status


def test_limits_come_from_the_config(proxy_factory: Any, connect: Connect) -> None:
    """`[server] max_header_bytes` and `max_headers` are the ones applied."""
    _, server = proxy_factory({"server": {"max_header_bytes": 1024, "max_headers": 3}})
    for request, status in [
        (_head(1024), 200),
        (_head(1025), 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: 1\r\n\r\n", 200),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: 1\r\nX-B: 2\r\n\r\n", 431),
    ]:
        sock = connect(server)
        sock.sendall(request)
        assert _status(_read_until_closed(sock)) == status, request[-40:]


# ---------------------------------------------------------------------------------------------------------
# Read deadline


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"GET /heal", 408),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ", 408),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", 408),
        (b"\r\n", None),  # blank lines only: nothing of a request came, so nothing to answer
    ],
)
def test_a_stalled_head_times_out(
    server: ServerThread, sent: bytes, answer: int | None, connect: Connect
) -> None:
    """Half a request line or half the headers, then nothing: 408 (or just a close) at the deadline."""
    sock = connect(server)
    started = time.monotonic()
    sock.sendall(sent)
    response = _read_until_closed(sock)
    elapsed = time.monotonic() - started
    assert READ_TIMEOUT * 0.8 <= elapsed < READ_TIMEOUT + SLACK
    if answer is None:
        assert response == b""
    else:
        assert _status(response) == answer
        assert b"connection: close" in response.lower()


def test_trickling_a_head_does_not_extend_the_deadline(server: ServerThread, connect: Connect) -> None:
    """One deadline from the first byte: a header byte every 50 ms still ends at `request_read_timeout`."""
    sock = connect(server)
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    while not select.select([sock], [], [], 0.05)[0]:
        assert time.monotonic() - started < READ_TIMEOUT + SLACK, "still open"
        sock.sendall(b"a")
    assert _status(_read_until_closed(sock)) == 408


@pytest.mark.parametrize("sent", [1, 80 * 1024])  # 80 KiB: past uvicorn's 64 KiB read-ahead buffer
def test_a_stalled_body_times_out(
    server: ServerThread, problems: list[logging.LogRecord], sent: int, connect: Connect
) -> None:
    """Headers with a Content-Length, part of the body, then nothing: 408 or a close, and no error logged."""
    sock = connect(server)
    started = time.monotonic()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (sent + 1000) + b" " * sent
    )
    response = _read_until_closed(sock)
    assert time.monotonic() - started < READ_TIMEOUT + SLACK
    assert response == b"" or _status(response) == 408
    assert problems == []


def test_real_clients_are_served_while_200_connections_stall(proxy_factory: Any, connect: Connect) -> None:
    """200 half-sent requests hold nothing for long: others are served meanwhile and all 200 are closed."""
    timeout = 3.0
    _, server = proxy_factory({"server": {"request_read_timeout": timeout}})
    connections = server.server.server_state.connections
    stalled = []
    for _ in range(200):
        sock = connect(server)
        sock.settimeout(timeout + SLACK)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Stall: ")
        stalled.append(sock)
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for _ in range(20):
            assert client.get("/healthz").status_code == 200
        assert len(connections) == 201  # served while all 200 were still held open
    started = time.monotonic()
    for sock in stalled:
        response = _read_until_closed(sock)
        assert response == b"" or _status(response) == 408
        sock.close()
    assert time.monotonic() - started < timeout + SLACK
    deadline = time.monotonic() + SLACK
    while connections and time.monotonic() < deadline:  # connection_lost runs on the server's loop
        time.sleep(0.01)
    assert len(connections) == 0


# ---------------------------------------------------------------------------------------------------------
# Keep-alive


def test_a_keep_alive_client_is_unaffected(server: ServerThread) -> None:
    """Many requests on one connection, some with bodies past one read, and a pause longer than the read
    deadline between two of them: all served on the same socket."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.connect()
    sock = conn.sock
    large = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 300_000}]}).encode()
    headers = {"Content-Type": "application/json"}
    for i in range(30):
        if i % 3 == 0:
            conn.request("GET", "/healthz")
        else:
            conn.request("POST", "/v1/chat/completions", body=large if i % 3 == 2 else CHAT, headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, i
        if i == 15:
            time.sleep(READ_TIMEOUT * 2)  # idle, not mid-request: only keep-alive applies (1.5 s)
    assert conn.sock is sock
    conn.close()


def test_pipelined_requests_are_all_answered(server: ServerThread, connect: Connect) -> None:
    """Two requests in one write, the second with a body and `Connection: close`: two answers, then close."""
    sock = connect(server)
    sock.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(CHAT) + CHAT
    )
    response = _read_until_closed(sock)
    assert response.count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize("first_request", [True, False])
def test_an_idle_connection_closes_after_keep_alive_timeout(
    server: ServerThread, first_request: bool
) -> None:
    """After a response, or from the start when a client never sends a byte: closed at `keep_alive_timeout`."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=KEEP_ALIVE + SLACK)
    conn.connect()
    if first_request:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200 and response.read()
    started = time.monotonic()
    assert _read_until_closed(conn.sock) == b""
    conn.close()
    assert KEEP_ALIVE * 0.8 <= time.monotonic() - started < KEEP_ALIVE + SLACK


# ---------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_header_bytes", 0),
        ("max_headers", 0),
        ("request_read_timeout", 0),
        ("request_read_timeout", -1.0),
        ("keep_alive_timeout", 0),
    ],
)
def test_limits_must_be_positive(field: str, value: float) -> None:
    """Each `[server]` limit is validated, and so is the protocol's own constructor of limits."""
    with pytest.raises(ValidationError, match=field):
        ServerConfig.model_validate({field: value})
    if field != "keep_alive_timeout":
        with pytest.raises(ValueError, match=field):
            LimitedHttpToolsProtocol.with_limits(**{field: value})  # type: ignore[arg-type]


def test_defaults() -> None:
    """64 KiB and 100 headers, a 30 s read deadline and uvicorn's 5 s keep-alive."""
    config = ServerConfig()
    assert (config.max_header_bytes, config.max_headers) == (65536, 100)
    assert (config.request_read_timeout, config.keep_alive_timeout) == (30.0, 5.0)
    protocol = LimitedHttpToolsProtocol.with_limits(max_headers=7)
    assert issubclass(protocol, LimitedHttpToolsProtocol)
    assert (protocol.max_header_bytes, protocol.max_headers, protocol.request_read_timeout) == (
        65536,
        7,
        30.0,
    )
