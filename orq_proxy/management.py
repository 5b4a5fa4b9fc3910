"""Shared plumbing of the orq-compatible management API (`/v2/identities`, `/v2/budgets`, `/v2/reporting`).

Every endpoint: admin key required (401 without a valid key, 403 for a non-admin key), JSON in, JSON out,
errors in orq's shape `{"message", "code"}` naming the field and the rule.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orq_proxy.auth import KeyRing, Principal, bearer_token
from orq_proxy.errors import OrqAPIError

__all__ = ["Endpoint", "admin_principal", "json_ok", "orq_endpoint", "read_json_object", "validation_message"]

Endpoint = Callable[[Request], Awaitable[Response]]


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


async def read_json_object(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object, or 400 saying what is wrong with it."""
    raw = await request.body()
    if not raw.strip():
        if allow_empty:
            return {}
        raise OrqAPIError(400, "request body must be a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OrqAPIError(400, f"request body is not valid JSON: {exc}") from exc
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
    """Turn `OrqAPIError` and pydantic `ValidationError` into orq-shaped 4xx responses."""

    @functools.wraps(func)
    async def endpoint(request: Request) -> Response:
        try:
            return await func(request)
        except OrqAPIError as exc:
            return exc.response()
        except ValidationError as exc:
            return OrqAPIError(400, validation_message(exc)).response()

    return endpoint
