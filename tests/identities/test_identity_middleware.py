"""`IdentityMiddleware` inside the real request and auth layers, around an inline ASGI app."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from orq_proxy.auth import AuthMiddleware, KeyRing, Principal, hash_key
from orq_proxy.context import MissingContext, ResolvedIdentity, get_context
from orq_proxy.identities.middleware import IdentityMiddleware, parse_body_identity
from orq_proxy.identities.models import IdentityQuery
from orq_proxy.identities.store import InMemoryIdentityStore
from orq_proxy.proxy.request import RequestMiddleware
from orq_proxy.testing.clock import FakeClock

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEYS = {
    "sk-a": Principal(workspace="ws_a", project="p", key_id="a"),
    # With an owner the default is "owner"; explicitly "any" so the precedence test may name others.
    "sk-owned": Principal(workspace="ws_a", project="p", key_id="owned", owner="key-owner", identities="any"),
    "sk-b": Principal(workspace="ws_b", project="p", key_id="b"),
}


class Inner:
    """The next layer: records the identity it was given and answers 200."""

    def __init__(self) -> None:
        self.seen: list[ResolvedIdentity | None] = []
        self.bodies: list[Any] = []
        self.changed: list[bool] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        self.seen.append(ctx.identity)
        self.bodies.append(ctx.body)
        self.changed.append(ctx.body_changed)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})


class Stack:
    def __init__(self) -> None:
        self.clock = FakeClock(START)
        self.store = InMemoryIdentityStore(clock=self.clock)
        self.inner = Inner()
        keyring = KeyRing((hash_key(k), p) for k, p in KEYS.items())
        app: Any = IdentityMiddleware(self.inner, store=self.store)
        app = AuthMiddleware(app, keyring=keyring)
        self.app = RequestMiddleware(app, clock=self.clock)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://proxy")

    async def call(
        self,
        body: dict[str, Any] | None = None,
        *,
        key: str = "sk-a",
        headers: dict[str, str] | None = None,
        path: str = "/v1/chat/completions",
    ) -> httpx.Response:
        payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **(body or {})}
        return await self.client.post(
            path, json=payload, headers={"authorization": f"Bearer {key}", **(headers or {})}
        )

    @property
    def last(self) -> ResolvedIdentity | None:
        return self.inner.seen[-1]


@pytest.fixture
async def stack() -> Any:
    s = Stack()
    yield s
    await s.client.aclose()


async def test_orq_identity_upserts_and_tags(stack: Stack) -> None:
    """orq.identity: the record is created (logo_url -> avatar_url, metadata list merged); ctx tagged."""
    resp = await stack.call(
        {
            "orq": {
                "identity": {
                    "id": "user_123",
                    "display_name": "Ada",
                    "email": "ada@example.com",
                    "metadata": [{"plan": "pro"}, {"seats": 3, "plan": "ent"}],
                    "logo_url": "https://x/l.png",
                    "tags": ["beta"],
                }
            }
        }
    )
    assert resp.status_code == 200
    record = await stack.store.get_by_external_id("ws_a", "user_123")
    assert record is not None
    assert (record.display_name, record.email, record.avatar_url) == (
        "Ada",
        "ada@example.com",
        "https://x/l.png",
    )
    assert record.metadata == {"plan": "ent", "seats": 3}
    assert stack.last == ResolvedIdentity("user_123", "body", record.id, ["beta"])
    assert "orq" not in stack.inner.bodies[-1]


async def test_upsert_changes_only_given_fields(stack: Stack) -> None:
    """A later call with fewer fields changes only those; an identical call changes nothing."""
    await stack.call({"orq": {"identity": {"id": "u", "display_name": "Ada", "tags": ["a"]}}})
    stack.clock.advance(10)
    await stack.call({"orq": {"identity": {"id": "u", "email": "a@x.io"}}})
    record = await stack.store.get_by_external_id("ws_a", "u")
    assert record is not None
    assert (record.display_name, record.email, record.tags) == ("Ada", "a@x.io", ("a",))
    assert record.updated == "2026-03-01T12:00:10.000Z"
    stack.clock.advance(10)
    await stack.call({"orq": {"identity": {"id": "u", "email": "a@x.io", "metadata": None, "tags": None}}})
    again = await stack.store.get_by_external_id("ws_a", "u")
    assert again is record


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v3/router/responses", {"identity": {"id": "top", "tags": ["t"]}}),
        ("/v2/router/chat/completions", {"orq": {"contact": {"id": "top", "tags": ["t"]}}}),
        ("/v1/embeddings", {"orq": {"identity": {"id": "top", "tags": ["t"]}}}),
    ],
)
async def test_other_body_locations(stack: Stack, path: str, body: dict[str, Any]) -> None:
    """Top-level `identity` and the deprecated `orq.contact` are body identities too."""
    resp = await stack.call(body, path=path)
    assert resp.status_code == 200
    assert stack.last is not None
    assert (stack.last.external_id, stack.last.source, stack.last.tags) == ("top", "body", ["t"])
    assert await stack.store.get_by_external_id("ws_a", "top") is not None


@pytest.mark.parametrize(
    "extra",
    [
        {"identity": {"id": "top"}},
        {"identity": None},
        {"identity": {"id": "loses"}, "orq": {"identity": {"id": "wins"}}},
    ],
)
async def test_top_level_identity_is_taken_out_here(stack: Stack, extra: dict[str, Any]) -> None:
    """This layer, not the request layer, takes a top-level `identity` out of the body (also a null one,
    also when `orq.identity` wins) and marks the body changed, so the upstream never sees it."""
    alone = Inner()
    request_layer = RequestMiddleware(alone, clock=stack.clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=request_layer), base_url="http://p") as c:
        await c.post("/v1/chat/completions", json={"model": "gpt-4o", **extra})
    assert "identity" in alone.bodies[0]  # the request layer leaves it
    resp = await stack.call(extra)
    assert resp.status_code == 200
    assert "identity" not in stack.inner.bodies[-1] and "orq" not in stack.inner.bodies[-1]
    assert stack.inner.changed[-1] is True


async def test_header_tags_only(stack: Stack) -> None:
    """X-ORQ-IDENTITY-ID tags the request without creating a record; an existing record lends id and tags."""
    await stack.call(headers={"X-ORQ-IDENTITY-ID": "hdr"})
    assert stack.last == ResolvedIdentity("hdr", "header")
    assert await stack.store.get_by_external_id("ws_a", "hdr") is None
    known = await stack.store.create("ws_a", "known", {"tags": ("vip",)})
    await stack.call(headers={"x-orq-identity-id": " known "})
    assert stack.last == ResolvedIdentity("known", "header", known.id, ["vip"])
    await stack.call(headers={"X-ORQ-CONTACT-ID": "legacy"})
    assert stack.last == ResolvedIdentity("legacy", "header")


async def test_header_with_utf8(stack: Stack) -> None:
    """A UTF-8 header value is read as UTF-8."""
    await stack.client.post(
        "/v1/chat/completions",
        content=b"{}",
        headers=[(b"authorization", b"Bearer sk-a"), (b"x-orq-identity-id", "zoë".encode())],
    )
    assert stack.last == ResolvedIdentity("zoë", "header")


async def test_owner_tags_only(stack: Stack) -> None:
    """A key with an owner tags requests that carry nothing else; no record is created."""
    await stack.call(key="sk-owned")
    assert stack.last == ResolvedIdentity("key-owner", "owner")
    assert (await stack.store.list("ws_a", IdentityQuery())).data == []


async def test_no_source_is_unattributed(stack: Stack) -> None:
    """Nothing to go on: the request is still passed on, unattributed."""
    resp = await stack.call()
    assert resp.status_code == 200
    assert stack.inner.seen == [None]


async def test_precedence(stack: Stack) -> None:
    """Body beats header beats owner."""
    await stack.call(
        {"orq": {"identity": {"id": "from-body"}}, "identity": {"id": "top-level"}},
        key="sk-owned",
        headers={"X-ORQ-IDENTITY-ID": "from-header"},
    )
    assert stack.last is not None and (stack.last.external_id, stack.last.source) == ("from-body", "body")
    await stack.call({"identity": {"id": "top-level"}}, key="sk-owned", headers={"X-ORQ-IDENTITY-ID": "h"})
    assert stack.last is not None and (stack.last.external_id, stack.last.source) == ("top-level", "body")
    await stack.call(key="sk-owned", headers={"X-ORQ-IDENTITY-ID": "from-header"})
    assert stack.last is not None and (stack.last.external_id, stack.last.source) == ("from-header", "header")
    await stack.call({"orq": {"identity": None}}, key="sk-owned", headers={"X-ORQ-IDENTITY-ID": ""})
    assert stack.last is not None and (stack.last.external_id, stack.last.source) == ("key-owner", "owner")


async def test_workspaces_do_not_share_identities(stack: Stack) -> None:
    """The same body id under two workspaces' keys makes two records; a header never crosses over."""
    await stack.call({"orq": {"identity": {"id": "same", "tags": ["a"]}}}, key="sk-a")
    await stack.call({"orq": {"identity": {"id": "same"}}}, key="sk-b")
    a = await stack.store.get_by_external_id("ws_a", "same")
    b = await stack.store.get_by_external_id("ws_b", "same")
    assert a is not None and b is not None and a.id != b.id and b.tags == ()
    await stack.call(key="sk-b", headers={"X-ORQ-IDENTITY-ID": "same"})
    assert stack.last == ResolvedIdentity("same", "header", b.id, [])


LONG = "x" * 256


@pytest.mark.parametrize(
    ("identity", "param", "words"),
    [
        ("user_1", "orq.identity", "object"),
        ({"display_name": "no id"}, "orq.identity.id", "required"),
        ({"id": ""}, "orq.identity.id", "1 to 255"),
        ({"id": "  "}, "orq.identity.id", "not blank"),
        ({"id": LONG}, "orq.identity.id", "at most 255"),
        ({"id": 42}, "orq.identity.id", "string"),
        ({"id": "u", "email": "nope"}, "orq.identity.email", "email address"),
        ({"id": "u", "email": 3}, "orq.identity.email", "string"),
        ({"id": "u", "display_name": ["x"]}, "orq.identity.display_name", "string"),
        ({"id": "u", "logo_url": 1}, "orq.identity.logo_url", "string"),
        (
            {"id": "u", "metadata": {f"k{i}": i for i in range(21)}},
            "orq.identity.metadata",
            "at most 20 keys",
        ),
        (
            {"id": "u", "metadata": [{f"k{i}": i} for i in range(21)]},
            "orq.identity.metadata",
            "at most 20 keys",
        ),
        ({"id": "u", "metadata": "plan=pro"}, "orq.identity.metadata", "object"),
        ({"id": "u", "metadata": [{"a": 1}, "b"]}, "orq.identity.metadata[1]", "object"),
        ({"id": "u", "tags": [str(i) for i in range(11)]}, "orq.identity.tags", "at most 10 tags"),
        ({"id": "u", "tags": "vip"}, "orq.identity.tags", "list"),
        ({"id": "u", "tags": ["ok", 5]}, "orq.identity.tags[1]", "non-empty string"),
        ({"id": "u", "tags": ["ok", "x" * 101]}, "orq.identity.tags[1]", "at most 100"),
    ],
)
async def test_invalid_body_identity_is_400(stack: Stack, identity: Any, param: str, words: str) -> None:
    """Every rule: 400 in OpenAI's shape, `param` naming the field, the message naming the limit."""
    resp = await stack.call({"orq": {"identity": identity}})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_identity"
    assert error["message"].startswith(param) and words in error["message"]
    assert stack.inner.seen == []
    assert (await stack.store.list("ws_a", IdentityQuery())).data == []


async def test_top_level_identity_errors_name_it(stack: Stack) -> None:
    """A top-level identity's errors say `identity.<field>`."""
    resp = await stack.call({"identity": {"id": "u", "email": "bad"}}, path="/v3/router/responses")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "identity.email"


async def test_header_too_long_is_400(stack: Stack) -> None:
    """An identity header beyond 255 characters is a 400 naming the header."""
    resp = await stack.call(headers={"X-ORQ-IDENTITY-ID": LONG})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "X-ORQ-IDENTITY-ID"
    assert "255" in resp.json()["error"]["message"]


def test_lone_surrogates_are_rejected() -> None:
    """Text that cannot be stored as UTF-8 is refused, naming the field."""
    with pytest.raises(ValueError, match=r"orq\.identity\.display_name: must be valid Unicode"):
        parse_body_identity(json.loads('{"id": "u", "display_name": "\\ud800"}'), "orq.identity")


async def test_non_http_and_context_free_requests_pass_through() -> None:
    """Lifespan goes straight to the next app; a request without a RequestContext is a wiring bug, said
    as such (`MissingContext`)."""
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    mw = IdentityMiddleware(inner, store=InMemoryIdentityStore())

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    await mw({"type": "lifespan"}, receive, send)
    with pytest.raises(MissingContext):
        await mw({"type": "http", "headers": [(b"x-orq-identity-id", b"u")]}, receive, send)
    assert seen == ["lifespan"]
