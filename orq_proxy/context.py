"""One `RequestContext` per proxied request, kept under one namespaced ASGI scope key.

The slices (identities, budgets, metering, upstream) meet here and nowhere else: each layer reads what
the outer layers wrote and adds its own part. Everything on the hot path is a slots dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from starlette.types import Scope

if TYPE_CHECKING:
    from orq_proxy.auth import Principal
    from orq_proxy.usage.events import UsageEvent

__all__ = [
    "SCOPE_KEY",
    "ClientAPI",
    "IdentitySource",
    "MissingContext",
    "RequestContext",
    "ResolvedIdentity",
    "get_context",
]

SCOPE_KEY = "orq_proxy.context"

IdentitySource = Literal["body", "header", "metadata", "owner"]
ClientAPI = Literal["openai", "anthropic"]


@dataclass(slots=True)
class ResolvedIdentity:
    """Who a request is attributed to, and how that was found."""

    external_id: str
    source: IdentitySource
    identity_id: str | None = None  # the record's ULID `_id`, when a record exists
    tags: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RequestContext:
    """Everything the layers learn about one proxied request.

    Attributes:
        request_id: ULID, also the usage event's id and the `x-request-id` response header.
        received_at: wall time the request arrived (UTC).
        started: monotonic seconds when the request arrived (for latency).
        method: HTTP method.
        path: the upstream-relative path, e.g. `/chat/completions` (the surface prefix removed).
        surface: which prefix it came in on: `/v1`, `/v2/router` or `/v3/router`.
        raw_body: the request body as received.
        body: the parsed JSON object, or None when the body is not a JSON object.
        body_changed: set by any layer that edits `body`; the upstream then re-serializes it.
        principal: the authenticated caller (set by auth).
        provider: upstream name chosen by routing (`openai`), model: the model name forwarded upstream,
        model_ref: the model as the client named it (`openai/gpt-4o`).
        product: which API this is (`chat.completions`, `responses`, `embeddings`, `completions`, ...).
        stream: the client asked for a stream.
        orq: the `orq` extension object removed from the body (None if absent); each slice reads its own
            keys from it.
        identity: who the request is attributed to (set by the identity layer; None = unattributed).
        metadata: request metadata (string map) for CEL matching and events.
        settle_hooks: called once, synchronously, with the final UsageEvent; must not raise or block.
        budget_ids: the budgets this request's reservation is held against (set by the budget gate); the
            usage event carries them, so budget counters can be rebuilt from the event store.
        client_disconnected: the client went away before the response was complete.
        upstream_error: why the upstream failed (connect error, timeout, died mid-stream), if it did.
        api: the wire format the client speaks: `"openai"` (OpenAI's, also on Azure-style paths) or
            `"anthropic"` (Anthropic's Messages API, `/v1/messages`); the proxy's own errors take its shape.
        deployment: the Azure deployment an Azure-style path names (`/openai/deployments/{deployment}/...`).
    """

    request_id: str
    received_at: datetime
    started: float
    method: str
    path: str
    surface: str
    raw_body: bytes = b""
    body: dict[str, Any] | None = None
    body_changed: bool = False
    principal: Principal | None = None
    provider: str | None = None
    model: str | None = None
    model_ref: str | None = None
    product: str = "other"
    stream: bool = False
    orq: dict[str, Any] | None = None
    identity: ResolvedIdentity | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    settle_hooks: list[Callable[[UsageEvent], None]] = field(default_factory=list)
    budget_ids: tuple[str, ...] = ()
    client_disconnected: bool = False
    upstream_error: str | None = None
    api: ClientAPI = "openai"
    deployment: str | None = None


class MissingContext(RuntimeError):
    """A layer of the proxied stack ran without the `RequestContext` that `RequestMiddleware` creates."""


def get_context(scope: Scope) -> RequestContext:
    """The request's context. The one rule for every layer: a proxied HTTP request without one is a wiring
    bug (the layer was mounted outside `RequestMiddleware`), so this raises `MissingContext` saying so."""
    try:
        ctx: RequestContext = scope[SCOPE_KEY]
    except KeyError:
        raise MissingContext(
            "no RequestContext in the ASGI scope: the proxied layers must run inside RequestMiddleware "
            "(build_app puts it outermost)"
        ) from None
    return ctx
