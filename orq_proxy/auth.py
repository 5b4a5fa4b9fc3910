"""API keys -> `Principal`.

Keys are held only as SHA-256 digests; a presented key is hashed, looked up, and the digest compared in
constant time. Keys are never logged. Fails closed: no valid key, no request (except in open mode, which
the CLI only allows on a loopback address).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.config import ProxyConfig
from orq_proxy.context import get_context
from orq_proxy.errors import openai_error

__all__ = [
    "OPEN_PRINCIPAL",
    "AuthMiddleware",
    "IdentityScope",
    "KeyRing",
    "Principal",
    "bearer_token",
    "hash_key",
    "keyring_from_config",
    "proxy_key",
]

# On a 401 to a request with a body: the server closes the connection rather than read the body to reuse it.
_CLOSE = {"connection": "close"}


IdentityScope = Literal["any", "owner", "prefix"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's workspace, project, id, owning identity, whether it is an admin key, and
    which identities it may attribute calls to (`[[api_keys]] identities`, `identity_prefix`).

    `identities=None` is the default rule: `"owner"` for a key with an owner (a user's key speaks for that
    user only), `"any"` for one without (a backend's key names its users). It is resolved here, in one place,
    so a `Principal` built without going through the config gets the same default.
    """

    workspace: str
    project: str
    key_id: str
    owner: str | None = None
    admin: bool = False
    identities: IdentityScope | None = None
    identity_prefix: str | None = None

    @property
    def identity_scope(self) -> IdentityScope:
        """The effective rule: `identities`, else `"owner"` with an owner and `"any"` without."""
        if self.identities is not None:
            return self.identities
        return "owner" if self.owner else "any"

    def identity_refusal(self, external_id: str) -> str | None:
        """Why this key may not attribute a call to `external_id` (a sentence naming the rule), or None.

        The key's own owner is always allowed, whatever the rule. Fails closed: `"prefix"` with no prefix,
        or `"owner"` with no owner, allows nothing but the owner (the config refuses both anyway).
        """
        scope = self.identity_scope
        owner = self.owner
        if scope == "any" or (owner and external_id == owner):
            return None
        prefix = self.identity_prefix
        if scope == "prefix" and prefix and external_id.startswith(prefix):
            return None
        if scope == "owner" or not prefix:
            if owner:
                return f"this API key may only attribute calls to its owner {owner!r}"
            return "this API key may not attribute calls to an identity (it has no owner)"
        also = f" or to its owner {owner!r}" if owner else ""
        return f"this API key may only attribute calls to identities starting with {prefix!r}{also}"


OPEN_PRINCIPAL = Principal(workspace="default", project="default", key_id="open", owner=None, admin=True)


def hash_key(key: str) -> str:
    """The hex SHA-256 digest under which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: bytes | str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    if isinstance(authorization, bytes):
        try:
            authorization = authorization.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
            return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class KeyRing:
    """The configured proxy keys. With no keys it is in open mode: everyone is `OPEN_PRINCIPAL`.

    Args:
        entries: `(sha256_hex, principal)` pairs.
    """

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._by_digest: dict[str, tuple[str, Principal]] = {}
        for digest, principal in entries:
            digest = digest.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("key_sha256 must be 64 hex characters")
            if digest in self._by_digest:
                raise ValueError(f"api key {principal.key_id!r} is configured twice")
            self._by_digest[digest] = (digest, principal)

    @property
    def open_mode(self) -> bool:
        return not self._by_digest

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal for a presented key, or None when it is missing or unknown."""
        if self.open_mode:
            return OPEN_PRINCIPAL
        if not token:
            return None
        digest = hash_key(token)
        # Hashing first means the lookup's timing can only leak facts about a digest, never the key;
        # the final comparison is constant time all the same.
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            return None
        return entry[1]


def proxy_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The proxy key a client sent: `Authorization: Bearer <key>`, else `x-api-key` (Anthropic's clients,
    Claude Code with `ANTHROPIC_API_KEY`), else `api-key` (Azure OpenAI's clients)."""
    bearer = x_api_key = api_key = None
    for key, value in headers:
        if key == b"authorization":
            bearer = bearer_token(value)
            if bearer is not None:
                return bearer
        elif key == b"x-api-key":
            x_api_key = value
        elif key == b"api-key":
            api_key = value
    raw = x_api_key if x_api_key is not None else api_key
    if raw is None:
        return None
    try:
        return raw.decode("ascii").strip() or None
    except UnicodeDecodeError:
        return None


class AuthMiddleware:
    """Proxied surface: the proxy key (`proxy_key`: `Authorization: Bearer`, `x-api-key` or `api-key`) ->
    `ctx.principal`, else 401 in the request's error shape (OpenAI's, or Anthropic's on its Messages API).

    Fails closed. The client's key is for this proxy only; the upstream layer never forwards it. Only the
    headers are looked at: `build_app` runs this before the body is read, so a caller without a valid key
    never gets its body read (a 401 to a request with a body also says `connection: close`, so the
    server drops the connection instead of reading the rest of the body to reuse it).
    """

    def __init__(self, app: ASGIApp, *, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = None
        if not self.keyring.open_mode:
            token = proxy_key(scope["headers"])
        principal = self.keyring.authenticate(token)
        if principal is None:
            response = openai_error(
                401,
                "missing or invalid API key: send Authorization: Bearer <key> (or x-api-key / api-key: <key>)",
                type="authentication_error",
                code="invalid_api_key",
                headers=_CLOSE if _has_body(scope) else None,
            )
            await response(scope, receive, send)
            return
        get_context(scope).principal = principal
        await self.app(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a non-zero `Content-Length`, or `Transfer-Encoding`)."""
    for key, value in scope["headers"]:
        if key == b"transfer-encoding" or (key == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def keyring_from_config(config: ProxyConfig) -> KeyRing:
    """The proxy keys of `[[api_keys]]` as a `KeyRing` (digests only; plain keys are hashed here)."""
    entries = []
    for entry in config.api_keys:
        digest = (entry.key_sha256 or hash_key(entry.key or "")).lower()
        key_id = entry.id or f"key_{digest[:12]}"
        principal = Principal(
            workspace=entry.workspace,
            project=entry.project,
            key_id=key_id,
            owner=entry.owner,
            admin=entry.admin,
            identities=entry.identities,
            identity_prefix=entry.identity_prefix,
        )
        entries.append((digest, principal))
    return KeyRing(entries)
