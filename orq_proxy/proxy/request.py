"""The outermost layer of the proxied surface: request id, bounded body read, JSON parsed once.

It reads the whole request body (up to `max_body_bytes`, else 413), parses a JSON object body once into
the `RequestContext`, takes orq's `orq` extension object out of it (`ctx.orq`, where the slices read
their own keys; it must never reach an upstream), and replays the body to the inner layers. Other
orq-specific top-level fields are taken out by the slice they belong to. Every response gets
`x-request-id`. If an inner layer raises before the response started, the client gets a 500 in OpenAI's
shape and the exception propagates.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orq_proxy.clock import Clock, SystemClock
from orq_proxy.context import SCOPE_KEY, RequestContext
from orq_proxy.errors import openai_error
from orq_proxy.ids import new_request_id
from orq_proxy.proxy.jsonbody import JSONBodyError, parse_json_body

__all__ = ["PROXY_PREFIXES", "RequestMiddleware", "product_of", "route_path"]

logger = logging.getLogger(__name__)

# Longest first: a path is matched against these in order.
PROXY_PREFIXES = ("/v2/router", "/v3/router", "/v1")

_PRODUCTS = {
    "/chat/completions": "chat.completions",
    "/responses": "responses",
    "/embeddings": "embeddings",
    "/completions": "completions",
    "/moderations": "moderations",
    "/rerank": "rerank",
}


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (Starlette keeps the full path and sets `root_path`)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def product_of(path: str) -> str:
    """Which API a path is: `chat.completions`, `responses`, `embeddings`, `images`, `audio`, ..."""
    product = _PRODUCTS.get(path)
    if product:
        return product
    first = path.strip("/").split("/", 1)[0]
    return first or "other"


def _surface(path: str) -> tuple[str, str] | None:
    for prefix in PROXY_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix, path[len(prefix) :] or "/"
    return None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


class RequestMiddleware:
    """Creates the request's `RequestContext`; see the module docstring.

    Args:
        app: the next layer.
        max_body_bytes: larger request bodies get 413.
        clock: time source.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = 32 * 1024 * 1024, clock: Clock | None = None):
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.clock = clock or SystemClock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        rid_header = (b"x-request-id", request_id.encode())
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        path = route_path(scope)
        surface = _surface(path)
        if surface is None:
            response = openai_error(404, f"no proxied API at {path}", code="not_found")
            await response(scope, receive, send_with_request_id)
            return

        body = await self._read_body(scope, receive, send_with_request_id)
        if body is None:
            return
        ctx = RequestContext(
            request_id=request_id,
            received_at=self.clock.now(),
            started=self.clock.monotonic(),
            method=scope["method"],
            path=surface[1],
            surface=surface[0],
            raw_body=body,
            product=product_of(surface[1]),
        )
        error = _parse_body(ctx, _header(scope, b"content-type"))
        if error is not None:
            await error(scope, receive, send_with_request_id)
            return
        scope[SCOPE_KEY] = ctx

        replayed = False

        async def receive_replayed() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, receive_replayed, send_with_request_id)
        except Exception:
            if response_started:
                raise
            logger.exception("request %s failed before its response started", request_id)
            response = openai_error(500, "internal error in the proxy", type="api_error")
            await response(scope, receive, send_with_request_id)
            raise

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (or when the client left)."""
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                await _too_large(limit)(scope, receive, send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    await _too_large(limit)(scope, receive, send)
                    return None
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> Any:
    return openai_error(
        413, f"request body is larger than the limit of {limit} bytes", code="request_too_large", param=None
    )


def _json_type(value: Any) -> str:
    """The JSON type name of a parsed value, for error messages (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _parse_body(ctx: RequestContext, content_type: bytes | None) -> Any:
    """Parse a JSON object body into `ctx` and lift `orq` out of it. Returns an error response for a JSON
    body that does not parse, else None. Non-JSON bodies (multipart uploads) stay opaque."""
    raw = ctx.raw_body
    if not raw:
        return None
    is_json = content_type is not None and b"json" in content_type.lower()
    if not is_json and raw[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return None
    try:
        data = parse_json_body(raw)
    except JSONBodyError as exc:
        if not is_json:
            return None
        return openai_error(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json", param=exc.path
        )
    if not isinstance(data, dict):
        if is_json:
            return openai_error(400, "the request body must be a JSON object", code="invalid_json")
        return None
    ctx.body = data
    if "orq" in data:
        orq = data.pop("orq")
        if orq is not None and not isinstance(orq, dict):
            return openai_error(400, "orq must be an object", code="invalid_value", param="orq")
        ctx.orq = orq
        ctx.body_changed = True
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        # Metering decides on this flag (usage injection), so it must mean what the upstream reads.
        return openai_error(
            400,
            f"stream must be true or false, got {_json_type(stream)}",
            code="invalid_value",
            param="stream",
        )
    ctx.stream = stream is True
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        ctx.metadata = {str(k): v for k, v in metadata.items() if isinstance(v, str)}
    return None
