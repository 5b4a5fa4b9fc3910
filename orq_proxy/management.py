"""Shared plumbing of the orq-compatible management API (`/v2/identities`, `/v2/budgets`, `/v2/reporting`).

Every endpoint: admin key required (401 without a valid key, 403 for a non-admin key), JSON in, JSON out,
errors in orq's shape `{"message", "code"}` naming the field and the rule.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from orq_proxy.auth import KeyRing, Principal, bearer_token
from orq_proxy.errors import OrqAPIError, ServiceUnavailable, orq_error
from orq_proxy.proxy.jsonbody import JSONBodyError, parse_json_body

__all__ = [
    "MAX_BODY_BYTES",
    "Endpoint",
    "admin_principal",
    "json_ok",
    "orq_endpoint",
    "read_json_object",
    "validation_message",
]

logger = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]

# Management payloads are small (an identity's metadata has at most 20 keys); 1 MiB leaves ample room.
MAX_BODY_BYTES = 1024 * 1024


def admin_principal(keyring: KeyRing, request: Request) -> Principal:
    """The caller's principal; raises 401 (no or unknown key) or 403 (not an admin key)."""
    principal = keyring.authenticate(bearer_token(request.headers.get("authorization")))
    if principal is None:
        raise OrqAPIError(401, "missing or invalid API key: send Authorization: Bearer <key>")
    if not principal.admin:
        raise OrqAPIError(403, "this API key may not use the management API (admin = false)")
    return principal


def json_ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    """A success response; always `application/json`, DELETEs send `{}`."""
    return JSONResponse(data, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it is larger than `limit` (the proxied surface has its own, larger cap)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:  # not a number: the server would have refused it; read and count instead
            too_big = False
        if too_big:
            raise OrqAPIError(413, f"request body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise OrqAPIError(413, f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer; ends the request without an error traceback
        raise OrqAPIError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def read_json_object(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object (at most `MAX_BODY_BYTES`), or 400/413 saying what is wrong."""
    raw = await _read_body(request, MAX_BODY_BYTES)
    if not raw.strip():
        if allow_empty:
            return {}
        raise OrqAPIError(400, "request body must be a JSON object")
    try:
        data = parse_json_body(raw)
    except JSONBodyError as exc:
        raise OrqAPIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OrqAPIError(400, "request body must be a JSON object")
    return data


def validation_message(exc: ValidationError) -> str:
    """`field.path: rule` for each pydantic error, joined."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def orq_endpoint(func: Endpoint) -> Endpoint:
    """Turn `OrqAPIError` and pydantic `ValidationError` into orq-shaped 4xx responses, and a backend that
    cannot answer (`ServiceUnavailable`) into a 503 naming it."""

    @functools.wraps(func)
    async def endpoint(request: Request) -> Response:
        try:
            return await func(request)
        except OrqAPIError as exc:
            return exc.response()
        except ValidationError as exc:
            return OrqAPIError(400, validation_message(exc)).response()
        except ServiceUnavailable as exc:
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
            return orq_error(503, str(exc), headers={"Retry-After": "1"})

    return endpoint
