"""`/v2/identities` through the real `orq_ai_sdk` client against a real proxy on a socket."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from orq_ai_sdk import Orq
from orq_ai_sdk.models import APIDefaultError, ErrorResponse

from orq_proxy.app import OrqProxy
from orq_proxy.identities.metrics import IdentityMetrics
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.events import UsageEvent

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ADMIN_A = "sk-admin-a"
ADMIN_B = "sk-admin-b"
USER_A = "sk-user-a"
KEYS = [
    {"key": ADMIN_A, "workspace": "ws_a", "admin": True, "id": "admin_a"},
    {"key": ADMIN_B, "workspace": "ws_b", "admin": True, "id": "admin_b"},
    {"key": USER_A, "workspace": "ws_a", "id": "user_a"},
]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def proxy(proxy_factory: Any, clock: FakeClock) -> tuple[OrqProxy, ServerThread]:
    app, server = proxy_factory({"api_keys": KEYS}, clock=clock)
    return app, server


@pytest.fixture
def server(proxy: tuple[OrqProxy, ServerThread]) -> ServerThread:
    return proxy[1]


@pytest.fixture(scope="module")
def shared_server(module_proxy_factory: Callable[..., tuple[OrqProxy, ServerThread]]) -> ServerThread:
    """One proxy for the many validation cases that never change state."""
    return module_proxy_factory({"api_keys": KEYS}, clock=FakeClock(START))[1]


@pytest.fixture
def orq(server: ServerThread) -> Iterator[Orq]:
    with Orq(api_key=ADMIN_A, server_url=server.url, timeout_ms=10_000) as client:
        yield client


def raw(
    server: ServerThread,
    method: str,
    path: str,
    key: str | None = ADMIN_A,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> httpx.Response:
    sent = dict(headers or {})
    if key:
        sent["authorization"] = f"Bearer {key}"
    return httpx.request(method, server.url + path, headers=sent, timeout=10, **kw)


def test_create_full_and_retrieve_both_ways(orq: Orq, server: ServerThread) -> None:
    """create -> 201 with every field; retrieve by `_id` and by external_id returns the same record."""
    res = orq.identities.create(
        external_id="user_123",
        display_name="Ada",
        email="ada@example.com",
        avatar_url="https://x/a.png",
        tags=["beta", "vip"],
        metadata={"plan": "pro", "n": 1},
    )
    ident = res.result.identity
    assert ident.external_id == "user_123"
    assert ident.workspace_id == "ws_a"
    assert (ident.display_name, ident.email, ident.avatar_url) == (
        "Ada",
        "ada@example.com",
        "https://x/a.png",
    )
    assert ident.tags == ["beta", "vip"]
    assert ident.metadata == {"plan": "pro", "n": 1}
    assert ident.created == ident.updated == "2026-03-01T12:00:00.000Z"
    assert ident.metrics is None and ident.budget is None
    by_id = orq.identities.retrieve(id=ident.id).identity
    by_ext = orq.identities.retrieve(id="user_123").identity
    assert by_id == by_ext == ident


def test_minimal_identity_omits_absent_fields(orq: Orq, server: ServerThread) -> None:
    """Absent optional fields are omitted on the wire, never null; `_id` is the key for the id."""
    orq.identities.create(external_id="user_min")
    resp = raw(server, "GET", "/v2/identities/user_min")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()["identity"]
    assert set(body) == {"_id", "external_id", "workspace_id", "created", "updated"}
    assert len(body["_id"]) == 26


def test_duplicate_external_id_is_409(orq: Orq) -> None:
    """A second create with the same external_id: 409 {"message", "code": 6}."""
    orq.identities.create(external_id="dup")
    with pytest.raises(APIDefaultError) as info:
        orq.identities.create(external_id="dup", display_name="again")
    assert info.value.status_code == 409
    assert '"code":6' in info.value.body.replace(" ", "")
    assert "dup" in info.value.body


def test_retrieve_unknown_is_typed_404(orq: Orq) -> None:
    """retrieve of an unknown id raises the SDK's typed ErrorResponse with code 5."""
    with pytest.raises(ErrorResponse) as info:
        orq.identities.retrieve(id="does-not-exist")
    assert info.value.status_code == 404
    assert info.value.data.code == 5
    assert "does-not-exist" in info.value.data.message


def test_ids_with_slash_space_and_at(orq: Orq) -> None:
    """An external id with '/', ' ' and '@' round-trips through the path (spec §1.3)."""
    created = orq.identities.create(external_id="org/a b@c").result.identity
    assert orq.identities.retrieve(id="org/a b@c").identity.id == created.id
    updated = orq.identities.update(id="org/a b@c", display_name="Org")
    assert updated.identity.display_name == "Org"
    orq.identities.delete(id="org/a b@c")
    with pytest.raises(ErrorResponse):
        orq.identities.retrieve(id="org/a b@c")


def test_update_changes_only_given_fields(orq: Orq, clock: FakeClock) -> None:
    """PATCH: omitted fields stay; "" clears email; [] clears tags; metadata is replaced; updated moves."""
    orq.identities.create(
        external_id="u1", display_name="Ada", email="a@x.io", tags=["t"], metadata={"a": 1, "b": 2}
    )
    clock.advance(90)
    up = orq.identities.update(id="u1", email="", tags=[], metadata={"plan": "ent"}).identity
    assert up.display_name == "Ada"
    assert up.email is None and up.tags is None
    assert up.metadata == {"plan": "ent"}
    assert up.updated == "2026-03-01T12:01:30.000Z"
    assert up.created == "2026-03-01T12:00:00.000Z"
    same = orq.identities.update(id=up.id).identity
    assert same == up
    with pytest.raises(APIDefaultError) as info:
        orq.identities.update(id="nobody", display_name="x")
    assert info.value.status_code == 404


def test_delete_returns_empty_object(orq: Orq, server: ServerThread) -> None:
    """DELETE -> 200 {} (JSON); the identity is gone; deleting again is 404."""
    orq.identities.create(external_id="gone")
    resp = raw(server, "DELETE", "/v2/identities/gone")
    assert (resp.status_code, resp.json()) == (200, {})
    assert resp.headers["content-type"].startswith("application/json")
    orq.identities.create(external_id="gone2")
    orq.identities.delete(id="gone2")
    with pytest.raises(ErrorResponse):
        orq.identities.retrieve(id="gone2")
    with pytest.raises(APIDefaultError) as info:
        orq.identities.delete(id="gone2")
    assert info.value.status_code == 404


def test_pagination_both_ways(orq: Orq) -> None:
    """25 identities, pages of 10: forward 10/10/5 with has_more, then backward to the first page."""
    for i in range(25):
        orq.identities.create(external_id=f"p{i:02d}")
    default = orq.identities.list()
    assert len(default.data) == 10 and default.has_more  # default limit 10, newest first
    pages = [default]
    while pages[-1].has_more:
        pages.append(orq.identities.list(limit=10, starting_after=pages[-1].data[-1].id))
    names = [[i.external_id for i in p.data] for p in pages]
    assert [len(n) for n in names] == [10, 10, 5]
    assert [n for page in names for n in page] == [f"p{i:02d}" for i in range(24, -1, -1)]
    back1 = orq.identities.list(limit=10, ending_before=pages[2].data[0].id)
    assert [i.external_id for i in back1.data] == names[1] and back1.has_more is True
    back2 = orq.identities.list(limit=10, ending_before=back1.data[0].id)
    assert [i.external_id for i in back2.data] == names[0] and back2.has_more is False
    small = orq.identities.list(limit=3, ending_before=pages[2].data[0].id)
    assert [i.external_id for i in small.data] == names[1][-3:] and small.has_more is True
    top = orq.identities.list(limit=50)
    assert len(top.data) == 25 and top.has_more is False


def test_search_tags_and_sorting(orq: Orq, clock: FakeClock) -> None:
    """search (case-insensitive, three fields), filter_by.tags (all of them), both sort_by values."""
    orq.identities.create(external_id="acme-1", display_name="Zoe", tags=["ent", "eu"])
    clock.advance(1)
    orq.identities.create(external_id="u2", display_name="ada", email="ADA@acme.io", tags=["ent"])
    clock.advance(1)
    orq.identities.create(external_id="u3", display_name="Bob", tags=["eu"])
    clock.advance(1)
    orq.identities.update(id="acme-1", email="z@x.io")

    def ext(page: Any) -> list[str]:
        return [i.external_id for i in page.data]

    assert ext(orq.identities.list(search="ACME")) == ["u2", "acme-1"]
    assert ext(orq.identities.list(search="Ada")) == ["u2"]
    assert ext(orq.identities.list(filter_by_tags=["ent"])) == ["u2", "acme-1"]
    assert ext(orq.identities.list(filter_by_tags=["ent", "eu"])) == ["acme-1"]
    assert ext(orq.identities.list(filter_by_tags=["eu"], search="bo")) == ["u3"]
    assert ext(orq.identities.list(sort_by="IDENTITY_SORT_FIELD_DISPLAY_NAME")) == ["u2", "u3", "acme-1"]
    assert ext(orq.identities.list(sort_by="IDENTITY_SORT_FIELD_UPDATED")) == ["acme-1", "u3", "u2"]
    by_name = orq.identities.list(sort_by="IDENTITY_SORT_FIELD_DISPLAY_NAME", limit=1)
    nxt = orq.identities.list(
        sort_by="IDENTITY_SORT_FIELD_DISPLAY_NAME", limit=1, starting_after=by_name.data[0].id
    )
    assert (ext(nxt), nxt.has_more) == (["u3"], True)


def test_include_metrics(orq: Orq, proxy: tuple[OrqProxy, ServerThread], clock: FakeClock) -> None:
    """include_metrics adds the four 30-day figures, fed by the metrics rings; zeros when idle."""
    orq.identities.create(external_id="m1")
    orq.identities.create(external_id="m2")
    metrics: IdentityMetrics = proxy[0].services.identity_metrics
    for status in ("OK", "OK", "ERROR"):
        metrics.record(
            UsageEvent(
                event_id="e",
                timestamp=clock.now(),
                workspace="ws_a",
                project="p",
                api_key_id="k",
                identity="m1",
                status=status,
                total_tokens=542,
                total_cost_nanos=3_897_000,
            )
        )
    got = orq.identities.retrieve(id="m1", include_metrics=True).identity.metrics
    assert got is not None
    assert (got.total_tokens, got.total_cost, got.total_requests) == (1626, 0.011691, 3)
    assert got.error_rate == pytest.approx(1 / 3)
    listed = orq.identities.list(include_metrics=True).data
    assert [(i.external_id, i.metrics.total_requests if i.metrics else None) for i in listed] == [
        ("m2", 0),
        ("m1", 3),
    ]
    assert orq.identities.list(include_metrics=False).data[0].metrics is None
    assert orq.identities.retrieve(id="m1").identity.metrics is None


def test_include_budget_and_delete_cleans_budgets(orq: Orq) -> None:
    """include_budget embeds the identity-scoped budget (snake_case, no usage); DELETE removes it too."""
    orq.identities.create(external_id="with-budget")
    orq.identities.create(external_id="plain")
    created = orq.budgets.create(
        scope={"identity": {"identity_external_id": "with-budget"}},
        limits={"period": "BUDGET_PERIOD_MONTHLY", "amount": 10.0, "token_limit": 100_000},
    )
    budget_id = created.budget.budget_id
    got = orq.identities.retrieve(id="with-budget", include_budget=True).identity
    assert got.budget is not None
    assert got.budget.budget_id == budget_id
    assert (got.budget.limits.amount, got.budget.limits.token_limit) == (10.0, 100_000)
    assert got.budget.usage is None
    assert orq.identities.retrieve(id="with-budget").identity.budget is None
    listed = orq.identities.list(include_budget=True).data
    assert [(i.external_id, i.budget is not None) for i in listed] == [
        ("plain", False),
        ("with-budget", True),
    ]
    orq.identities.delete(id="with-budget")
    assert [b.budget_id for b in orq.budgets.list().data] == []


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=51", "limit"),
        ("limit=ten", "limit"),
        ("limit=5&limit=6", "limit"),
        ("search=a", "search"),
        ("search=" + "x" * 256, "search"),
        ("sort_by=NAME", "sort_by"),
        ("include_metrics=yes", "include_metrics"),
        ("include_budget=2", "include_budget"),
        ("starting_after=A&ending_before=B", "starting_after"),
        ("starting_after=" + "x" * 256, "starting_after"),
        ("sort_by=IDENTITY_SORT_FIELD_UPDATED&starting_after=01JZNOPE", "starting_after"),
        ("sort_by=IDENTITY_SORT_FIELD_DISPLAY_NAME&ending_before=01JZNOPE", "ending_before"),
        ("&".join(f"filter_by.tags=t{i}" for i in range(11)), "filter_by.tags"),
    ],
)
def test_invalid_list_params_are_400_naming_the_parameter(
    shared_server: ServerThread, query: str, param: str
) -> None:
    """Every bad query value: 400 in orq's shape (code 3) whose message names the parameter."""
    resp = raw(shared_server, "GET", "/v2/identities?" + query)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["code"] == 3
    assert body["message"].startswith(param)


def test_invalid_list_param_through_the_sdk(orq: Orq) -> None:
    """The SDK surfaces a 400 as APIDefaultError."""
    with pytest.raises(APIDefaultError) as info:
        orq.identities.list(limit=0)
    assert info.value.status_code == 400
    assert "limit" in info.value.body


def test_retrieve_query_params_are_checked(shared_server: ServerThread) -> None:
    """include_metrics / include_budget on retrieve must be booleans too."""
    raw(shared_server, "POST", "/v2/identities", json={"external_id": "q"})
    resp = raw(shared_server, "GET", "/v2/identities/q?include_metrics=sure")
    assert resp.status_code == 400 and resp.json()["message"].startswith("include_metrics")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"external_id": ""}, "external_id"),
        ({"external_id": "   "}, "external_id"),
        ({"external_id": "x" * 256}, "external_id"),
        ({"display_name": "no id"}, "external_id"),
        ({"external_id": 12}, "external_id"),
        ({"external_id": "u", "email": "not-an-email"}, "email"),
        ({"external_id": "u", "tags": [f"t{i}" for i in range(11)]}, "tags"),
        ({"external_id": "u", "tags": ["ok", ""]}, "tags"),
        ({"external_id": "u", "tags": "vip"}, "tags"),
        ({"external_id": "u", "metadata": {f"k{i}": i for i in range(21)}}, "metadata"),
        ({"external_id": "u", "metadata": ["a"]}, "metadata"),
        ({"external_id": "u", "display_name": 5}, "display_name"),
        ({"external_id": "u", "logo_url": "https://x"}, "logo_url"),
    ],
)
def test_invalid_create_bodies_are_400_naming_the_field(
    shared_server: ServerThread, body: Any, field: str
) -> None:
    """A bad field in a create body: 400 whose message names the field (and the limit)."""
    resp = raw(shared_server, "POST", "/v2/identities", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["code"] == 3
    assert resp.json()["message"].startswith(field)


def test_limits_are_named(shared_server: ServerThread) -> None:
    """The limit itself is in the message."""
    resp = raw(
        shared_server,
        "POST",
        "/v2/identities",
        json={"external_id": "u", "tags": [str(i) for i in range(11)]},
    )
    assert "at most 10 tags" in resp.json()["message"]
    resp = raw(
        shared_server,
        "POST",
        "/v2/identities",
        json={"external_id": "u", "metadata": {str(i): i for i in range(21)}},
    )
    assert "at most 20 keys" in resp.json()["message"]
    resp = raw(shared_server, "PATCH", "/v2/identities/u", json={"email": "nope"})
    assert resp.status_code == 400 and resp.json()["message"].startswith("email")


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b""])
def test_create_needs_a_json_object(shared_server: ServerThread, body: bytes) -> None:
    """A body that is not a JSON object is a 400."""
    resp = raw(
        shared_server, "POST", "/v2/identities", content=body, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400


def test_auth_401_and_403(shared_server: ServerThread) -> None:
    """No key or an unknown key: typed 401 (code 16); a non-admin key: 403 (code 7)."""
    with Orq(server_url=shared_server.url, timeout_ms=10_000) as anon, pytest.raises(ErrorResponse) as info:
        anon.identities.list()
    assert info.value.status_code == 401 and info.value.data.code == 16
    with Orq(api_key="sk-wrong", server_url=shared_server.url, timeout_ms=10_000) as wrong:
        with pytest.raises(ErrorResponse) as info:
            wrong.identities.create(external_id="x")
        assert info.value.status_code == 401
        with pytest.raises(ErrorResponse) as info:
            wrong.identities.retrieve(id="x")
        assert info.value.status_code == 401
    with Orq(api_key=USER_A, server_url=shared_server.url, timeout_ms=10_000) as user:
        with pytest.raises(APIDefaultError) as denied:
            user.identities.list()
        assert denied.value.status_code == 403 and '"code":7' in denied.value.body.replace(" ", "")
    for method, path in [("PATCH", "/v2/identities/x"), ("DELETE", "/v2/identities/x")]:
        assert raw(shared_server, method, path, key=None).status_code == 401
        assert raw(shared_server, method, path, key=USER_A).status_code == 403


def test_workspaces_are_isolated(orq: Orq, server: ServerThread) -> None:
    """A key of workspace B never reads, lists, changes or deletes workspace A's identities."""
    a = orq.identities.create(external_id="shared-name", tags=["t"]).result.identity
    with Orq(api_key=ADMIN_B, server_url=server.url, timeout_ms=10_000) as b:
        assert b.identities.list().data == []
        assert b.identities.list(filter_by_tags=["t"]).data == []
        assert b.identities.list(search="shared").data == []
        for ref in (a.id, "shared-name"):
            with pytest.raises(ErrorResponse):
                b.identities.retrieve(id=ref)
            with pytest.raises(APIDefaultError):
                b.identities.update(id=ref, display_name="hijack")
            with pytest.raises(APIDefaultError):
                b.identities.delete(id=ref)
        own = b.identities.create(external_id="shared-name").result.identity
        assert own.id != a.id and own.workspace_id == "ws_b"
    still = orq.identities.retrieve(id=a.id).identity
    assert still.display_name is None and still.workspace_id == "ws_a"
    assert [i.id for i in orq.identities.list().data] == [a.id]
