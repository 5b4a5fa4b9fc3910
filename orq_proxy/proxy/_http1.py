"""A lean HTTP/1.1 client for forwarding: pooled keep-alive connections, httptools for parsing.

A proxy forwards bytes it already has: a complete request body, raw header pairs, a path that is already
percent-encoded. A general client (aiohttp) rebuilds all of that into its own models (URL objects, header
multidicts, payload writers, cookie handling, a stream reader) and then takes it apart again; measured here
(`benchmarks/upstream_client.py`, 64 in flight) that costs ~67 µs of CPU per request, against ~31 µs for
this pool of asyncio transports plus the httptools parser. So this module does only what forwarding needs:

- `ConnectionPool.request()` writes the request line, the headers and the body in one write on a pooled
  connection (a new one when none is idle), and returns an `UpstreamResponse` once the status line and
  headers have arrived.
- `UpstreamResponse.read()` returns the body as it arrives: what is buffered, joined, or waits for more
  (`read_timeout` bounds every wait); `b""` at the end. The connection stops reading from the socket while
  more than `HIGH_WATER` bytes wait to be read (a slow client slows the upstream, memory stays bounded).
- `release()` returns a fully read connection to the pool when the upstream allows keep-alive; `close()`
  drops it (cancelled or broken exchange, which also stops the upstream's work).

Idle connections live at most `keepalive_timeout` seconds (below the 5 s common on servers), and one the
upstream has closed while idle is noticed (the transport reports it) and never reused, so a request is
never written to a dying connection. Requests are not retried: a POST cannot safely be sent twice.

Errors: `UpstreamConnectError` (refused, reset, DNS, TLS, or the connection died before the headers),
`TimeoutError` (connect, headers or a read took too long), `UpstreamReadError` (the connection failed
or the response was malformed after the headers).

Private to `orq_proxy.proxy`: `UpstreamApp` uses the pool through its `Forwarder` protocol, and `upstream.py`
re-exports what the rest of the package needs (`Origin`, `origin_of`, the two errors).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import httptools

__all__ = [
    "HIGH_WATER",
    "ConnectionPool",
    "Origin",
    "UpstreamConnectError",
    "UpstreamReadError",
    "UpstreamResponse",
    "origin_of",
]

# Bytes buffered from the socket before reading pauses (it resumes once the reader has taken them).
HIGH_WATER = 256 * 1024
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class UpstreamConnectError(ConnectionError):
    """No response headers: the connection could not be made or died before the upstream answered."""


class UpstreamReadError(ConnectionError):
    """The upstream failed after its headers: connection lost mid-body or a malformed response."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where connections go: scheme, host and port, plus the `Host` header value and the base path."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    base_path: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def origin_of(base_url: str) -> Origin:
    """`http://127.0.0.1:8080/v1` -> Origin("http", "127.0.0.1", 8080, b"127.0.0.1:8080", "/v1").

    Raises:
        ValueError: not an absolute http(s) URL, or a query or fragment in it.
    """
    scheme, sep, rest = base_url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise ValueError(f"upstream base_url must start with http:// or https://, got {base_url!r}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"upstream base_url must not have a query or fragment, got {base_url!r}")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise ValueError(f"upstream base_url must not carry credentials, got {base_url!r}")
    default_port = 443 if scheme == "https" else 80
    if authority.startswith("["):  # [IPv6]:port
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"upstream base_url has an unclosed IPv6 address: {base_url!r}")
        host, port_text = authority[1:end], authority[end + 1 :].removeprefix(":")
    else:
        host, _, port_text = authority.partition(":")
    if not host:
        raise ValueError(f"upstream base_url has no host: {base_url!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"upstream base_url has an invalid port: {base_url!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"upstream base_url has an invalid port: {base_url!r}")
    if any(c in base_url for c in "\r\n\t ") or not base_url.isascii():
        raise ValueError(f"upstream base_url must be ASCII without spaces, got {base_url!r}")
    host_header = authority if port_text else host
    if ":" in host and not authority.startswith("["):
        raise ValueError(f"upstream base_url: an IPv6 host must be in brackets, got {base_url!r}")
    return Origin(scheme, host, port, host_header.encode("ascii"), (slash + path).rstrip("/"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the state of the exchange running on it (one at a time)."""

    def __init__(self, pool: ConnectionPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = True  # holds one of the pool's `limit` slots until discarded
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.headers_done = False
        self.complete = False
        self.error: BaseException | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.head_request = False
        self.chunked = False
        self.keep_alive = False  # read when the message completes (the parser forgets it afterwards)

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.complete or self.error is not None:
            # Bytes after the end of the response (or while idle): the connection cannot be trusted.
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # Not HTTP/1.1 as we speak it (a TLS port spoken to in clear, another protocol, an upgrade).
            message = f"malformed response from upstream: {str(exc) or type(exc).__name__}"
            self._fail(UpstreamReadError(message) if self.headers_done else UpstreamConnectError(message))
            return
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        # Any bytes count as progress (part of the headers, a chunk's framing): a waiter re-arms its timer.
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete or self.error is not None:
            return
        if self.headers_done and self.content_length is None and not self.chunked and exc is None:
            # A body delimited by the end of the connection (no length, not chunked): a clean close is its
            # end (a reset is not: the body may be cut short).
            self.complete = True
            self._wake()
            return
        reason = f": {exc}" if exc else ""
        if self.headers_done:
            self._fail(UpstreamReadError(f"upstream closed the connection mid-response{reason}"))
        else:
            self._fail(UpstreamConnectError(f"upstream closed the connection before answering{reason}"))

    # -- httptools callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:  # a second response in the same read: never ours, and the connection is suspect
            self.closed = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:  # a second response in the same read: never ours, and the connection is suspect
            self.closed = True
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.headers = []
            return
        self.status = status
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                try:
                    self.content_length = int(value)
                except ValueError:
                    self.content_length = None
            elif lowered == b"transfer-encoding":
                # Chunked framing only when chunked is the last coding; otherwise the body runs to the close.
                self.chunked = value.lower().rstrip().endswith(b"chunked")
        self.headers_done = True
        if self.head_request:
            # No body follows (a HEAD answer carries the length of a body it does not send). The parser would
            # wait for one, so the exchange ends here and the connection is not reused. (204 and 304 need
            # nothing of the kind: the parser knows they have no body.)
            self.complete = True
            self.closed = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.closed = True
            return
        self.chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done and not self.complete:
            self.keep_alive = self.parser.should_keep_alive()
            self.complete = True
            self._wake()

    # -- helpers -------------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.abort()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def wait(self, seconds: float, what: str) -> None:
        """Wait for the parser to make progress (a wake-up, an error, or `seconds` without either)."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(seconds, _expire, waiter, what)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _expire(waiter: asyncio.Future[None], what: str) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(what))


class UpstreamResponse:
    """The status and headers of an upstream answer, and its body to `read()`."""

    __slots__ = ("_conn", "_done", "_read_timeout", "headers", "status")

    def __init__(self, conn: _Connection, read_timeout: float) -> None:
        self._conn = conn
        self._read_timeout = read_timeout
        self._done = False
        self.status = conn.status
        self.headers = conn.headers  # raw (name, value) pairs as received

    @property
    def at_eof(self) -> bool:
        """True once the whole body has arrived and been read."""
        conn = self._conn
        return conn.complete and not conn.chunks

    async def read(self) -> bytes:
        """The next body bytes (everything buffered, joined), or b"" at the end.

        Raises:
            TimeoutError: no bytes within `read_timeout`.
            UpstreamReadError: the connection failed or the response was malformed.
        """
        conn = self._conn
        while not conn.chunks:
            if conn.complete:
                return b""
            await conn.wait(self._read_timeout, "upstream sent nothing within read_timeout")
        chunks = conn.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        if chunks:
            chunks.clear()
        conn.buffered = 0
        if conn.paused and conn.transport is not None:
            conn.paused = False
            conn.transport.resume_reading()
        return data

    def release(self) -> None:
        """Done with a fully read response: the connection goes back to the pool when it can be reused."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.complete and conn.keep_alive and not conn.chunks and not conn.closed:
            conn.pool._checkin(conn)
        else:
            conn.pool._discard(conn)

    def close(self) -> None:
        """Drop the connection (the exchange was cancelled or broken); stops the upstream's work on it."""
        if self._done:
            return
        self._done = True
        self._conn.abort()
        self._conn.pool._discard(self._conn)


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to any number of origins.

    Args:
        limit: most connections open at once, over all origins; a request waits for a free one.
        keepalive_timeout: seconds an idle connection may be reused for.
        ssl_context: for https origins (default: the system's trust store, hostname checked).
        clock: monotonic seconds, for how long a connection has been idle (tests pass a fake one). The
            timeouts of an exchange are the event loop's timers and follow the loop's own clock.
    """

    def __init__(
        self,
        *,
        limit: int = 1000,
        keepalive_timeout: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.keepalive_timeout = keepalive_timeout
        self._ssl_context = ssl_context
        self._clock = clock
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    @property
    def open_connections(self) -> int:
        return self._open

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def connection_counts(self) -> tuple[int, int]:
        """(open, idle in the pool): the `Forwarder`'s figures for `/metrics`."""
        return self._open, self.idle_connections()

    async def request(
        self,
        origin: Origin,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        connect_timeout: float,
        headers_timeout: float,
        read_timeout: float,
    ) -> UpstreamResponse:
        """Send a request; returns once the response headers are in.

        `target` is the request-target (path and query, already percent-encoded); `headers` must not
        hold `host`, `content-length`, `transfer-encoding` or `connection` (set here).

        Raises:
            UpstreamConnectError: no connection, or it died before the headers.
            TimeoutError: connecting or waiting for the headers took too long.
            ValueError: a header or the target would break the request framing (CR, LF).
        """
        if self._closed:
            raise UpstreamConnectError("the upstream connection pool is closed")
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        lines = 3 + len(headers)  # request line, host, headers, the blank line
        lengths = 0
        if body or method not in _NO_BODY_METHODS:
            parts += (b"content-length: ", str(len(body)).encode("ascii"), b"\r\n")
            lines += 1
            lengths = 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # Every line ends in CRLF and nothing else may: a CR or LF inside a value would split the request.
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("a request header or the path contains a line break")
        # The framing headers are ours alone (a second length or a transfer coding would let a request
        # smuggle another one past the upstream's parser).
        lowered = head.lower()
        if b"\ntransfer-encoding:" in lowered or lowered.count(b"\ncontent-length:") != lengths:
            raise ValueError("a request header sets the message framing (content-length, transfer-encoding)")
        if lowered.count(b"\nhost:") > 1 or b"\nconnection:" in lowered:
            raise ValueError("a request header repeats host or sets connection")

        conn = await self._checkout(origin, connect_timeout)
        conn.head_request = method == "HEAD"
        try:
            assert conn.transport is not None
            conn.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                conn.transport.write(body)
            if not conn.headers_done:
                # `headers_timeout` bounds the whole wait for the headers, `read_timeout` each wait for data.
                # The deadline is on the loop's clock, not `self._clock`: it sizes the loop's timers.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + headers_timeout
                while not conn.headers_done:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise TimeoutError("upstream sent no response headers within headers_timeout")
                    what = "headers_timeout" if left <= read_timeout else "read_timeout"
                    await conn.wait(
                        min(left, read_timeout), f"upstream sent no response headers within {what}"
                    )
        except BaseException:
            conn.abort()
            self._discard(conn)
            raise
        return UpstreamResponse(conn, read_timeout)

    # -- the pool -------------------------------------------------------------------------------------
    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if idle:
            expired_before = self._clock() - self.keepalive_timeout
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to be closing
                if not conn.closed and conn.idle_since > expired_before:
                    conn._reset()
                    return conn
                self._discard(conn)
        return None

    def _close_one_idle(self) -> bool:
        """Free a slot held by an idle connection (of any origin); False when none is idle."""
        for idle in self._idle.values():
            if idle:
                self._discard(idle.pop(0))
                return True
        return False

    async def _checkout(self, origin: Origin, connect_timeout: float) -> _Connection:
        key = origin.key
        waited = False
        while True:
            if self._closed:
                raise UpstreamConnectError("the upstream connection pool is closed")
            conn = self._take_idle(key)
            if conn is not None:
                return conn
            if self._open < self.limit or self._close_one_idle():
                break
            waiter = asyncio.get_running_loop().create_future()
            if waited:  # woken, but another request took the slot first: keep our place at the front
                self._slot_waiters.appendleft(waiter)
            else:
                self._slot_waiters.append(waiter)
            waited = True
            try:
                await waiter  # a connection was returned or discarded
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_slot()  # pass the wake-up we were given on
                raise
        self._open += 1
        try:
            return await self._connect(origin, key, connect_timeout)
        except BaseException:
            self._open -= 1
            self._wake_slot()
            raise

    async def _connect(
        self, origin: Origin, key: tuple[str, str, int], connect_timeout: float
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = origin.scheme == "https"
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key),
                    origin.host,
                    origin.port,
                    ssl=self.ssl_context if tls else None,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise TimeoutError(
                f"connecting to {origin.host}:{origin.port} took over {connect_timeout:g} s"
            ) from None
        except OSError as exc:  # refused, reset, DNS (gaierror), TLS (SSLError)
            raise UpstreamConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        return conn

    def _checkin(self, conn: _Connection) -> None:
        if self._closed:
            self._discard(conn)
            return
        now = self._clock()
        conn.idle_since = now
        idle = self._idle.setdefault(conn.key, [])
        # The oldest idle connections are at the front: drop those past their time while we are here.
        expired_before = now - self.keepalive_timeout
        while idle and (idle[0].closed or idle[0].idle_since <= expired_before):
            self._discard(idle.pop(0))
        idle.append(conn)
        self._wake_slot()  # a request waiting for a slot may take this connection

    def _discard(self, conn: _Connection) -> None:
        """Close `conn` (if it is not already) and give its slot back, once."""
        conn.closed = True
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.close()
        if conn.counted:
            conn.counted = False
            self._open -= 1
            self._wake_slot()

    def _wake_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self._closed = True
        while self._slot_waiters:  # they raise "closed" when they wake
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        for idle in self._idle.values():
            while idle:
                self._discard(idle.pop())
        self._idle.clear()
