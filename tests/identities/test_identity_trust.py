"""Trusted attribution end to end: which identities a key may name (`[[api_keys]] identities`).

The real `openai` client -> the real proxy (on a socket) -> the fake upstream. A refusal is read back from the
client's error, the usage events (a `MemorySink`), the identity store (a spy that records every call) and
the fake's request log.
"""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from orq_ai_sdk import Orq
from pydantic import ValidationError

from orq_proxy.app import OrqProxy
from orq_proxy.auth import Principal, keyring_from_config
from orq_proxy.config import ConfigError, ProxyConfig, load_config
from orq_proxy.identities.models import Identity, IdentityFields
from orq_proxy.identities.store import InMemoryIdentityStore
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.events import UsageEvent

README = Path(__file__).resolve().parents[2] / "README.md"
ADMIN = "sk-admin"
ALICE = "sk-alice"  # a user's key: owner alice, default rule ("owner")
ACME = "sk-acme"  # one tenant's backend: only ids starting with "acme-"
BACKEND = "sk-backend"  # a backend's key: no owner, default rule ("any")
DELEGATE = "sk-delegate"  # an owner and explicitly "any"
KEYS = [
    {"key": ADMIN, "id": "admin", "admin": True},
    {"key": ALICE, "id": "alice-key", "owner": "alice"},
    {
        "key": ACME,
        "id": "acme-backend",
        "owner": "acme-ops",
        "identities": "prefix",
        "identity_prefix": "acme-",
    },
    {"key": BACKEND, "id": "backend"},
    {"key": DELEGATE, "id": "delegate", "owner": "dana", "identities": "any"},
]
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
OWNER_RULE = "this API key may only attribute calls to its owner 'alice'"


class SpyStore(InMemoryIdentityStore):
    """The in-memory store, recording the external id of every upsert and lookup the proxy makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    async def upsert(self, workspace: str, external_id: str, fields: IdentityFields) -> Identity:
        self.calls.append(("upsert", external_id))
        return await super().upsert(workspace, external_id, fields)

    async def get_by_external_id(self, workspace: str, external_id: str) -> Identity | None:
        self.calls.append(("get", external_id))
        return await super().get_by_external_id(workspace, external_id)


class Proxy:
    def __init__(self, app: OrqProxy, server: ServerThread, sink: MemorySink, store: SpyStore) -> None:
        self.app, self.server, self.sink, self.store = app, server, sink, store

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=key, max_retries=0)

    def chat(self, key: str, **kwargs: Any) -> Any:
        return self.openai(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kwargs)

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
    sink, store = MemorySink(), SpyStore()
    app, server = proxy_factory({"api_keys": KEYS}, sinks=[sink], identity_store=store)
    return Proxy(app, server, sink, store)


def assert_refused(
    proxy: Proxy, fake: FakeUpstream, info: pytest.ExceptionInfo[Any], param: str, rule: str
) -> None:
    """A 403 identity_not_allowed naming the rule and where the identity came from; nothing stored,
    nothing forwarded, one ERROR event with its 403."""
    body = info.value.body
    assert isinstance(body, dict)
    assert (info.value.status_code, body["code"], body["type"], body["param"]) == (
        403,
        "identity_not_allowed",
        "permission_error",
        param,
    )
    assert rule in body["message"]
    assert info.value.response.headers["x-should-retry"] == "false"
    assert proxy.store.calls == []
    assert fake.requests == []
    [event] = proxy.events(1)
    assert (event.status, event.http_status, event.total_tokens, event.total_cost_nanos) == (
        "ERROR",
        403,
        0,
        0,
    )
    assert event.identity is None


def test_owner_key_naming_another_identity_in_the_body_is_403(proxy: Proxy, fake: FakeUpstream) -> None:
    """`orq.identity` naming bob with alice's key: 403, bob is not upserted, nothing reaches the upstream."""
    with pytest.raises(openai.PermissionDeniedError) as info:
        proxy.chat(ALICE, extra_body={"orq": {"identity": {"id": "bob", "email": "bob@example.com"}}})
    assert_refused(proxy, fake, info, "orq.identity.id", OWNER_RULE)
    assert "'bob'" in info.value.body["message"]  # type: ignore[index]
    with Orq(api_key=ADMIN, server_url=proxy.server.url, timeout_ms=10_000) as orq:
        assert orq.identities.list().data == []


@pytest.mark.parametrize(
    ("extra_body", "param"),
    [
        ({"identity": {"id": "bob"}}, "identity.id"),
        ({"orq": {"contact": {"id": "bob"}}}, "orq.contact.id"),
    ],
)
def test_other_body_sources_are_refused_too(
    proxy: Proxy, fake: FakeUpstream, extra_body: dict[str, Any], param: str
) -> None:
    """A top-level `identity` and the deprecated `orq.contact` are held to the same rule."""
    with pytest.raises(openai.PermissionDeniedError) as info:
        proxy.chat(ALICE, extra_body=extra_body)
    assert_refused(proxy, fake, info, param, OWNER_RULE)


@pytest.mark.parametrize("header", ["X-ORQ-IDENTITY-ID", "X-ORQ-CONTACT-ID"])
def test_owner_key_naming_another_identity_in_the_header_is_403(
    proxy: Proxy, fake: FakeUpstream, header: str
) -> None:
    """The identity header naming bob with alice's key: 403 whose `param` is the header; no lookup."""
    with pytest.raises(openai.PermissionDeniedError) as info:
        proxy.chat(ALICE, extra_headers={header: "bob"})
    assert_refused(proxy, fake, info, header, OWNER_RULE)


def test_owner_key_naming_itself_is_allowed(proxy: Proxy, fake: FakeUpstream) -> None:
    """Alice's key may name alice, in the body (upserted, so she may keep her own record) or the header."""
    proxy.chat(ALICE, extra_body={"orq": {"identity": {"id": "alice", "email": "alice@example.com"}}})
    proxy.chat(ALICE, extra_headers={"X-ORQ-IDENTITY-ID": "alice"})
    first, second = proxy.events(2)
    assert [(e.status, e.identity, e.identity_source) for e in (first, second)] == [
        ("OK", "alice", "body"),
        ("OK", "alice", "header"),
    ]
    assert len(fake.requests) == 2
    with Orq(api_key=ADMIN, server_url=proxy.server.url, timeout_ms=10_000) as orq:
        assert orq.identities.retrieve(id="alice").identity.email == "alice@example.com"


def test_owner_key_naming_nothing_is_attributed_to_its_owner(proxy: Proxy, fake: FakeUpstream) -> None:
    """The owner fallback is always allowed, whatever the rule."""
    proxy.chat(ALICE)
    proxy.chat(ACME)
    first, second = proxy.events(2)
    assert (first.identity, first.identity_source, first.status) == ("alice", "owner", "OK")
    assert (second.identity, second.identity_source, second.status) == ("acme-ops", "owner", "OK")


def test_prefix_key(proxy: Proxy, fake: FakeUpstream) -> None:
    """A "prefix" key may name ids that start with its prefix (and its owner), nothing else."""
    proxy.chat(ACME, extra_body={"orq": {"identity": {"id": "acme-u1"}}})
    proxy.chat(ACME, extra_headers={"X-ORQ-IDENTITY-ID": "acme-u2"})
    proxy.chat(ACME, extra_headers={"X-ORQ-IDENTITY-ID": "acme-ops"})
    assert [(e.status, e.identity) for e in proxy.events(3)] == [
        ("OK", "acme-u1"),
        ("OK", "acme-u2"),
        ("OK", "acme-ops"),
    ]
    for kwargs, param in [
        ({"extra_body": {"orq": {"identity": {"id": "globex-u1"}}}}, "orq.identity.id"),
        ({"extra_headers": {"X-ORQ-IDENTITY-ID": "Acme-u1"}}, "X-ORQ-IDENTITY-ID"),  # case-sensitive
    ]:
        with pytest.raises(openai.PermissionDeniedError) as info:
            proxy.chat(ACME, **kwargs)
        body = info.value.body
        assert isinstance(body, dict) and (body["code"], body["param"]) == ("identity_not_allowed", param)
        assert "identities starting with 'acme-' or to its owner 'acme-ops'" in body["message"]
    events = proxy.events(5)
    assert [(e.status, e.http_status) for e in events[3:]] == [("ERROR", 403), ("ERROR", 403)]
    assert len(fake.requests) == 3
    with Orq(api_key=ADMIN, server_url=proxy.server.url, timeout_ms=10_000) as orq:
        assert [i.external_id for i in orq.identities.list().data] == ["acme-u1"]


@pytest.mark.parametrize("key", [BACKEND, DELEGATE])
def test_any_key_may_name_anyone(proxy: Proxy, fake: FakeUpstream, key: str) -> None:
    """A key without an owner, and one with an owner and `identities = "any"`, may name any identity."""
    proxy.chat(key, extra_body={"orq": {"identity": {"id": "bob"}}})
    proxy.chat(key, extra_headers={"X-ORQ-IDENTITY-ID": "carol"})
    assert [(e.status, e.identity) for e in proxy.events(2)] == [("OK", "bob"), ("OK", "carol")]
    assert len(fake.requests) == 2


def test_owner_budget_is_not_dodged(proxy: Proxy, fake: FakeUpstream) -> None:
    """Alice spends her budget until it refuses her (429); then naming bob (body or header) is a 403,
    never a 200 charged to bob."""
    created = httpx.post(
        proxy.server.url + "/v2/budgets",
        headers={"authorization": f"Bearer {ADMIN}"},
        json={
            "scope": {"identity": {"identity_external_id": "alice"}},
            "limits": {"period": "BUDGET_PERIOD_DAILY", "token_limit": 100},
        },
    )
    assert created.status_code == 200, created.text
    spent = 0
    while True:  # alice spends until her budget refuses her
        try:
            proxy.chat(ALICE, max_tokens=10)
        except openai.RateLimitError:
            break
        spent += 1
        assert spent < 20, "the budget never refused alice"
    assert spent >= 1
    forwarded = len(fake.requests)
    for kwargs in (
        {"extra_body": {"orq": {"identity": {"id": "bob"}}}},
        {"extra_headers": {"X-ORQ-IDENTITY-ID": "bob"}},
    ):
        with pytest.raises(openai.PermissionDeniedError) as info:
            proxy.chat(ALICE, max_tokens=10, **kwargs)
        assert info.value.body["code"] == "identity_not_allowed"  # type: ignore[index]
    events = proxy.events(spent + 3)
    assert [(e.status, e.http_status, e.identity) for e in events] == [
        *[("OK", 200, "alice")] * spent,
        ("ERROR", 429, "alice"),
        ("ERROR", 403, None),
        ("ERROR", 403, None),
    ]
    assert len(fake.requests) == forwarded == spent
    assert ("upsert", "bob") not in proxy.store.calls and ("get", "bob") not in proxy.store.calls


def test_stream_is_refused_before_anything_is_sent(proxy: Proxy, fake: FakeUpstream) -> None:
    """A streaming request naming another identity gets a JSON 403, no SSE bytes, nothing forwarded."""
    with httpx.stream(
        "POST",
        proxy.server.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {ALICE}", "X-ORQ-IDENTITY-ID": "bob"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
    ) as response:
        assert response.status_code == 403
        assert response.headers["content-type"].startswith("application/json")
        body = response.read()
    assert b"data:" not in body
    assert httpx.Response(403, content=body).json()["error"]["code"] == "identity_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as info:
        proxy.chat(ALICE, stream=True, extra_body={"orq": {"identity": {"id": "bob"}}})
    assert info.value.body["param"] == "orq.identity.id"  # type: ignore[index]
    assert fake.requests == [] and proxy.store.calls == []
    assert [(e.status, e.http_status, e.stream) for e in proxy.events(2)] == [
        ("ERROR", 403, True),
        ("ERROR", 403, True),
    ]


def test_invalid_identity_is_still_400_first(proxy: Proxy, fake: FakeUpstream) -> None:
    """A malformed identity is a 400 naming the field before the key's rule is looked at."""
    with pytest.raises(openai.BadRequestError) as info:
        proxy.chat(ALICE, extra_body={"orq": {"identity": {"id": "bob", "email": "nope"}}})
    assert info.value.body["param"] == "orq.identity.email"  # type: ignore[index]
    assert fake.requests == [] and proxy.store.calls == []


@pytest.mark.parametrize(
    ("principal", "allowed", "refused"),
    [
        (Principal("w", "p", "k"), ["anyone"], []),
        (Principal("w", "p", "k", owner="alice"), ["alice"], ["bob", "alice2", ""]),
        (Principal("w", "p", "k", owner="alice", admin=True), ["alice"], ["bob"]),  # same rule for admins
        (Principal("w", "p", "k", admin=True), ["anyone"], []),
        (Principal("w", "p", "k", owner="alice", identities="any"), ["alice", "bob"], []),
        (Principal("w", "p", "k", identities="prefix", identity_prefix="acme-"), ["acme-1"], ["acme", "x"]),
        # Fails closed when the config's checks are bypassed: nothing but the owner.
        (Principal("w", "p", "k", identities="prefix"), [], ["anyone", ""]),
        (Principal("w", "p", "k", owner="o", identities="prefix", identity_prefix=""), ["o"], ["x"]),
        (Principal("w", "p", "k", identities="owner"), [], ["anyone"]),
    ],
)
def test_principal_rule_table(principal: Principal, allowed: list[str], refused: list[str]) -> None:
    """`Principal.identity_refusal`: None for the allowed ids, a sentence naming the rule for the rest."""
    for external_id in allowed:
        assert principal.identity_refusal(external_id) is None, external_id
    for external_id in refused:
        reason = principal.identity_refusal(external_id)
        assert reason is not None and reason.startswith("this API key may "), external_id


def test_keyring_carries_the_rule() -> None:
    """`keyring_from_config` hands each key's rule to its `Principal`; the default follows the owner."""
    ring = keyring_from_config(ProxyConfig.model_validate({"api_keys": KEYS}))
    scopes = {
        key: p.identity_scope
        for key in (ADMIN, ALICE, ACME, BACKEND, DELEGATE)
        if (p := ring.authenticate(key))
    }
    assert scopes == {ADMIN: "any", ALICE: "owner", ACME: "prefix", BACKEND: "any", DELEGATE: "any"}
    acme = ring.authenticate(ACME)
    assert acme is not None and acme.identity_prefix == "acme-"


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        ({"identities": "owner"}, 'identities = "owner" needs an owner'),
        ({"identities": "owner", "owner": ""}, 'identities = "owner" needs an owner'),
        ({"identities": "prefix", "owner": "a"}, 'identities = "prefix" needs a non-empty identity_prefix'),
        (
            {"identities": "prefix", "identity_prefix": ""},
            'identities = "prefix" needs a non-empty identity_prefix',
        ),
        ({"identity_prefix": "acme-"}, 'identity_prefix only applies with identities = "prefix"'),
        ({"identity_prefix": "acme-", "identities": "any"}, 'set identities = "prefix"'),
        ({"identities": "some"}, "'any', 'owner' or 'prefix'"),
    ],
)
def test_invalid_combinations_are_config_errors(entry: dict[str, Any], rule: str) -> None:
    """Each invalid combination is a ValidationError at the entry's index, naming its id and the rule."""
    data = {"api_keys": [{"key": "sk-a"}, {"key": "sk-b", "id": "k2", **entry}]}
    with pytest.raises(ValidationError) as info:
        ProxyConfig.model_validate(data)
    [error] = info.value.errors()
    assert error["loc"][:2] == ("api_keys", 1)
    assert rule in error["msg"]
    if "needs" in rule or "applies" in rule:
        assert "[[api_keys]] entry id='k2'" in error["msg"]


def test_config_error_from_a_file_names_the_entry(tmp_path: Path) -> None:
    """From a TOML file the `ConfigError` says `api_keys.<index>`, the id and the rule."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstreams.openai]\nbase_url = "http://127.0.0.1:1/v1"\n\n'
        '[[api_keys]]\nkey = "sk-a"\n\n[[api_keys]]\nkey = "sk-b"\nid = "svc"\nidentities = "owner"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert (
        "api_keys.1" in message and "id='svc'" in message and 'identities = "owner" needs an owner' in message
    )
    assert "sk-b" not in message  # the key itself is never quoted


def test_readme_api_keys_example_is_valid() -> None:
    """The README's Configuration example: a backend's key ("any") and a user's key ("owner"), both valid."""
    text = README.read_text()
    section = text[text.index("\n## Configuration") :]
    block = re.search(r"```toml\n(.*?)```", section, flags=re.S)
    assert block is not None
    entries = tomllib.loads(block.group(1))["api_keys"]
    ring = keyring_from_config(ProxyConfig.model_validate({"api_keys": entries}))
    principals = [ring.authenticate(entry["key"]) for entry in entries]
    assert [(p.key_id, p.owner, p.identity_scope) for p in principals if p] == [
        ("backend", None, "any"),
        ("alice", "alice", "owner"),
    ]
