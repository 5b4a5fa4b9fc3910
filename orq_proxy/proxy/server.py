"""The inbound HTTP/1.1 protocol that `orq-proxy serve` and `testing.ServerThread` run: uvicorn's httptools
protocol with bounds on what a client can make the server hold before any ASGI code (and so authentication)
runs.

uvicorn's `HttpToolsProtocol` buffers a request line and headers of any size and waits for a request's
bytes forever; `LimitedHttpToolsProtocol` adds, per connection:

- `max_header_bytes`: the request line and headers together (everything before the body). They are counted
  as `data_received` hands bytes to the parser, and the parser is never fed more than the request's remaining
  allowance, so at most this much of one head is ever buffered; a head that has not ended by then gets 431.
  (A request pipelined behind another within one read starts counting at the end of the slice it began in,
  so the bound for it is twice the limit.)
- `max_headers`: header fields per request (counted as the parser reports them); 431 past it.
- `request_read_timeout`: one deadline per request, from its first byte until the end of its body. Progress
  does not extend it, so trickling a byte at a time gains nothing. When it passes: 408 if nothing of a
  response has been written, else the connection is just closed. While uvicorn has paused reading (the app
  has not yet taken the body it buffered, or a pipelined request waits for the one before it) the wait is
  the server's, not the client's: the deadline starts again.
- idle connections: uvicorn's `timeout_keep_alive` (`[server] keep_alive_timeout`) closes a connection idle
  after a response; it is also armed when a connection opens, so one that never sends a byte is closed too.

Failure policy: fail closed towards the client (a small plain-text 4xx with `Connection: close`, then
close); nothing here raises into uvicorn or the app, which sees a rejected request as a disconnect.

This relies on uvicorn internals (`parser`, `cycle`, `pipeline`, `flow`, the keep-alive timer and the parser
callbacks): pyproject pins the uvicorn range it was tested against, and tests/proxy/test_server_limits.py runs
it on real sockets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from orq_proxy.config import ServerConfig

__all__ = ["LimitedHttpToolsProtocol", "uvicorn_options"]

logger = logging.getLogger(__name__)

# Where a connection is in its current request. Bytes are counted against the head in _IDLE and _HEAD.
_IDLE, _HEAD, _BODY = 0, 1, 2


class _TooManyHeaders(Exception):
    """Raised from the parser callback to stop parsing; `data_received` answers 431."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size and count cap and a request read deadline.

    The limits are class attributes; `with_limits` makes a configured subclass (uvicorn instantiates the
    class it is given once per connection).

    Example:
        uvicorn.run(app, http=LimitedHttpToolsProtocol.with_limits(max_header_bytes=16384))
    """

    max_header_bytes: ClassVar[int] = 64 * 1024
    max_headers: ClassVar[int] = 100
    request_read_timeout: ClassVar[float] = 30.0

    @classmethod
    def with_limits(
        cls,
        *,
        max_header_bytes: int | None = None,
        max_headers: int | None = None,
        request_read_timeout: float | None = None,
    ) -> type[LimitedHttpToolsProtocol]:
        """A subclass with the given limits (the others keep this class's).

        Raises:
            ValueError: a limit that is not positive.
        """
        limits: dict[str, Any] = {
            "max_header_bytes": cls.max_header_bytes if max_header_bytes is None else max_header_bytes,
            "max_headers": cls.max_headers if max_headers is None else max_headers,
            "request_read_timeout": (
                cls.request_read_timeout if request_read_timeout is None else request_read_timeout
            ),
        }
        for name, value in limits.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        return type(cls.__name__, (cls,), limits)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._head_bytes = 0  # of the current head, fed to the parser so far
        self._too_many_headers = False
        self._deadline: float | None = None  # loop time by which the current request must have arrived
        self._deadline_timer: asyncio.TimerHandle | None = None

    # Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its idle timer only after a response: a connection that never sends a byte is held
        # forever without this.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Replaces uvicorn's, which feeds the whole read at once: the parser is fed slices no longer than the
        # current head's remaining allowance, so the limit is checked before the parser buffers past it. The
        # error handling is uvicorn's.
        self._unset_keepalive_if_required()
        if self._deadline is None:  # the first byte of a request (or of what precedes one)
            self._deadline = self.loop.time() + self.request_read_timeout
        # Usually the read fits and goes in whole (slicing bytes to its full length returns it, uncopied);
        # otherwise a memoryview is sliced, without copies.
        view = data if len(data) <= self.max_header_bytes - self._head_bytes else memoryview(data)
        while view:
            room = self.max_header_bytes - self._head_bytes
            piece, view = view[:room], view[room:]
            if self._phase != _BODY:
                self._head_bytes += len(piece)  # callbacks reset it when the head ends inside the piece
            if not self._feed(piece):
                return
            if self._phase != _BODY and self._head_bytes >= self.max_header_bytes:
                self._reject(431, "Request header fields too large")
                return
        # Armed only for a request still incomplete after this read: one that arrives whole costs no timer.
        if self._deadline is not None and self._deadline_timer is None:
            self._deadline_timer = self.loop.call_at(self._deadline, self._deadline_passed)

    def _feed(self, piece: bytes | memoryview) -> bool:
        """Feed the parser; False when the connection is done with (rejected, closed or upgraded)."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserError:
            if self._too_many_headers:
                self._reject(431, "Too many request header fields")
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._cancel_deadline()  # the transport now belongs to the WebSocket protocol
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False  # like uvicorn, what follows the upgrade in this read is not parsed
        return not self.transport.is_closing()

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEAD
        if self._deadline is None:  # pipelined behind a request that ended earlier in the same read
            self._deadline = self.loop.time() + self.request_read_timeout

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_headers:  # uvicorn's list of this request's headers so far
            self._too_many_headers = True
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = _IDLE
        self._head_bytes = 0
        self._deadline = None
        if self._deadline_timer is not None:
            self._cancel_deadline()

    # Deadline and rejection

    def _cancel_deadline(self) -> None:
        self._deadline = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # uvicorn is not reading: the client is not the one keeping us waiting
            self._deadline = self.loop.time() + self.request_read_timeout
            self._deadline_timer = self.loop.call_at(self._deadline, self._deadline_passed)
            return
        self._reject(408, "Request timeout")

    def _reject(self, status: int, message: str) -> None:
        """Answer `status` if no response is being written on this connection, then close it."""
        cycle = self.cycle
        if self._phase == _BODY:  # `cycle` is this request's (None only before a WebSocket upgrade)
            answer = not self.pipeline and (cycle is None or not cycle.response_started)
        elif self._phase == _HEAD or status == 431:  # `cycle` is the previous request's, if any
            answer = cycle is None or cycle.response_complete
        else:  # a deadline passed on an idle connection (blank lines only): nothing to answer
            answer = False
        if cycle is not None and not cycle.response_complete:
            # What uvicorn does on a lost connection: the app's receive() says disconnect and its sends are
            # dropped (done here too, so nothing it sends lands after our answer).
            cycle.disconnected = True
            cycle.message_event.set()
        if answer:
            body = message.encode("ascii")
            content = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend(
                [
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
            self.transport.write(b"".join(content))
        # Debug: a client controls how often this happens, so it must not flood the log.
        logger.debug("%s from %s (answered: %s)", status, self.client, answer)
        self._cancel_deadline()
        self.transport.close()


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """The `uvicorn.Config` keyword arguments that apply `[server]`'s connection limits.

    `proxy_headers` is off: uvicorn would otherwise take a loopback client's `X-Forwarded-For` as the
    client's address, and the forwarding headers are `[server] trust_forwarded_headers`' to trust or not.
    """
    return {
        "proxy_headers": False,
        "http": LimitedHttpToolsProtocol.with_limits(
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
            request_read_timeout=server.request_read_timeout,
        ),
        "timeout_keep_alive": server.keep_alive_timeout,
    }
