"""`IdentityMiddleware`: attribute every proxied request to an identity.

Sources, first match wins (spec §5.1):
1. an identity object in the body — `orq.identity` (or the deprecated `orq.contact`), else a top-level
   `identity` — validated, then **upserted** (created if new, otherwise only the given fields change);
2. the `X-ORQ-IDENTITY-ID` header (or the legacy `X-ORQ-CONTACT-ID`): tags only;
3. the API key's `owner`: tags only.
No source: the request stays unattributed and is still proxied and metered.

The request layer has already taken `orq` and `identity` out of the body (`ctx.orq`, `ctx.body_identity`),
so neither reaches the upstream. The result goes to `ctx.identity` for the budget and metering layers.

Failure policy: fails closed. An invalid identity is a 400 in OpenAI's shape naming the field and the
limit; a store error propagates (the request layer answers 500).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.auth import OPEN_PRINCIPAL
from orq_proxy.context import IdentitySource, RequestContext, ResolvedIdentity, get_context
from orq_proxy.errors import openai_error
from orq_proxy.identities.models import (
    DISPLAY_NAME_MAX,
    EMAIL_MAX,
    EXTERNAL_ID_MAX,
    METADATA_MAX_KEYS,
    TAG_MAX_CHARS,
    TAGS_MAX,
    URL_MAX,
    IdentityFields,
    is_valid_email,
    normalize_fields,
    text_problem,
)
from orq_proxy.identities.store import IdentityStore

__all__ = ["IDENTITY_HEADER", "IdentityMiddleware", "InvalidIdentityError", "parse_body_identity"]

IDENTITY_HEADER = b"x-orq-identity-id"
_CONTACT_HEADER = b"x-orq-contact-id"  # what orq's SDK renames a legacy `contactid` header to


class InvalidIdentityError(ValueError):
    """A body identity or identity header that breaks a rule; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _text(value: Any, param: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidIdentityError(param, "must be a string")
    problem = text_problem(value, max_chars)
    if problem is not None:
        raise InvalidIdentityError(param, problem)
    return value


def _metadata(value: Any, param: str) -> dict[str, Any] | None:
    """orq sends metadata as a list of objects (`[{"plan": "pro"}]`); its docs also show a plain object."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        merged = dict(value)
    elif isinstance(value, list):
        merged = {}
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise InvalidIdentityError(f"{param}[{i}]", "must be an object")
            merged.update(item)
    else:
        raise InvalidIdentityError(param, "must be an object or a list of objects")
    if len(merged) > METADATA_MAX_KEYS:
        raise InvalidIdentityError(param, f"at most {METADATA_MAX_KEYS} keys are allowed, got {len(merged)}")
    return merged


def _tags(value: Any, param: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidIdentityError(param, "must be a list of strings")
    if len(value) > TAGS_MAX:
        raise InvalidIdentityError(param, f"at most {TAGS_MAX} tags are allowed, got {len(value)}")
    for i, tag in enumerate(value):
        if not isinstance(tag, str) or not tag:
            raise InvalidIdentityError(f"{param}[{i}]", "must be a non-empty string")
        _text(tag, f"{param}[{i}]", TAG_MAX_CHARS)
    return value


def parse_body_identity(raw: Any, where: str) -> tuple[str, IdentityFields]:
    """Validate a body identity object; its external id and the (normalized) fields it sets.

    Args:
        raw: the `orq.identity` / `identity` value from the request body.
        where: its path in the body, for error messages (`orq.identity`).

    Raises:
        InvalidIdentityError: naming the field and the rule.
    """
    if not isinstance(raw, Mapping):
        raise InvalidIdentityError(where, "must be an object with an `id`")
    if "id" not in raw or raw["id"] is None:
        raise InvalidIdentityError(f"{where}.id", "is required")
    external_id = _text(raw["id"], f"{where}.id", EXTERNAL_ID_MAX)
    if not external_id.strip():
        raise InvalidIdentityError(f"{where}.id", f"must be 1 to {EXTERNAL_ID_MAX} characters and not blank")
    given: dict[str, Any] = {}
    if raw.get("display_name") is not None:
        given["display_name"] = _text(raw["display_name"], f"{where}.display_name", DISPLAY_NAME_MAX)
    if raw.get("email") is not None:
        email = _text(raw["email"], f"{where}.email", EMAIL_MAX)
        if email and not is_valid_email(email):
            raise InvalidIdentityError(f"{where}.email", "must be an email address like name@example.com")
        given["email"] = email
    if raw.get("logo_url") is not None:
        given["avatar_url"] = _text(raw["logo_url"], f"{where}.logo_url", URL_MAX)
    metadata = _metadata(raw.get("metadata"), f"{where}.metadata")
    if metadata is not None:
        given["metadata"] = metadata
    tags = _tags(raw.get("tags"), f"{where}.tags")
    if tags is not None:
        given["tags"] = tags
    return external_id, normalize_fields(given)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            try:
                text: str = value.decode("utf-8")
            except UnicodeDecodeError:
                text = value.decode("latin-1")
            return text.strip() or None
    return None


class IdentityMiddleware:
    """Sets `ctx.identity` (a `ResolvedIdentity`) on every proxied request, or answers 400.

    Args:
        app: the next layer (budget, metering, upstream).
        store: where body identities are upserted and tagged identities are looked up.
    """

    def __init__(self, app: ASGIApp, *, store: IdentityStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        try:
            ctx.identity = await self._resolve(ctx, scope)
        except InvalidIdentityError as exc:
            response = openai_error(400, str(exc), param=exc.param, code="invalid_identity")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _resolve(self, ctx: RequestContext, scope: Scope) -> ResolvedIdentity | None:
        principal = ctx.principal or OPEN_PRINCIPAL
        workspace = principal.workspace
        raw: Any = None
        where = "identity"
        if ctx.orq:
            for key in ("identity", "contact"):
                if ctx.orq.get(key) is not None:
                    raw, where = ctx.orq[key], f"orq.{key}"
                    break
        if raw is None:
            raw = ctx.body_identity
        if raw is not None:
            external_id, fields = parse_body_identity(raw, where)
            record = await self.store.upsert(workspace, external_id, fields)
            return ResolvedIdentity(external_id, "body", record.id, list(record.tags))
        header = _header(scope, IDENTITY_HEADER) or _header(scope, _CONTACT_HEADER)
        if header is not None:
            if len(header) > EXTERNAL_ID_MAX:
                raise InvalidIdentityError(
                    "X-ORQ-IDENTITY-ID", f"must be at most {EXTERNAL_ID_MAX} characters, got {len(header)}"
                )
            return await self._tag(workspace, header, "header")
        if principal.owner:
            return await self._tag(workspace, principal.owner, "owner")
        return None

    async def _tag(self, workspace: str, external_id: str, source: IdentitySource) -> ResolvedIdentity:
        """Attribution without an upsert: the record's `_id` and tags when it exists."""
        record = await self.store.get_by_external_id(workspace, external_id)
        if record is None:
            return ResolvedIdentity(external_id, source)
        return ResolvedIdentity(external_id, source, record.id, list(record.tags))
