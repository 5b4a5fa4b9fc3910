"""`UpstreamApp`: the terminal ASGI app that forwards a request to its upstream and streams the answer back.

One pooled `aiohttp.ClientSession`, used directly (docs/architecture.md, "Forwarding", says why not httpx on
top of it). Response bytes go to the client chunk by chunk as they arrive; nothing is buffered.

Failures, in OpenAI's error shape: upstream unreachable -> 502; no response headers within the upstream's
`headers_timeout` -> 504; upstream 4xx/5xx pass through unchanged. A client that disconnects cancels the
upstream request. An upstream that dies mid-stream aborts the client connection (so the client sees a
truncated response, not a clean end) and raises `UpstreamStreamError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, quote_from_bytes, unquote

import aiohttp
import yarl
from starlette.types import Message, Receive, Scope, Send

from orq_proxy.context import RequestContext, get_context
from orq_proxy.errors import openai_error

__all__ = ["WATCH_AFTER", "UpstreamApp", "UpstreamStreamError", "UpstreamTarget", "targets_from_config"]

logger = logging.getLogger(__name__)

# Request headers never forwarded: hop-by-hop (RFC 9110 §7.6.1), recomputed ones, the client's
# credentials for this proxy, and orq's own headers.
_DROP_REQUEST = frozenset(
    {
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"authorization",
        b"api-key",
        b"x-api-key",
        b"accept-encoding",
        b"expect",
    }
)
# aiohttp adds these unless told not to; the client's own values (if any) are forwarded instead.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"server",
        b"date",
    }
)


# Characters forwarded as they are in a path / query string (RFC 3986 pchar and query, plus `%` so the
# client's own escapes are kept); everything else, space and control characters included, is escaped.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


# Seconds a request runs before its client-disconnect watcher starts (see UpstreamApp.__call__).
WATCH_AFTER = 0.05


class UpstreamStreamError(Exception):
    """The upstream failed after the response had started; the client connection is aborted."""


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where one provider's requests go."""

    base_url: str
    api_key: str | None = None
    connect_timeout: float = 10.0
    headers_timeout: float = 600.0
    read_timeout: float = 600.0


def _upstream_failure(exc: BaseException) -> tuple[int, str]:
    """Map a failure before the response headers to (status, message): too slow is 504, anything
    else (refused, reset, DNS, TLS) is 502."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return 504, "upstream timed out before sending response headers"
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ClientOSError):
        return 502, f"upstream unreachable: {exc}"
    return 502, f"upstream connection failed: {exc or type(exc).__name__}"


class UpstreamApp:
    """Forwards proxied requests to `targets[ctx.provider]`.

    Args:
        targets: provider name -> `UpstreamTarget`.
        max_connections: connection pool size across all upstreams.

    The client session is created lazily on first use (or by `startup()` from a lifespan) and closed by
    `aclose()`.
    """

    def __init__(self, targets: Mapping[str, UpstreamTarget], *, max_connections: int = 1000) -> None:
        if not targets:
            raise ValueError("at least one upstream target is needed")
        self.targets = dict(targets)
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # aiohttp's sock_read bounds every wait for data, the headers included; the headers get their own
        # (usually equal) bound from asyncio.timeout in _forward.
        self._timeouts = {
            name: aiohttp.ClientTimeout(total=None, sock_connect=t.connect_timeout, sock_read=t.read_timeout)
            for name, t in self.targets.items()
        }
        self._auth = {
            name: ("authorization", f"Bearer {t.api_key}") if t.api_key else None
            for name, t in self.targets.items()
        }

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Idle connections are dropped after 4 s, before the 5 s keep-alive timeout common on servers
            # (uvicorn's default): reusing a connection the upstream is closing fails the request with
            # "server disconnected", and a POST cannot safely be retried.
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=4.0)
            # No cookie jar: a proxy must not keep one client's upstream cookies for the next client.
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
            )
        return self._session

    async def startup(self) -> None:
        _ = self.session

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # pragma: no cover - the dispatcher only sends http here
            return
        ctx = get_context(scope)
        provider = ctx.provider
        if provider is None or provider not in self.targets:
            response = openai_error(502, f"no upstream configured for provider {provider!r}")
            await response(scope, receive, send)
            return

        task = asyncio.current_task()
        if task is None:  # pragma: no cover - ASGI servers always run apps in a task
            raise RuntimeError("UpstreamApp must run inside an asyncio task")
        # Set just before the last body message: a disconnect seen after it is the normal end of the
        # exchange (servers report "disconnect" once the response is complete), not a client leaving.
        finishing = [False]

        async def cancel_on_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finishing[0]:
                        ctx.client_disconnected = True
                        task.cancel()
                    return

        # The watcher is a task, and most answers are done in a few milliseconds: it only starts once a
        # request has been running for WATCH_AFTER seconds (a timer handle costs far less than a task), so
        # a disconnect is noticed at most that much later, and fast requests never pay for it.
        watcher: asyncio.Task[None] | None = None

        def start_watcher() -> None:
            nonlocal watcher
            if not finishing[0]:
                watcher = asyncio.create_task(cancel_on_disconnect())

        timer = asyncio.get_running_loop().call_later(WATCH_AFTER, start_watcher)
        try:
            await self._forward(ctx, scope, provider, send, finishing)
        except asyncio.CancelledError:
            # Our own cancellation on client disconnect ends the request quietly; any other propagates.
            if ctx.client_disconnected and task.uncancel() == 0:
                return
            raise
        finally:
            finishing[0] = True
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    async def _forward(
        self, ctx: RequestContext, scope: Scope, provider: str, send: Send, finishing: list[bool]
    ) -> None:
        target = self.targets[provider]
        url = target.base_url + _upstream_path(scope, ctx)
        query: bytes = scope.get("query_string", b"")
        if query:
            url += "?" + quote_from_bytes(query, safe=_QUERY_SAFE)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in _DROP_REQUEST and not k.startswith(b"x-orq-")
        ]
        headers.append(("accept-encoding", "identity"))
        auth = self._auth[provider]
        if auth is not None:
            headers.append(auth)
        content = ctx.raw_body
        if ctx.body_changed and ctx.body is not None:
            content = _serialize(ctx.body)
        session = self.session
        try:
            request = session.request(
                ctx.method,
                yarl.URL(url, encoded=True),
                headers=headers,
                data=content or None,
                allow_redirects=False,
                timeout=self._timeouts[provider],
                skip_auto_headers=_SKIP_AUTO_HEADERS,
            )
            if target.headers_timeout < target.read_timeout:
                async with asyncio.timeout(target.headers_timeout):
                    response = await request
            else:  # aiohttp's sock_read already bounds the wait for the headers: no extra timer
                response = await request
        except (TimeoutError, aiohttp.ClientError) as exc:
            status, message = _upstream_failure(exc)
            ctx.upstream_error = message
            ctx.status_code = status
            logger.warning("request %s: %s", ctx.request_id, message)
            finishing[0] = True
            await openai_error(status, message, code="upstream_error")(scope, _noop_receive, send)
            return

        complete = False
        try:
            ctx.status_code = response.status
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": _response_headers(response.raw_headers),
                }
            )
            # With a known length, the chunk that completes the body is sent as the last message, which
            # saves the server a separate empty write per response.
            remaining = response.content_length
            try:
                async for chunk in response.content.iter_any():
                    if remaining is not None:
                        remaining -= len(chunk)
                        if remaining <= 0:
                            complete = finishing[0] = True
                            await send({"type": "http.response.body", "body": chunk, "more_body": False})
                            break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (TimeoutError, aiohttp.ClientError) as exc:
                ctx.upstream_error = f"upstream failed mid-response: {exc or type(exc).__name__}"
                logger.warning("request %s: %s", ctx.request_id, ctx.upstream_error)
                raise UpstreamStreamError(ctx.upstream_error) from exc
            if not complete:
                complete = finishing[0] = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if complete:
                response.release()  # fully read: the connection goes back to the pool
            else:
                response.close()  # cancelled or broken: drop the connection, which stops the upstream


def _upstream_path(scope: Scope, ctx: RequestContext) -> str:
    """The path to forward, percent-encoded: the client's own bytes (`raw_path`) below the surface prefix
    when they line up with the decoded path, else the decoded path re-encoded. Either way nothing that
    could end or split the request line (space, CR, LF, NUL, non-ASCII) reaches the upstream unescaped."""
    raw: bytes | None = scope.get("raw_path")
    prefix = (scope.get("root_path", "") + ctx.surface).encode("utf-8")
    if raw is not None and raw.startswith(prefix):
        rest = raw[len(prefix) :] or b"/"
        # Decoded as servers decode `path` (uvicorn: unquote, UTF-8 with replacement characters).
        if rest[:1] == b"/" and unquote(rest.decode("latin-1")) == ctx.path:
            return quote_from_bytes(rest, safe=_PATH_SAFE)
    return quote(ctx.path, safe=_PATH_SAFE)


# Built once (`json.dumps` with options builds an encoder per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _serialize(body: dict[str, object]) -> bytes:
    """A changed body as compact JSON; UTF-8 where possible, else with `\\u` escapes (never raises on text)."""
    try:
        return _ENCODER.encode(body).encode()
    except UnicodeEncodeError:  # an unpaired surrogate (the request layer refuses these; belt and braces)
        return json.dumps(body, separators=(",", ":")).encode()


def _response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers minus hop-by-hop ones; the upstream's own request id is kept as
    `x-upstream-request-id` because `x-request-id` is this proxy's."""
    out = []
    for key, value in raw:
        key = key.lower()
        if key in _DROP_RESPONSE:
            continue
        if key == b"x-request-id":
            key = b"x-upstream-request-id"
        out.append((key, value))
    return out


async def _noop_receive() -> Message:
    return {"type": "http.disconnect"}


def targets_from_config(upstreams: Mapping[str, object]) -> dict[str, UpstreamTarget]:
    """`ProxyConfig.upstreams` -> targets (credentials read from the environment now)."""
    from orq_proxy.config import UpstreamConfig

    out: dict[str, UpstreamTarget] = {}
    for name, up in upstreams.items():
        assert isinstance(up, UpstreamConfig)
        out[name] = UpstreamTarget(
            base_url=up.base_url,
            api_key=up.credential(),
            connect_timeout=up.connect_timeout,
            headers_timeout=up.headers_timeout,
            read_timeout=up.read_timeout,
        )
    return out
