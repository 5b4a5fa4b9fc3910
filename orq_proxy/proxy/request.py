"""The outermost layers of the proxied surface: request id and context, then (after auth) the body.

`RequestMiddleware` gives every response `x-request-id`, creates the `RequestContext`, refuses a path with a
`.` or `..` segment (400, encoded or not: it would reach the upstream as written) and answers 500 if an
inner layer raises before the response started (the exception propagates). `BodyMiddleware` reads the
whole request body (up to `max_body_bytes`, else 413), parses it once into the context as a JSON object
(400 for any other body, whatever its content type, except a multipart upload to an API that takes one),
takes orq's `orq` extension object out of it (`ctx.orq`, where the slices read their own keys; it must
never reach an upstream), and replays the body to the inner layers. Other orq-specific top-level fields
are taken out by the slice they belong to.

`build_app` puts auth between the two, so an unauthenticated caller is refused from its headers before a
byte of its body is read. `RequestMiddleware(app)` alone (`read_body=True`, the default) does both jobs.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orq_proxy.clock import Clock, SystemClock
from orq_proxy.context import SCOPE_KEY, ClientAPI, RequestContext, get_context
from orq_proxy.errors import openai_error
from orq_proxy.ids import new_request_id
from orq_proxy.proxy.jsonbody import JSONBodyError, parse_json_body

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "PROXY_PREFIXES",
    "STORED_SUFFIX",
    "BodyMiddleware",
    "RequestMiddleware",
    "has_dot_segment",
    "product_of",
    "route_path",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

# Longest first: a path is matched against these in order. `/openai` is Azure OpenAI's layout (what
# `openai.AzureOpenAI(azure_endpoint=<proxy>)` sends): see `_azure_surface`.
PROXY_PREFIXES = ("/v2/router", "/v3/router", "/v1", "/openai")

# The product of a path below a generating API (`responses.stored`): nothing there is billed.
STORED_SUFFIX = ".stored"
_PRODUCTS = {
    "/chat/completions": "chat.completions",
    "/responses": "responses",
    "/embeddings": "embeddings",
    "/completions": "completions",
    "/moderations": "moderations",
    "/rerank": "rerank",
}

# Paths below a generating API that generate (and are billed) themselves, not `{product}.stored`: the
# Responses API's compaction (Codex calls it) runs the model over the conversation and reports its usage.
_GENERATING_SUBPATHS = {"/responses/compact": "responses.compact"}

# A `.` or `..` segment, separated by `/` or by `\` (which some servers read as `/`), with or without a
# `;param` suffix (servlet containers read `..;` as `..`).
_DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.\.?(?:;[^/\\]*)?(?=[/\\]|$)")
# The APIs whose bodies are multipart uploads (`multipart/form-data`), the only bodies forwarded unparsed:
# audio transcriptions and translations, image edits and variations, files, upload parts, container files
# and videos (with an input reference). Their model (if any) is a form field the proxy does not read; their
# answers carry no model either, so metering and the budget gate both price them at zero.
_UPLOAD_PATH = re.compile(
    r"^/(?:audio/(?:transcriptions|translations)|images/(?:edits|variations)|files"
    r"|uploads/[^/]+/parts|containers/[^/]+/files|videos)/?$"
)
# Percent-decoding rounds looked through: the server decoded `path` once; an upstream (or a proxy in front
# of it) that decodes again would see `%252e%252e` as `..`.
_DECODE_ROUNDS = 3


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (Starlette keeps the full path and sets `root_path`)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


# Azure's per-deployment APIs: `/openai/deployments/{deployment}/{api}`. The deployment is what lies
# between (shortest first): the openai SDK puts the `model` there as written, `provider/model` included.
_AZURE_DEPLOYMENT = re.compile(
    r"^/openai/deployments/(.+?)(/(?:chat/completions|completions|embeddings|responses"
    r"|audio/[^/]+|images/[^/]+)/?)$"
)


def product_of(path: str) -> str:
    """Which API a path is: `chat.completions`, `responses`, `embeddings`, `messages` (Anthropic's),
    `messages.count_tokens`, `images`, `audio`, ...; below a generating API (`/responses/{id}`,
    `/chat/completions/{id}/messages`), `{product}.stored`."""
    product = _PRODUCTS.get(path)
    if product:
        return product
    trimmed = path.rstrip("/")
    product = _PRODUCTS.get(trimmed) or _GENERATING_SUBPATHS.get(trimmed)
    if product:  # `/chat/completions/`: the same API (a cap or a price must not be dodged by a slash)
        return product
    for base, name in _PRODUCTS.items():
        if trimmed.startswith(base) and trimmed[len(base)] == "/":
            # Reads or changes what that API stored (`GET /responses/{id}`, `POST /chat/completions/{id}`
            # updates metadata, `POST /responses/{id}/cancel`): the answer repeats the usage of a response
            # charged when it was made, so it is never billed again.
            return name + STORED_SUFFIX
    parts = trimmed.strip("/").split("/", 2)
    if parts[0] == "messages":
        # Anthropic: `/messages` generates; `/messages/count_tokens`, `/messages/batches` do not.
        return "messages" if len(parts) == 1 or not parts[1] else f"messages.{parts[1]}"
    return parts[0] or "other"


def _surface(path: str) -> tuple[str, str] | None:
    """(surface prefix, the path below it), or None for a path no proxied API has."""
    for prefix in PROXY_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            if prefix == "/openai":
                return _azure_surface(path)
            return prefix, path[len(prefix) :] or "/"
    return None


def _azure_surface(path: str) -> tuple[str, str]:
    """Azure OpenAI's paths: `/openai/deployments/{d}/chat/completions` -> (`/openai/deployments/{d}`,
    `/chat/completions`); its v1 API `/openai/v1/...` and the rest (`/openai/models`) below their prefix."""
    match = _AZURE_DEPLOYMENT.match(path)
    if match is not None:
        tail = match.group(2)
        return path[: len(path) - len(tail)], tail
    prefix = "/openai/v1" if path == "/openai/v1" or path.startswith("/openai/v1/") else "/openai"
    return prefix, path[len(prefix) :] or "/"


def _api_of(path: str) -> ClientAPI:
    """The wire format a request below its surface speaks (Anthropic's Messages API lives at `/messages`)."""
    return "anthropic" if path == "/messages" or path.startswith("/messages/") else "openai"


def has_dot_segment(path: str) -> bool:
    """Whether the (decoded) path has a `.` or `..` segment, also when decoded again (`%2e%2e` in it; up to
    `_DECODE_ROUNDS` more times)."""
    if "." not in path and "%" not in path:  # the common case: nothing to look for
        return False
    for _ in range(_DECODE_ROUNDS):
        if _DOT_SEGMENT.search(path):
            return True
        if "%" not in path:
            return False
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return _DOT_SEGMENT.search(path) is not None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


class RequestMiddleware:
    """Request id, `RequestContext`, path check and the 500 guard; see the module docstring.

    Args:
        app: the next layer.
        max_body_bytes: larger request bodies get 413 (with `read_body`).
        clock: time source.
        read_body: also read and parse the body here (a `BodyMiddleware` right inside). False: a
            `BodyMiddleware` further in does it (`build_app` puts auth in between).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        clock: Clock | None = None,
        read_body: bool = True,
    ):
        self.app = BodyMiddleware(app, max_body_bytes=max_body_bytes) if read_body else app
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
        if has_dot_segment(surface[1]):
            # Forwarded as written, `/v1/../../admin` would reach `<base>/../../admin` with the upstream
            # credential attached; no API path has such a segment, so it is refused rather than resolved.
            raw: bytes | None = scope.get("raw_path")
            shown = raw.decode("latin-1") if raw else path  # as the client wrote it (`%2e%2e` stays so)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            response = openai_error(
                400,
                f"path {shown!r} has a '.' or '..' segment (encoded or not); it is not forwarded",
                code="invalid_path",
            )
            await response(scope, receive, send_with_request_id)
            return

        prefix, below = surface
        deployment = None
        if prefix.startswith("/openai/deployments/"):
            deployment = prefix[len("/openai/deployments/") :]
        scope[SCOPE_KEY] = RequestContext(
            request_id=request_id,
            received_at=self.clock.now(),
            started=self.clock.monotonic(),
            method=scope["method"],
            path=below,
            surface=prefix,
            product=product_of(below),
            api=_api_of(below),
            deployment=deployment,
        )
        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            if response_started:
                raise
            logger.exception("request %s failed before its response started", request_id)
            response = openai_error(500, "internal error in the proxy", type="api_error")
            await response(scope, receive, send_with_request_id)
            raise


class BodyMiddleware:
    """Reads the body once (413 past `max_body_bytes`), parses it into the `RequestContext`, replays it.

    Runs inside `RequestMiddleware` (and, in `build_app`, inside auth: a caller without a valid key never
    gets its body read).

    Args:
        app: the next layer.
        max_body_bytes: larger request bodies get 413, checked on `Content-Length` first and while reading.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        ctx.raw_body = body
        error = _parse_body(ctx, _header(scope, b"content-type"))
        if error is not None:
            await error(scope, receive, send)
            return

        replayed = False

        async def receive_replayed() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, receive_replayed, send)

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


def _is_upload(path: str, content_type: bytes | None) -> bool:
    """A multipart upload to an API that takes one (see `_UPLOAD_PATH`)."""
    return (
        content_type is not None
        and content_type[:19].lower() == b"multipart/form-data"
        and _UPLOAD_PATH.match(path) is not None
    )


def _parse_body(ctx: RequestContext, content_type: bytes | None) -> Any:
    """Parse a JSON object body into `ctx` and lift `orq` out of it. Returns an error response for a body
    that is not a JSON object, whatever its content type, else None. Only multipart uploads to the APIs that
    take them stay opaque."""
    raw = ctx.raw_body
    if not raw:
        return None
    # Whatever the content type says: an upstream's parser may read a `text/plain` body as JSON (NaN and
    # all), and a body left unparsed here would reach it with its `orq` object, its identity, no model for
    # the budget gate to price and nothing for metering to estimate from.
    if _is_upload(ctx.path, content_type):
        return None
    try:
        data = parse_json_body(raw)
    except JSONBodyError as exc:
        if content_type is not None and content_type[:19].lower() == b"multipart/form-data":
            message = f"{ctx.path} takes a JSON body, not multipart/form-data"
            return openai_error(400, message, code="invalid_json")
        return openai_error(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json", param=exc.path
        )
    if not isinstance(data, dict):
        return openai_error(
            400, f"the request body must be a JSON object, got {_json_type(data)}", code="invalid_json"
        )
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
