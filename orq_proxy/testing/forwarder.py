"""`ScriptedForwarder`: a `Forwarder` without sockets, answering each request as a test scripted it.

`UpstreamApp(targets, forwarder=ScriptedForwarder(...))` runs every layer above the connection pool for real
while the upstream is a script: the status, headers and body chunks of each answer, and where it fails
(no connection, no headers in time, death mid-body) or waits (an `asyncio.Event` the test sets, so "the
upstream is slow" never needs a sleep). Every request is recorded, and so is how each answer ended
(`released` after a complete body, `closed` when cancelled or broken).

Example:
    gate = asyncio.Event()
    forwarder = ScriptedForwarder(
        ScriptedAnswer(body=[b'{"ok":true}']),  # the first request
        ScriptedAnswer(error=UpstreamConnectError("refused")),  # the second: a 502
        ScriptedAnswer(body=[b"data: 1\\n\\n", gate, UpstreamReadError("gone")]),  # then every later one
    )
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orq_proxy.proxy.upstream import Origin, UpstreamConnectError

__all__ = ["ForwardedRequest", "ScriptedAnswer", "ScriptedForwarder", "ScriptedResponse", "Step"]

# One step of an answer: bytes are a body chunk (one `read()` each), an event is waited for, a number is
# slept for (seconds), and an exception is raised (by `request()` before the headers, by `read()` after).
Step = bytes | asyncio.Event | float | BaseException


@dataclass(frozen=True, slots=True)
class ScriptedAnswer:
    """One scripted upstream answer.

    Args:
        status: the response status.
        headers: raw (name, value) pairs, as an upstream sends them (hop-by-hop ones included if wanted).
        body: the steps after the headers: chunks, waits and at most one final exception
            (`UpstreamReadError` for death mid-body, `TimeoutError` for a read timeout).
        before: the steps before the headers: waits, then optionally an exception.
        error: raised by `request()` after `before`, instead of answering: `UpstreamConnectError` (502),
            `TimeoutError` (504) or `ValueError` (a request the forwarder refuses: 400).
    """

    status: int = 200
    headers: Sequence[tuple[bytes, bytes]] = ((b"content-type", b"application/json"),)
    body: Sequence[Step] = (b'{"ok":true}',)
    before: Sequence[Step] = ()
    error: BaseException | None = None


@dataclass(slots=True)
class ForwardedRequest:
    """What `UpstreamApp` asked the forwarder to send."""

    origin: Origin
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    connect_timeout: float
    headers_timeout: float
    read_timeout: float

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


async def _run(step: Step) -> bytes:
    """Do one step: bytes are returned, anything else is waited out or raised (then b"")."""
    if isinstance(step, bytes):
        return step
    if isinstance(step, BaseException):
        raise step
    if isinstance(step, asyncio.Event):
        await step.wait()
    else:
        await asyncio.sleep(step)
    return b""


_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


def _check_framing(target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """Refuse what `ConnectionPool` refuses (the `Forwarder` contract), so a fake upstream catches a
    layer that lets a framing header or a line break through."""
    for name, value in headers:
        if name.lower() in _FRAMING:
            raise ValueError(f"a request header sets the message framing or host: {name!r}")
        if any(c in name or c in value for c in (b"\r", b"\n")):
            raise ValueError("a request header contains a line break")
    if b"\r" in target or b"\n" in target:
        raise ValueError("the path contains a line break")


class ScriptedResponse:
    """A `ForwardedResponse` playing one `ScriptedAnswer`'s body; records how it ended.

    Attributes:
        chunks_read: body chunks handed out so far.
        released: `release()` was called (the body was read to its end).
        closed: `close()` was called (the exchange was cancelled or broke).
    """

    def __init__(self, forwarder: ScriptedForwarder, answer: ScriptedAnswer) -> None:
        self._forwarder = forwarder
        self._steps = list(answer.body)
        self.status = answer.status
        self.headers = list(answer.headers)
        self.chunks_read = 0
        self.released = False
        self.closed = False

    @property
    def ended(self) -> bool:
        """Released or closed (the first of the two counts; a second call is ignored, as in the pool)."""
        return self.released or self.closed

    @property
    def at_eof(self) -> bool:
        """No step left: the chunk just read was the last one."""
        return not self._steps

    async def read(self) -> bytes:
        while self._steps:
            data = await _run(self._steps[0])
            # Popped only once done: a cancelled wait is still pending, as on a real connection.
            self._steps.pop(0)
            if data:
                self.chunks_read += 1
                return data
        return b""

    def release(self) -> None:
        if not self.ended:
            self.released = True
            self._forwarder._idle += 1  # a complete exchange leaves its connection idle for the next request

    def close(self) -> None:
        if not self.ended:
            self.closed = True


class ScriptedForwarder:
    """A `Forwarder` that answers the n-th request with the n-th script (the last one repeats).

    Args:
        answers: `ScriptedAnswer`s, or callables making one from the `ForwardedRequest` (to answer by
            path or body). At least one.

    Attributes:
        requests: every request received, in order.
        responses: the response of every request that got its headers, in order.
        closed: `aclose()` was called (later requests raise `UpstreamConnectError`, as the pool does).

    `connection_counts()` pretends one connection per exchange: open while its answer is being read,
    idle once released (and taken by the next request).
    """

    def __init__(self, *answers: ScriptedAnswer | Callable[[ForwardedRequest], ScriptedAnswer]) -> None:
        if not answers:
            raise ValueError("ScriptedForwarder needs at least one answer")
        self._answers = answers
        self.requests: list[ForwardedRequest] = []
        self.responses: list[ScriptedResponse] = []
        self.closed = False
        self._idle = 0

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
    ) -> ScriptedResponse:
        request = ForwardedRequest(
            origin, method, target, list(headers), body, connect_timeout, headers_timeout, read_timeout
        )
        self.requests.append(request)
        if self.closed:
            raise UpstreamConnectError("the upstream connection pool is closed")
        _check_framing(target, headers)
        script = self._answers[min(len(self.requests), len(self._answers)) - 1]
        answer = script if isinstance(script, ScriptedAnswer) else script(request)
        for step in answer.before:
            await _run(step)
        if answer.error is not None:
            raise answer.error
        if self._idle:
            self._idle -= 1
        response = ScriptedResponse(self, answer)
        self.responses.append(response)
        return response

    def connection_counts(self) -> tuple[int, int]:
        in_flight = sum(not r.ended for r in self.responses)
        return in_flight + self._idle, self._idle

    async def aclose(self) -> None:
        self.closed = True
        self._idle = 0
