"""The error shapes, one helper per surface.

- Proxied LLM calls answer in OpenAI's shape: `{"error": {"message", "type", "code", "param"}}`, or, on
  Anthropic's Messages API (`ctx.api == "anthropic"`), in Anthropic's:
  `{"type": "error", "error": {"type", "message", ...}}` (the same `code`, `param` and extras inside
  `error`). `openai_error` builds both: the response picks its shape when it is sent, from the request's
  context, so no layer needs to know which API it is refusing.
- The management API (`/v2/identities`, `/v2/budgets`, `/v2/reporting`) answers in orq's shape:
  `{"message", "code"}` where `code` is a gRPC status number (spec §1.5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from orq_proxy.context import SCOPE_KEY

__all__ = [
    "GRPC_ALREADY_EXISTS",
    "GRPC_INTERNAL",
    "GRPC_INVALID_ARGUMENT",
    "GRPC_NOT_FOUND",
    "GRPC_PERMISSION_DENIED",
    "GRPC_RESOURCE_EXHAUSTED",
    "GRPC_UNAUTHENTICATED",
    "GRPC_UNAVAILABLE",
    "GRPC_UNIMPLEMENTED",
    "OrqAPIError",
    "ServiceUnavailable",
    "openai_error",
    "orq_error",
]

GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_ALREADY_EXISTS = 6
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

_GRPC_BY_STATUS = {
    400: GRPC_INVALID_ARGUMENT,
    401: GRPC_UNAUTHENTICATED,
    403: GRPC_PERMISSION_DENIED,
    404: GRPC_NOT_FOUND,
    405: GRPC_UNIMPLEMENTED,
    409: GRPC_ALREADY_EXISTS,
    413: GRPC_INVALID_ARGUMENT,
    422: GRPC_INVALID_ARGUMENT,
    429: GRPC_RESOURCE_EXHAUSTED,
    503: GRPC_UNAVAILABLE,
}

_OPENAI_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


# Anthropic's error types (https://docs.anthropic.com/en/api/errors), by status.
_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

# The proxy's own refusals that asking again cannot change: the official SDKs retry 429 twice by default
# (one refused call would be three requests and three error events) unless told not to.
_NO_RETRY_STATUSES = frozenset({403, 429})


def _headers(status: int, headers: Mapping[str, str] | None) -> dict[str, str] | None:
    if status in _NO_RETRY_STATUSES:
        return {**(headers or {}), "x-should-retry": "false"}
    return dict(headers) if headers else None


class _ErrorJSON(JSONResponse):
    """JSON rendered ASCII-only: an error message may quote client text, and an unpaired surrogate in it
    must not turn the 4xx into a crash while encoding (`\\ud800` escapes are valid JSON)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


class _ProxyError(_ErrorJSON):
    """An error of the proxied surface: OpenAI's shape, re-rendered in Anthropic's when the request is an
    Anthropic Messages call (decided when sent, from the `RequestContext` in the scope)."""

    def __init__(self, error: dict[str, Any], status: int, headers: dict[str, str] | None) -> None:
        super().__init__({"error": error}, status_code=status, headers=headers)
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = scope.get(SCOPE_KEY)
        if ctx is not None and ctx.api == "anthropic":
            error = {
                "type": _ANTHROPIC_TYPE_BY_STATUS.get(self.status_code, "api_error"),
                "message": self.error["message"],
                **{k: v for k, v in self.error.items() if k not in ("type", "message")},
            }
            body = {"type": "error", "error": error, "request_id": ctx.request_id}
            headers = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in self.raw_headers
                if k not in (b"content-length", b"content-type")
            }
            await _ErrorJSON(body, status_code=self.status_code, headers=headers)(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def openai_error(
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error for the proxied surface, in OpenAI's shape (`code` and `param` always present), or in
    Anthropic's on its Messages API (see the module docstring). A 403 or 429 carries `x-should-retry:
    false`: the SDKs (OpenAI's and Anthropic's) would otherwise send a refused call again."""
    error: dict[str, Any] = {
        "message": message,
        "type": type or _OPENAI_TYPE_BY_STATUS.get(status, "api_error"),
        "code": code,
        "param": param,
    }
    if extra:
        error.update(extra)
    return _ProxyError(error, status, _headers(status, headers))


def orq_error(
    status: int,
    message: str,
    *,
    code: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error for the management API, in orq's shape with a gRPC status code."""
    grpc = code if code is not None else _GRPC_BY_STATUS.get(status, GRPC_INTERNAL)
    return _ErrorJSON(
        {"message": message, "code": grpc}, status_code=status, headers=_headers(status, headers)
    )


class OrqAPIError(Exception):
    """Raised inside management endpoints; rendered by the API layer as `orq_error`.

    Example:
        raise OrqAPIError(404, "identity 'u1' not found")
    """

    def __init__(self, status: int, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def response(self) -> JSONResponse:
        return orq_error(self.status, self.message, code=self.code)


class ServiceUnavailable(Exception):
    """A backend a request needs cannot answer (e.g. the Redis behind the budget counters): 503 on either
    surface, naming the backend and the cause.

    Example:
        raise ServiceUnavailable("budget counters (Redis)", exc) from exc
    """

    def __init__(self, service: str, cause: BaseException | None = None) -> None:
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"{service} is unavailable{detail}")
        self.service = service
