"""`IdentityMiddleware`: attribute every proxied request to an identity.

Sources, first match wins (spec §5.1):
1. an identity object in the body — `orq.identity` (or the deprecated `orq.contact`), else a top-level
   `identity` — validated, then **upserted** (created if new, otherwise only the given fields change);
2. the `X-ORQ-IDENTITY-ID` header (or the legacy `X-ORQ-CONTACT-ID`): tags only;
3. on Anthropic's Messages API, its `metadata.user_id` (tags only; one that is not a valid external id,
   or not one the key may name, is passed over rather than refused: it is the client's field for Anthropic);
4. the API key's `owner`: tags only.
No source: the request stays unattributed and is still proxied and metered.

Which identities a key may name (`[[api_keys]] identities`, `Principal.identity_refusal`): a body identity or
header the key may not use is a 403 in OpenAI's shape (`identity_not_allowed`, `param` naming where it came
from), checked before anything is upserted or looked up, so the store is never called and the budget gate
never runs. The owner fallback (3) is always allowed.

Neither identity object reaches the upstream: the request layer has already taken orq's whole `orq`
extension object out of the body (`ctx.orq`), and this layer takes a top-level `identity` out of
`ctx.body` (setting `ctx.body_changed`). The fields are checked by the same rules as the management API's
(`identities/rules.py`). The result goes to `ctx.identity` for the budget and metering layers.

Failure policy: fails closed. An invalid identity is a 400 in OpenAI's shape naming the field and the
limit; one the key may not name, a 403 (`identity_not_allowed`); a store that cannot answer
(`ServiceUnavailable`, e.g. PostgreSQL down) is a 503 in OpenAI's shape (`identity_unavailable`,
`Retry-After: 1`); any other store error propagates (the request layer answers 500).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.auth import OPEN_PRINCIPAL, Principal
from orq_proxy.context import IdentitySource, RequestContext, ResolvedIdentity, get_context
from orq_proxy.errors import ServiceUnavailable, openai_error
from orq_proxy.identities.models import IdentityFields, normalize_fields
from orq_proxy.identities.rules import (
    IdentityRuleError,
    check_display_name,
    check_email,
    check_external_id,
    check_metadata_objects,
    check_tags,
    check_url,
)
from orq_proxy.identities.store import IdentityStore
from orq_proxy.logs import RepeatedFailure

__all__ = [
    "IDENTITY_HEADER",
    "IdentityMiddleware",
    "IdentityNotAllowedError",
    "InvalidIdentityError",
    "parse_body_identity",
]

logger = logging.getLogger(__name__)

IDENTITY_HEADER = b"x-orq-identity-id"
_CONTACT_HEADER = b"x-orq-contact-id"  # what orq's SDK renames a legacy `contactid` header to
_HEADER_PARAM = "X-ORQ-IDENTITY-ID"
_CONTACT_HEADER_PARAM = "X-ORQ-CONTACT-ID"
# The `orq` keys that carry an identity, first match wins, with their paths for error messages.
_ORQ_KEYS = (("identity", "orq.identity"), ("contact", "orq.contact"))


class InvalidIdentityError(ValueError):
    """A body identity or identity header that breaks a rule; `param` names the field, `rule` the rule."""

    def __init__(self, param: str, rule: str) -> None:
        super().__init__(f"{param}: {rule}")
        self.param = param
        self.rule = rule


class IdentityNotAllowedError(PermissionError):
    """A body identity or identity header this API key may not attribute calls to (its `identities` rule).

    `param` names where the identity came from (`orq.identity.id`, `X-ORQ-IDENTITY-ID`), `rule` the rule.
    """

    def __init__(self, param: str, rule: str, external_id: str) -> None:
        super().__init__(f"{param}: {rule}, not {external_id!r}")
        self.param = param
        self.rule = rule


def _check_allowed(principal: Principal, external_id: str, param: str) -> None:
    refusal = principal.identity_refusal(external_id)
    if refusal is not None:
        raise IdentityNotAllowedError(param, refusal, external_id)


def parse_body_identity(raw: Any, where: str) -> tuple[str, IdentityFields]:
    """Validate a body identity object; its external id and the (normalized) fields it sets.

    Args:
        raw: the `orq.identity` / `identity` value from the request body.
        where: its path in the body, for error messages (`orq.identity`).

    Raises:
        InvalidIdentityError: naming the field's path in the body (`orq.identity.tags[1]`) and the rule.
    """
    if not isinstance(raw, dict):  # a parsed JSON object (cheaper to test than the `Mapping` ABC)
        raise InvalidIdentityError(where, "must be an object with an `id`")
    try:
        external_id = check_external_id(raw.get("id"), "id")
        given: dict[str, Any] = {}
        value = raw.get("display_name")
        if value is not None:
            given["display_name"] = check_display_name(value, "display_name")
        value = raw.get("email")
        if value is not None:
            given["email"] = check_email(value, "email")
        value = raw.get("logo_url")
        if value is not None:
            given["avatar_url"] = check_url(value, "logo_url")
        value = raw.get("metadata")
        if value is not None:
            given["metadata"] = check_metadata_objects(value, "metadata")
        value = raw.get("tags")
        if value is not None:
            given["tags"] = check_tags(value, "tags")
    except IdentityRuleError as exc:
        raise InvalidIdentityError(f"{where}.{exc.field}", exc.rule) from exc
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


def _anthropic_user_id(ctx: RequestContext) -> str | None:
    """Anthropic's own `metadata.user_id` of a Messages call, when it is a valid external id. It is the
    client's field for the upstream (Claude Code sends one per user and account), not a request to be
    attributed: one this layer cannot use (too long, blank, or not one the key may name) is passed over,
    never refused, and the request falls through to the key's owner."""
    if ctx.api != "anthropic" or ctx.body is None:
        return None
    metadata = ctx.body.get("metadata")
    if not isinstance(metadata, dict):
        return None
    user_id = metadata.get("user_id")
    if not isinstance(user_id, str):
        return None
    try:
        return check_external_id(user_id, "metadata.user_id")
    except IdentityRuleError:
        return None


class IdentityMiddleware:
    """Sets `ctx.identity` (a `ResolvedIdentity`) on every proxied request, or answers 400, 403 or 503.

    Args:
        app: the next layer (budget, metering, upstream).
        store: where body identities are upserted and tagged identities are looked up.
        on_refused: called (sync, must not raise) with the context and status of every request this layer
            answers itself (400, 403, 503), so it is still a usage event; app.py passes metering's
            `record_unforwarded`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: IdentityStore,
        on_refused: Callable[[RequestContext, int], None] | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.on_refused = on_refused
        # An outage fails every request alike: log it once with its cause, then a summary per 10 s.
        self._store_failures = RepeatedFailure(
            logger, "identity store failed; refusing with 503 (fail closed)", expected=(ServiceUnavailable,)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        try:
            ctx.identity = await self._resolve(ctx, scope)
        except InvalidIdentityError as exc:
            response = openai_error(400, str(exc), param=exc.param, code="invalid_identity")
            await self._refuse(ctx, response, scope, receive, send)
            return
        except IdentityNotAllowedError as exc:
            response = openai_error(403, str(exc), param=exc.param, code="identity_not_allowed")
            await self._refuse(ctx, response, scope, receive, send)
            return
        except ServiceUnavailable as exc:
            self._store_failures.failed(exc)  # once with its cause, then a summary every 10 s
            response = openai_error(
                503, "identity service unavailable", code="identity_unavailable", headers={"Retry-After": "1"}
            )
            await self._refuse(ctx, response, scope, receive, send)
            return
        if self._store_failures.failing:
            self._store_failures.succeeded()
        await self.app(scope, receive, send)

    async def _refuse(
        self, ctx: RequestContext, response: Response, scope: Scope, receive: Receive, send: Send
    ) -> None:
        await response(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused(ctx, response.status_code)

    async def _resolve(self, ctx: RequestContext, scope: Scope) -> ResolvedIdentity | None:
        principal = ctx.principal or OPEN_PRINCIPAL
        workspace = principal.workspace
        raw: Any = None
        where = "identity"
        body = ctx.body
        if body is not None and "identity" in body:
            # Taken out whichever source wins: it is orq's, never the upstream's.
            raw = body.pop("identity")
            ctx.body_changed = True
        orq = ctx.orq
        if orq:
            for key, path in _ORQ_KEYS:
                if orq.get(key) is not None:
                    raw, where = orq[key], path
                    break
        if raw is not None:
            external_id, fields = parse_body_identity(raw, where)
            # Before the upsert: a refused identity writes nothing.
            _check_allowed(principal, external_id, f"{where}.id")
            record = await self.store.upsert(workspace, external_id, fields)
            return ResolvedIdentity(external_id, "body", record.id, list(record.tags))
        header, header_param = _header(scope, IDENTITY_HEADER), _HEADER_PARAM
        if header is None:
            header, header_param = _header(scope, _CONTACT_HEADER), _CONTACT_HEADER_PARAM
        if header is not None:
            try:
                check_external_id(header, _HEADER_PARAM)
            except IdentityRuleError as exc:
                raise InvalidIdentityError(exc.field, exc.rule) from exc
            _check_allowed(principal, header, header_param)
            return await self._tag(workspace, header, "header")
        user_id = _anthropic_user_id(ctx)
        if user_id is not None and principal.identity_refusal(user_id) is None:
            return await self._tag(workspace, user_id, "metadata")
        if principal.owner:
            return await self._tag(workspace, principal.owner, "owner")
        return None

    async def _tag(self, workspace: str, external_id: str, source: IdentitySource) -> ResolvedIdentity:
        """Attribution without an upsert: the record's `_id` and tags when it exists."""
        record = await self.store.get_by_external_id(workspace, external_id)
        if record is None:
            return ResolvedIdentity(external_id, source)
        return ResolvedIdentity(external_id, source, record.id, list(record.tags))
