"""`PipelinedScripts`: the budget gate's two Lua calls per request on one pipelined Redis connection.

redis-py's asyncio client takes a pooled connection per command and runs each through its retry and
timeout wrappers and a Python encoder: measured here under uvloop, 50 us of CPU per `EVALSHA` sequentially
against 13 us for the same bytes on a bare stream, and about 120 us each with 64 requests in flight, which
made Redis counters cost 240 us per request (`benchmarks/compare.py`, orq-pg). This client keeps one
connection, writes each command as soon as it is called, and matches replies in order (Redis answers a
connection's commands in the order it got them), parsing them with hiredis (Redis's own C parser).

It carries only what the hot path sends (`EVALSHA`, `EVAL` after a `NOSCRIPT`), over TCP or a Unix socket
without TLS; everything else (rebuilds, usage reads, the generation marker) stays on redis-py. The caller
encodes each command's arguments (`bulks`; `RedisCounters` keeps each budget's encoded once) and `run` adds
the script's head (`Script`, encoded once), so a call costs one `%` format, one future and one coroutine
here. For a `rediss://` URL or a missing hiredis, `PooledScripts` sends the same encoded commands on
redis-py's pool.

Failure policy (the gate fails closed, so every error raises): connecting takes at most `connect_timeout`;
a reply that does not come within `socket_timeout` (checked every 0.1 s by one watchdog per connection)
closes the connection (later replies could no longer be matched) and fails every command waiting on it;
a lost connection fails them too. The next call connects again. Errors are `TimeoutError` and `ConnectionError`, which the counters turn into 503s.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
from typing import Any, Final, cast

__all__ = ["PipelinedScripts", "PooledScripts", "Script", "bulk", "bulks", "pipelined_scripts"]

_CRLF: Final = b"\r\n"


def bulk(raw: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


def bulks(*parts: bytes | str | int | float) -> bytes:
    """RESP bulk strings for `parts` (text as UTF-8, numbers as Python prints them)."""
    out = []
    for part in parts:
        if part.__class__ is bytes:
            raw = part
        elif part.__class__ is str:
            raw = part.encode()
        else:
            raw = str(part).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


def _command(*parts: bytes | str | int | float) -> bytes:
    """One command in RESP: an array of bulk strings."""
    return b"*%d\r\n%b" % (len(parts), bulks(*parts))


class Script:
    """A Lua script with its `EVALSHA` and `EVAL` command heads encoded once.

    A command is `*<count + 3>`, a head, then `count` bulk strings (`numkeys`, the keys, the arguments)
    that the caller encodes (`bulks`, or bytes it keeps encoded between calls).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # (what SCRIPT LOAD answers)
        self.evalsha_head = bulks("EVALSHA", self.sha)
        self.eval_head = bulks("EVAL", source)


class _ReplyError(Exception):
    """An error reply (`-ERR ...`): the command reached Redis and failed there."""


_WATCH_EVERY: Final = 0.1  # seconds between checks of the oldest command's wait (the timeout's precision)


class _Protocol(asyncio.Protocol):
    """One connection: commands waiting for replies in order, and a watchdog on the oldest one's wait
    (one timer per connection rather than one per command)."""

    def __init__(self, reader: Any, timeout: float) -> None:
        self.reader = reader
        self.timeout = timeout
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []
        # Made by the loop it serves. (Kept: `get_running_loop()` costs a getpid syscall a call on 3.11.)
        self._loop = asyncio.get_running_loop()

    def send(self, command: bytes) -> asyncio.Future[Any]:
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(ConnectionError("connection to Redis closed"))
            return future
        self.waiting.append(future)
        self.sent_at.append(loop.time())
        # Commands sent in the same turn of the event loop go out in one write (one syscall for many).
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(command)
        if self._watchdog is None:
            self._watchdog = loop.call_later(_WATCH_EVERY, self._watch)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(out))

    def _watch(self) -> None:
        self._watchdog = None
        if self.closed or not self.sent_at:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self.sent_at[0] > self.timeout:
            # Later replies could no longer be matched to their commands: start over.
            self.fail(TimeoutError(f"no reply from Redis within {self.timeout} s"))
            return
        self._watchdog = loop.call_later(_WATCH_EVERY, self._watch)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not an asyncio.Transport subclass)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except Exception as exc:  # a protocol error: nothing after it can be trusted
                self.fail(ConnectionError(f"Redis sent a reply that does not parse: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(ConnectionError("Redis sent a reply with no command waiting for it"))
                return
            future = self.waiting.popleft()
            self.sent_at.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_waiting(ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def fail(self, exc: BaseException) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail_waiting(exc)

    def _fail_waiting(self, exc: BaseException) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.sent_at.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)


class PipelinedScripts:
    """Runs Lua scripts by SHA on one pipelined connection (see the module docstring).

    Args:
        host, port, path: a TCP address, or a Unix socket `path`.
        db, username, password: sent (SELECT, AUTH) when a connection opens.
        socket_timeout: seconds a reply may take.
        connect_timeout: seconds to connect (and authenticate).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 2.0,
    ) -> None:
        import hiredis

        self._reader_class = hiredis.Reader
        self._reply_error = hiredis.ReplyError
        self.host, self.port, self.path, self.db = host, port, path, db
        self.username, self.password = username, password
        self.socket_timeout, self.connect_timeout = socket_timeout, connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and not protocol.closed:
                return protocol
            async with asyncio.timeout(self.connect_timeout):
                protocol = await self._open()
            self._protocol = protocol
            return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()

        def factory() -> _Protocol:
            return _Protocol(self._reader_class(replyError=_ReplyError), self.socket_timeout)

        if self.path is not None:
            _, protocol = await loop.create_unix_connection(factory, self.path)
        else:
            _, protocol = await loop.create_connection(factory, self.host, self.port)
        setup: list[tuple[bytes | str | int, ...]] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        try:
            for command in setup:
                await self._send(protocol, _command(*command))
        except BaseException:
            protocol.fail(ConnectionError("closed while setting up"))
            raise
        return protocol

    async def _send(self, protocol: _Protocol, command: bytes) -> Any:
        reply = await protocol.send(command)  # (the connection's watchdog enforces socket_timeout)
        if isinstance(reply, _ReplyError):
            raise reply
        return reply

    async def run(self, script: Script, count: int, body: bytes) -> Any:
        """The script's reply: `EVALSHA` with `body` (`count` bulk strings: numkeys, keys, arguments), then
        `EVAL` with its source when Redis lost its script cache.

        The hot path: one coroutine and one future per call (no per-call connection lookup or encoder).

        Raises:
            TimeoutError, ConnectionError: Redis cannot answer.
            redis.exceptions.ResponseError: the script failed inside Redis.
        """
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connection()
        reply = await protocol.send(b"*%d\r\n%b%b" % (count + 2, script.evalsha_head, body))
        if reply.__class__ is _ReplyError:
            if not str(reply).startswith("NOSCRIPT"):
                raise _response_error(reply)
            # A restarted Redis forgot the script: EVAL sends it and caches it again.
            reply = await protocol.send(b"*%d\r\n%b%b" % (count + 2, script.eval_head, body))
            if reply.__class__ is _ReplyError:
                raise _response_error(reply)
        return reply

    def submit(self, script: Script, count: int, body: bytes) -> asyncio.Future[Any] | None:
        """`run` without a coroutine: the command is written now and the returned future gets the reply (or
        the error `run` would raise), `EVAL` following a `NOSCRIPT` by callback. None, with nothing sent,
        when the connection is not open (the caller then awaits `run`, which connects)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return None
        first = protocol.send(b"*%d\r\n%b%b" % (count + 2, script.evalsha_head, body))
        out: asyncio.Future[Any] = first.get_loop().create_future()

        def evaluated(future: asyncio.Future[Any]) -> None:
            if out.done():
                return
            exc = future.exception()
            if exc is not None:
                out.set_exception(exc)
                return
            reply = future.result()
            if reply.__class__ is _ReplyError:
                out.set_exception(_response_error(reply))
            else:
                out.set_result(reply)

        def replied(future: asyncio.Future[Any]) -> None:
            if out.done():
                return
            exc = future.exception()
            if exc is None:
                reply = future.result()
                if reply.__class__ is not _ReplyError:
                    out.set_result(reply)
                    return
                if str(reply).startswith("NOSCRIPT"):  # a restarted Redis forgot the script: send it
                    protocol.send(b"*%d\r\n%b%b" % (count + 2, script.eval_head, body)).add_done_callback(
                        evaluated
                    )
                    return
                exc = _response_error(reply)
            out.set_exception(exc)

        first.add_done_callback(replied)
        return out

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


def _response_error(exc: _ReplyError) -> Exception:
    from redis.exceptions import ResponseError

    return ResponseError(str(exc))


class PooledScripts:
    """`run` as `PipelinedScripts` has it, on redis-py's pool (a connection per call): for what the pipelined
    client does not serve (TLS, or hiredis missing). The same encoded commands go out, so the counters have
    one argument layout whichever client carries it.

    Args:
        pool: a `redis.asyncio.ConnectionPool` (its timeouts apply).
    """

    def __init__(self, pool: Any) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import NoScriptError, ResponseError

        self.pool = pool
        self._no_script, self._response_error = NoScriptError, ResponseError
        self._connection_error = RedisConnectionError
        # redis-py 5 wants a command name here; 8 warns when it gets one
        wants = inspect.signature(pool.get_connection).parameters.get("command_name")
        self._get_args = (
            ("EVALSHA",) if wants is not None and wants.default is inspect.Parameter.empty else ()
        )

    async def run(self, script: Script, count: int, body: bytes) -> Any:
        """See `PipelinedScripts.run`. A closed connection (a pooled one that a Redis restart cut) is tried
        once more on a new one, as `redis_counters_from_url`'s client retries; a timeout is not retried."""
        connection = await self.pool.get_connection(*self._get_args)
        try:
            try:
                return await self._run(connection, script, count, body)
            except self._connection_error:
                await connection.disconnect()
                return await self._run(connection, script, count, body)  # (it connects again)
        except BaseException as exc:
            if not isinstance(exc, self._response_error):  # the stream may be out of step: start over
                await connection.disconnect()
            raise
        finally:
            await self.pool.release(connection)

    async def _run(self, connection: Any, script: Script, count: int, body: bytes) -> Any:
        try:
            return await self._call(connection, b"*%d\r\n%b%b" % (count + 2, script.evalsha_head, body))
        except self._no_script:  # a restarted Redis forgot the script: EVAL sends it and caches it again
            return await self._call(connection, b"*%d\r\n%b%b" % (count + 2, script.eval_head, body))

    @staticmethod
    async def _call(connection: Any, command: bytes) -> Any:
        await connection.send_packed_command(command)
        reply = await connection.read_response()
        if isinstance(reply, Exception):  # (a script's error reply inside a reply array)
            raise reply
        return reply

    async def aclose(self) -> None:
        return None  # the pool is the client's; closing the client closes it


def pipelined_scripts(connection_kwargs: dict[str, Any], *, tls: bool) -> PipelinedScripts | None:
    """A `PipelinedScripts` for what a redis-py pool connects to, or None when it cannot serve it (TLS, or
    hiredis missing): the caller then keeps redis-py on the hot path."""
    if tls:
        return None
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return None
    return PipelinedScripts(
        host=connection_kwargs.get("host", "127.0.0.1"),
        port=int(connection_kwargs.get("port", 6379)),
        path=connection_kwargs.get("path"),
        db=int(connection_kwargs.get("db", 0) or 0),
        username=connection_kwargs.get("username"),
        password=connection_kwargs.get("password"),
        socket_timeout=float(connection_kwargs.get("socket_timeout") or 2.0),
        connect_timeout=float(connection_kwargs.get("socket_connect_timeout") or 2.0),
    )
