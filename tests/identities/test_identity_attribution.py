"""Attribution end to end: the real `openai` (and `orq_ai_sdk`) clients -> the real proxy -> the fake upstream.

What the identity layer decided is read back from the usage events (a `MemorySink`), the identity records
(through the `/v2/identities` API) and the 30-day metrics; what the upstream saw, from the fake's log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest
from orq_ai_sdk import Orq
from orq_ai_sdk.models import ErrorResponse

from orq_proxy.app import OrqProxy
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.events import UsageEvent

ADMIN = "sk-admin"
USER = "sk-user"
OWNED = "sk-owned"
OTHER_WS = "sk-other"
KEYS = [
    {"key": ADMIN, "id": "admin", "admin": True},
    {"key": USER, "id": "user"},
    # An owner and explicitly "any" (the default with an owner is "owner"): the precedence test names others.
    {"key": OWNED, "id": "owned", "owner": "key-owner", "identities": "any"},
    {"key": OTHER_WS, "id": "other", "workspace": "ws_other", "admin": True},
]
MESSAGES: list[Any] = [{"role": "user", "content": "hello from a tagged user"}]
FULL_IDENTITY = {
    "id": "user_123",
    "display_name": "Ada",
    "email": "ada@example.com",
    "metadata": [{"plan": "pro"}, {"seats": 3}],
    "logo_url": "https://x/l.png",
    "tags": ["beta"],
}


class Proxy:
    def __init__(self, app: OrqProxy, server: ServerThread, sink: MemorySink) -> None:
        self.app, self.server, self.sink = app, server, sink

    def openai(self, key: str = USER, prefix: str = "/v1") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + prefix, api_key=key, max_retries=0)

    def orq(self, key: str = ADMIN) -> Orq:
        return Orq(api_key=key, server_url=self.server.url, timeout_ms=10_000)

    def events(self, n: int, timeout: float = 3.0) -> list[UsageEvent]:
        """The first `n` usage events, once they are there."""
        deadline = time.monotonic() + timeout
        while len(self.sink.events) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} events, got {len(self.sink.events)}")
            time.sleep(0.01)
        return list(self.sink.events[:n])


@pytest.fixture
def proxy(proxy_factory: Any) -> Proxy:
    sink = MemorySink()
    app, server = proxy_factory({"api_keys": KEYS}, sinks=[sink])
    return Proxy(app, server, sink)


def assert_nothing_leaked(fake: FakeUpstream) -> None:
    """Neither the identity nor `orq` reach the upstream, in the body or the headers."""
    assert fake.requests
    for sent in fake.requests:
        assert "orq" not in sent.json and "identity" not in sent.json
        assert "x-orq-identity-id" not in sent.headers and "x-orq-contact-id" not in sent.headers
        assert b"user_123" not in sent.body and b"ada@example.com" not in sent.body


def test_orq_identity_via_openai_sdk(proxy: Proxy, fake: FakeUpstream) -> None:
    """extra_body={"orq": {"identity": ...}}: the request is attributed, the record upserted, metrics fed."""
    out = proxy.openai().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_body={"orq": {"identity": FULL_IDENTITY}}
    )
    [event] = proxy.events(1)
    assert (event.identity, event.identity_source, event.identity_tags) == ("user_123", "body", ["beta"])
    assert_nothing_leaked(fake)
    with proxy.orq() as orq:
        ident = orq.identities.retrieve(id="user_123", include_metrics=True).identity
    assert (ident.display_name, ident.email, ident.avatar_url) == (
        "Ada",
        "ada@example.com",
        "https://x/l.png",
    )
    assert ident.metadata == {"plan": "pro", "seats": 3} and ident.tags == ["beta"]
    assert ident.metrics is not None and out.usage is not None
    assert (ident.metrics.total_requests, ident.metrics.total_tokens) == (1, out.usage.total_tokens)
    assert ident.metrics.total_cost == pytest.approx(event.total_cost_nanos / 1e9)


def test_upsert_changes_only_given_fields(proxy: Proxy, fake: FakeUpstream) -> None:
    """A second call with only an email changes only the email."""
    client = proxy.openai()
    client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_body={"orq": {"identity": FULL_IDENTITY}}
    )
    client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_body={"orq": {"identity": {"id": "user_123", "email": "a@b.io"}}},
    )
    with proxy.orq() as orq:
        ident = orq.identities.retrieve(id="user_123").identity
    assert (ident.display_name, ident.email, ident.tags) == ("Ada", "a@b.io", ["beta"])


def test_streaming_call_is_attributed(proxy: Proxy, fake: FakeUpstream) -> None:
    """A streamed chat completion is attributed and metered like a JSON one."""
    stream = proxy.openai().chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_body={"orq": {"identity": {"id": "streamer"}}}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    [event] = proxy.events(1)
    assert (event.identity, event.identity_source, event.stream) == ("streamer", "body", True)
    assert event.total_tokens > 0
    assert_nothing_leaked(fake)


def test_top_level_identity_on_responses(proxy: Proxy, fake: FakeUpstream) -> None:
    """`/v3/router/responses` carries a top-level `identity` (orq's ResponseIdentity)."""
    proxy.openai(prefix="/v3/router").responses.create(
        model="gpt-4o", input="hi", extra_body={"identity": {"id": "user_123", "tags": ["agents"]}}
    )
    [event] = proxy.events(1)
    assert (event.identity, event.identity_source, event.identity_tags) == ("user_123", "body", ["agents"])
    assert_nothing_leaked(fake)


# orq-ai-sdk 4.17.13 marks its `orq` chat model deprecated and warns when it is built.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_orq_sdk_router_chat(proxy: Proxy, fake: FakeUpstream) -> None:
    """orq's own SDK: `router.chat.completions.create(orq={"identity": ...})` on /v2/router."""
    with Orq(api_key=USER, server_url=proxy.server.url, timeout_ms=10_000) as orq:
        orq.router.chat.completions.create(
            model="openai/gpt-4o-mini", messages=MESSAGES, orq={"identity": FULL_IDENTITY}
        )
    [event] = proxy.events(1)
    assert (event.identity, event.identity_source) == ("user_123", "body")
    assert_nothing_leaked(fake)


def test_header_tags_only(proxy: Proxy, fake: FakeUpstream) -> None:
    """X-ORQ-IDENTITY-ID attributes the call without creating a record; a known record lends its tags."""
    client = proxy.openai()
    client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "hdr-1"}
    )
    with proxy.orq() as orq:
        with pytest.raises(ErrorResponse):
            orq.identities.retrieve(id="hdr-1")
        orq.identities.create(external_id="hdr-2", tags=["known"])
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "hdr-2"}
        )
        first, second = proxy.events(2)
        assert (first.identity, first.identity_source, first.identity_tags) == ("hdr-1", "header", [])
        assert (second.identity, second.identity_source, second.identity_tags) == (
            "hdr-2",
            "header",
            ["known"],
        )
        metrics = orq.identities.retrieve(id="hdr-2", include_metrics=True).identity.metrics
        assert metrics is not None and metrics.total_requests == 1
    assert proxy.app.services.identity_metrics.snapshot("default", "hdr-1")["total_requests"] == 1
    assert_nothing_leaked(fake)


def test_key_owner_tags_only(proxy: Proxy, fake: FakeUpstream) -> None:
    """A key with an owner attributes calls that carry nothing else; no record is created."""
    proxy.openai(key=OWNED).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    [event] = proxy.events(1)
    assert (event.identity, event.identity_source) == ("key-owner", "owner")
    with proxy.orq() as orq:
        assert orq.identities.list().data == []


def test_precedence_all_three_at_once(proxy: Proxy, fake: FakeUpstream) -> None:
    """Body beats header beats key owner."""
    client = proxy.openai(key=OWNED)
    client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_body={"orq": {"identity": {"id": "from-body"}}},
        extra_headers={"X-ORQ-IDENTITY-ID": "from-header"},
    )
    client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "from-header"}
    )
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    proxy.openai(key=USER).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    events = proxy.events(4)
    assert [(e.identity, e.identity_source) for e in events] == [
        ("from-body", "body"),
        ("from-header", "header"),
        ("key-owner", "owner"),
        (None, None),
    ]
    assert_nothing_leaked(fake)


@pytest.mark.parametrize(
    ("identity", "param", "limit"),
    [
        ({"id": "u", "email": "not-an-email"}, "orq.identity.email", "email address"),
        ({"id": "x" * 256}, "orq.identity.id", "255"),
        ({"id": "u", "tags": [str(i) for i in range(11)]}, "orq.identity.tags", "10 tags"),
        ({"id": "u", "metadata": [{str(i): i} for i in range(21)]}, "orq.identity.metadata", "20 keys"),
    ],
)
def test_invalid_identity_is_400(
    proxy: Proxy, fake: FakeUpstream, identity: dict[str, Any], param: str, limit: str
) -> None:
    """An invalid identity never reaches the upstream: BadRequestError naming the field and the limit."""
    with pytest.raises(openai.BadRequestError) as info:
        proxy.openai().chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_body={"orq": {"identity": identity}}
        )
    body = info.value.body
    assert isinstance(body, dict)
    assert body["param"] == param and limit in body["message"]
    assert fake.requests == []
    # Refused by the identity layer, it is still one usage event (status ERROR, its 400, no usage).
    (event,) = proxy.events(1)
    assert (event.status, event.http_status, event.total_tokens, event.identity) == ("ERROR", 400, 0, None)


def test_workspace_isolation_on_calls(proxy: Proxy, fake: FakeUpstream) -> None:
    """The same body id under another workspace's key makes that workspace's own record and metrics."""
    body = {"orq": {"identity": {"id": "shared", "tags": ["a"]}}}
    proxy.openai(key=USER).chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_body=body)
    proxy.openai(key=OTHER_WS).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_body={"orq": {"identity": {"id": "shared"}}}
    )
    first, second = proxy.events(2)
    assert (first.workspace, second.workspace) == ("default", "ws_other")
    with proxy.orq(ADMIN) as a, proxy.orq(OTHER_WS) as b:
        mine = a.identities.retrieve(id="shared", include_metrics=True).identity
        theirs = b.identities.retrieve(id="shared", include_metrics=True).identity
    assert mine.id != theirs.id and (mine.tags, theirs.tags) == (["a"], None)
    assert mine.metrics is not None and theirs.metrics is not None
    assert (mine.metrics.total_requests, theirs.metrics.total_requests) == (1, 1)


def test_sqlite_state_survives_a_restart(proxy_factory: Any, fake: FakeUpstream, tmp_path: Path) -> None:
    """`[storage] state = "sqlite:///..."`: identities upserted by calls are still there after a restart."""
    config = {"api_keys": KEYS, "storage": {"state": f"sqlite://{tmp_path}/state.db"}}
    _, server = proxy_factory(config)
    openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_body={"orq": {"identity": FULL_IDENTITY}}
    )
    with Orq(api_key=ADMIN, server_url=server.url, timeout_ms=10_000) as orq:
        before = orq.identities.retrieve(id="user_123").identity
    server.stop()
    _, again = proxy_factory(config)
    with Orq(api_key=ADMIN, server_url=again.url, timeout_ms=10_000) as orq:
        after = orq.identities.retrieve(id="user_123").identity
        assert after == before
        assert [i.external_id for i in orq.identities.list(filter_by_tags=["beta"]).data] == ["user_123"]
