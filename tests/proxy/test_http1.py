"""The forwarding client (`_http1.py`) against real sockets: scripted asyncio servers that answer exactly as
told, so keep-alive, framing, timeouts, failures and back-pressure can each be provoked. Idle expiry runs on
a `FakeClock`; the timeouts that remain real are the socket's own (short, and the servers wait on events)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from orq_proxy.proxy._http1 import (
    HIGH_WATER,
    ConnectionPool,
    Origin,
    UpstreamConnectError,
    UpstreamReadError,
    origin_of,
)
from orq_proxy.testing.clock import FakeClock

TIMEOUTS: dict[str, Any] = {"connect_timeout": 5.0, "headers_timeout": 5.0, "read_timeout": 5.0}
JSON_OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


class Server:
    """A TCP server running `handler(server, reader, writer)` per connection; counts connections and keeps
    every request it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.closed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # (a handler still running at teardown is cancelled: it ends quietly)
        finally:
            self.open_now -= 1
            writer.close()
            self.closed.set()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and content-length body), or None when the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    def origin(self, scheme: str = "http", host: str = "127.0.0.1") -> Origin:
        return origin_of(f"{scheme}://{host}:{self.port}")


Handler = Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Start = Callable[..., Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    servers: list[Server] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> Server:
        server = Server(handler)
        server.server = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=ssl_context)
        server.port = server.server.sockets[0].getsockname()[1]
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.server is not None
        server.server.close()
        for task in server.tasks:
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `condition()` holds, checking after each turn of the loop (fails after `within` s)."""
    async with asyncio.timeout(within):
        # Polled: what is waited for (a transport noticing a close, pausing its reads) sets no event.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Hold a connection open, answering nothing, until the client closes it."""
    while await reader.read(65536):
        pass


def answering(*answers: bytes, then_close: bool = False) -> Handler:
    """Answers the n-th request on a connection with `answers[n]` (the last one repeats), keeping the
    connection open unless `then_close` (closed after the last answer)."""

    async def handler(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while await server.read_request(reader) is not None:
            writer.write(answers[min(n, len(answers) - 1)])
            await writer.drain()
            n += 1
            if then_close and n >= len(answers):
                return

    return handler


async def call(
    pool: ConnectionPool, origin: Origin, method: str = "POST", body: bytes = b"{}", **timeouts: float
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    response = await pool.request(
        origin, method, b"/v1/x", [(b"content-type", b"application/json")], body, **{**TIMEOUTS, **timeouts}
    )
    data = b""
    while chunk := await response.read():
        data += chunk
    response.release()
    return response.status, response.headers, data


async def test_keep_alive_reuses_one_connection(serve: Start) -> None:
    server = await serve(answering(JSON_OK))
    pool = ConnectionPool()
    for _ in range(5):
        status, headers, body = await call(pool, server.origin())
        assert (status, body) == (200, b'{"ok":true}')
        assert (b"content-type", b"application/json") in headers
    assert server.connections == 1
    assert pool.idle_connections() == 1
    # What went on the wire: request line, host, the given header, the length, the body.
    assert server.requests[0] == (
        b"POST /v1/x HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
        b"content-length: 2\r\n\r\n{}" % server.port
    )
    await pool.aclose()
    assert pool.idle_connections() == 0


async def test_chunked_body_is_dechunked_and_connection_reused(serve: Start) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        b"6\r\ndata: \r\n3\r\n{}\n\r\n0\r\n\r\n"
    )
    server = await serve(answering(chunked))
    pool = ConnectionPool()
    assert (await call(pool, server.origin()))[2] == b"data: {}\n"
    assert (await call(pool, server.origin()))[2] == b"data: {}\n"
    assert server.connections == 1


async def test_body_until_close_and_connection_close_are_not_reused(serve: Start) -> None:
    until_close = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of it"
    server = await serve(answering(until_close, then_close=True))
    pool = ConnectionPool()
    assert (await call(pool, server.origin()))[2] == b"all of it"
    assert (await call(pool, server.origin()))[2] == b"all of it"
    assert server.connections == 2
    assert pool.open_connections == 0


async def test_idle_connection_closed_by_upstream_is_not_reused(serve: Start) -> None:
    server = await serve(answering(JSON_OK, then_close=True))  # closes right after answering
    pool = ConnectionPool()
    assert (await call(pool, server.origin()))[0] == 200
    await server.closed.wait()
    (idle,) = pool._idle[server.origin().key]
    await eventually(lambda: idle.closed)  # the client's transport sees the close
    assert pool.idle_connections() == 1  # still listed: expiry is lazy
    assert (await call(pool, server.origin()))[0] == 200  # a fresh connection, no error
    assert server.connections == 2


@pytest.mark.parametrize(("idle_for", "connections"), [(3.9, 1), (4.0, 2), (60.0, 2)])
async def test_idle_connection_is_reused_until_keepalive_timeout(
    serve: Start, idle_for: float, connections: int
) -> None:
    """An idle connection is reused for less than `keepalive_timeout` seconds, then replaced."""
    server = await serve(answering(JSON_OK))
    clock = FakeClock()
    pool = ConnectionPool(keepalive_timeout=4.0, clock=clock.monotonic)
    await call(pool, server.origin())
    clock.advance(idle_for)
    await call(pool, server.origin())
    assert server.connections == connections
    assert pool.connection_counts() == (1, 1)


async def test_expired_idle_connections_are_dropped_when_one_is_returned(serve: Start) -> None:
    """Returning a connection drops the idle ones of its origin that are past their time."""
    gate = asyncio.Event()

    async def held(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await server.read_request(reader)) is not None:
            if request.endswith(b"hold"):
                await gate.wait()
            writer.write(JSON_OK)
            await writer.drain()

    server = await serve(held)
    clock = FakeClock()
    pool = ConnectionPool(keepalive_timeout=4.0, clock=clock.monotonic)
    holding = asyncio.create_task(call(pool, server.origin(), body=b"hold"))
    await eventually(lambda: len(server.requests) == 1)
    await call(pool, server.origin())  # a second connection, idle from now on
    assert pool.connection_counts() == (2, 1)
    clock.advance(5)
    gate.set()
    await holding  # the first one comes back, and the expired one is dropped
    assert pool.connection_counts() == (1, 1)
    assert server.connections == 2


async def test_unreachable_is_connect_error() -> None:
    pool = ConnectionPool()
    with pytest.raises(UpstreamConnectError, match="cannot connect"):
        await call(pool, origin_of("http://127.0.0.1:9"))
    assert pool.open_connections == 0


async def test_closed_before_answering_is_connect_error(serve: Start) -> None:
    async def hang_up(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    server = await serve(hang_up)
    pool = ConnectionPool()
    with pytest.raises(UpstreamConnectError, match="before answering"):
        await call(pool, server.origin())
    assert pool.open_connections == 0


async def test_headers_timeout(serve: Start) -> None:
    async def silent(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await until_closed(reader)

    server = await serve(silent)
    pool = ConnectionPool()
    with pytest.raises(TimeoutError, match="headers_timeout"):
        await call(pool, server.origin(), headers_timeout=0.05)
    assert pool.open_connections == 0
    await server.closed.wait()  # the timed-out connection was closed


async def test_headers_timeout_bounds_the_whole_wait(serve: Start) -> None:
    """Headers trickling in, each byte within `read_timeout`, still end at `headers_timeout`."""

    async def trickle(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.005)  # the upstream's pace: well within read_timeout per byte

    server = await serve(trickle)
    pool = ConnectionPool()
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError, match="headers_timeout"):
        await call(pool, server.origin(), headers_timeout=0.15, read_timeout=0.1)
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_reset_during_a_close_delimited_body_is_an_error(serve: Start) -> None:
    first_read = asyncio.Event()

    async def reset(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nsome of it")
        await writer.drain()
        await first_read.wait()  # (a reset can discard what the client has not read yet)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()

    server = await serve(reset)
    pool = ConnectionPool()
    response = await pool.request(server.origin(), "GET", b"/", [], b"", **TIMEOUTS)
    assert await response.read() == b"some of it"
    first_read.set()
    with pytest.raises(UpstreamReadError, match="mid-response"):
        await response.read()
    response.close()
    assert pool.open_connections == 0


async def test_read_timeout_and_death_mid_body(serve: Start) -> None:
    async def stalls(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
        await writer.drain()
        await until_closed(reader)

    async def dies(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
        await writer.drain()

    pool = ConnectionPool()
    for handler, error, match in ((stalls, TimeoutError, "read_timeout"), (dies, UpstreamReadError, "mid")):
        server = await serve(handler)
        response = await pool.request(
            server.origin(), "GET", b"/", [], b"", **{**TIMEOUTS, "read_timeout": 0.05}
        )
        assert await response.read() == b"part"
        with pytest.raises(error, match=match):
            await response.read()
        response.close()
    assert pool.open_connections == 0


async def test_malformed_response_is_read_error(serve: Start) -> None:
    server = await serve(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcNOT HTTP AT ALL\r\n\r\n"))
    pool = ConnectionPool()
    # Bytes after the end of a response: that answer is fine, the connection is not reused.
    assert (await call(pool, server.origin()))[2] == b"abc"
    assert pool.idle_connections() == 0
    # Not HTTP at all before the headers (e.g. a TLS port spoken to in clear): a connection error (502).
    for answer in (b"HTTP/1.1 abc\r\n\r\n", b"\x16\x03\x01\x00\x2a garbage"):
        server2 = await serve(answering(answer))
        with pytest.raises(UpstreamConnectError, match="malformed"):
            await call(pool, server2.origin())
    # A stray second response after a complete one: the first is fine, the connection is not reused.
    server3 = await serve(
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nabHTTP/1.1 200 OK\r\n\r\nxyz")
    )
    assert (await call(pool, server3.origin()))[2] == b"ab"
    assert pool.idle_connections() == 0
    assert pool.open_connections == 0


async def test_head_and_no_content_answers_end_without_a_body(serve: Start) -> None:
    server = await serve(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n"))
    pool = ConnectionPool()
    assert await asyncio.wait_for(call(pool, server.origin(), method="HEAD", body=b""), 2) == (
        200,
        [(b"content-length", b"50")],
        b"",
    )
    server2 = await serve(answering(b"HTTP/1.1 204 No Content\r\n\r\n"))
    for _ in range(2):
        assert (await asyncio.wait_for(call(pool, server2.origin(), method="DELETE", body=b""), 2))[0] == 204
    assert server2.connections == 1  # a 204 ends its exchange cleanly: the connection is reused
    # No length header for a GET without a body.
    assert b"content-length" not in server.requests[0]


async def test_line_breaks_in_headers_are_refused_before_sending(serve: Start) -> None:
    server = await serve(answering(JSON_OK))
    pool = ConnectionPool()
    for headers in ([(b"x-a", b"1\r\nx-injected: 1")], [(b"x-a", b"1\nx")], [(b"x-a\r", b"1")]):
        with pytest.raises(ValueError, match="line break"):
            await pool.request(server.origin(), "POST", b"/", headers, b"{}", **TIMEOUTS)
    with pytest.raises(ValueError, match="line break"):
        await pool.request(server.origin(), "POST", b"/a\r\nb", [], b"{}", **TIMEOUTS)
    for headers in (
        [(b"Transfer-Encoding", b"chunked")],
        [(b"content-length", b"5")],
        [(b"Host", b"other")],
        [(b"connection", b"close")],
    ):
        with pytest.raises(ValueError, match=r"framing|host"):
            await pool.request(server.origin(), "POST", b"/", headers, b"{}", **TIMEOUTS)
    assert server.connections == 0


async def test_pool_limit_bounds_open_connections(serve: Start) -> None:
    both_in = asyncio.Event()

    async def slow(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            if len(server.requests) >= 2:
                both_in.set()
            await both_in.wait()  # nothing is answered before two requests are in flight at once
            writer.write(JSON_OK)
            await writer.drain()

    server = await serve(slow)
    other = await serve(answering(JSON_OK))
    pool = ConnectionPool(limit=2)
    results = await asyncio.gather(*(call(pool, server.origin()) for _ in range(6)))
    assert [r[0] for r in results] == [200] * 6
    assert server.max_open == 2
    # Both slots are idle connections to `server` now; another origin still gets one (an idle one closes).
    assert (await call(pool, other.origin()))[0] == 200
    assert pool.open_connections <= 2


async def test_slow_reader_pauses_the_upstream(serve: Start) -> None:
    size = 8 * HIGH_WATER

    async def big(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for i in range(size // 4096):
            writer.write(bytes([i % 251]) * 4096)
            await writer.drain()

    server = await serve(big)
    pool = ConnectionPool()
    response = await pool.request(server.origin(), "GET", b"/", [], b"", **TIMEOUTS)
    conn = response._conn
    received = bytearray()
    largest = pauses = 0
    while True:
        # A slow client: it reads only once the connection has stopped reading (or the body is all in).
        await eventually(lambda: conn.paused or conn.complete)
        pauses += conn.paused
        chunk = await response.read()
        if not chunk:
            break
        largest = max(largest, len(chunk))
        received += chunk
    response.release()
    assert pauses >= 1
    assert len(received) == size
    assert (
        received[:4096] == bytes([0]) * 4096 and received[-4096:] == bytes([(size // 4096 - 1) % 251]) * 4096
    )
    # Reading stopped once HIGH_WATER bytes waited; at most one socket read more arrived before the pause.
    assert largest <= HIGH_WATER + 256 * 1024


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost` and its key (made with the openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    subprocess.run([*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_with_a_trusted_certificate(serve: Start, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server = await serve(answering(JSON_OK), ssl_context=server_ctx)
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = ConnectionPool(ssl_context=trusting)
    assert (await call(pool, server.origin("https", "localhost")))[2] == b'{"ok":true}'
    assert (await call(pool, server.origin("https", "localhost")))[2] == b'{"ok":true}'
    assert server.connections == 1
    # The system trust store does not know this certificate: refused, as a connection error.
    with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await call(ConnectionPool(), server.origin("https", "localhost"))


def test_origin_of() -> None:
    assert origin_of("http://127.0.0.1:8080/v1/") == Origin(
        "http", "127.0.0.1", 8080, b"127.0.0.1:8080", "/v1"
    )
    assert origin_of("https://api.openai.com/v1") == Origin(
        "https", "api.openai.com", 443, b"api.openai.com", "/v1"
    )
    assert origin_of("HTTP://[::1]:9000") == Origin("http", "::1", 9000, b"[::1]:9000", "")
    for bad, rule in (
        ("ftp://x", "http:// or https://"),
        ("127.0.0.1:80", "http:// or https://"),
        ("http://x/v1?a=1", "query"),
        ("http://user:pw@x/", "credentials"),
        ("http://x:99999/", "port"),
        ("http://x:abc/", "port"),
        ("http:///v1", "no host"),
        ("http://x/a b", "ASCII without spaces"),
    ):
        with pytest.raises(ValueError, match=rule):
            origin_of(bad)
