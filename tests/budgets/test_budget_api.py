"""`/v2/budgets` through the real `orq_ai_sdk` client against a real proxy (`build_app`) on a socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from orq_ai_sdk import Orq
from orq_ai_sdk.models import APIDefaultError, BudgetAlert, ErrorResponse

from orq_proxy.app import OrqProxy
from orq_proxy.budgets.counters import InMemoryCounters, Reservation
from orq_proxy.budgets.store import InMemoryBudgetStore
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.servers import ServerThread

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ADMIN_A = "sk-admin-a"
ADMIN_B = "sk-admin-b"
USER_A = "sk-user-a"
KEYS = [
    {"key": ADMIN_A, "workspace": "ws_a", "admin": True, "id": "admin_a"},
    {"key": ADMIN_B, "workspace": "ws_b", "admin": True, "id": "admin_b"},
    {"key": USER_A, "workspace": "ws_a", "id": "user_a"},
]
NOTIFIERS = {"n1": {"url": "http://127.0.0.1:9/hook"}, "n2": {"url": "http://127.0.0.1:9/hook2"}}
USD = 1_000_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def proxy(proxy_factory: Any, clock: FakeClock) -> tuple[OrqProxy, ServerThread]:
    app, server = proxy_factory({"api_keys": KEYS, "notifiers": NOTIFIERS}, clock=clock)
    return app, server


@pytest.fixture
def server(proxy: tuple[OrqProxy, ServerThread]) -> ServerThread:
    return proxy[1]


@pytest.fixture(scope="module")
def shared_server(module_proxy_factory: Callable[..., tuple[OrqProxy, ServerThread]]) -> ServerThread:
    """One proxy for the validation cases that never change state."""
    return module_proxy_factory({"api_keys": KEYS, "notifiers": NOTIFIERS}, clock=FakeClock(START))[1]


@pytest.fixture
def orq(server: ServerThread) -> Iterator[Orq]:
    with Orq(api_key=ADMIN_A, server_url=server.url, timeout_ms=10_000) as client:
        yield client


def raw(server: ServerThread, method: str, path: str, key: str | None = ADMIN_A, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=10, **kw)


def test_create_full_budget_as_captured(orq: Orq, server: ServerThread) -> None:
    """The spec's full create request gives 200 and a camelCase budget without usage."""
    created = orq.budgets.create(
        scope={"identity": {"identity_external_id": "user_123"}},
        limits={"period": "BUDGET_PERIOD_MONTHLY", "amount": 10.5, "token_limit": 100000},
        rate_limit={"requests_per_minute": 60},
        is_active=True,
        expires_at=datetime(2027, 1, 1, tzinfo=UTC),
        alerts=[
            BudgetAlert(threshold_percent=80, notifier_ids=["n1"], dimension="BUDGET_ALERT_DIMENSION_COST")
        ],
    )
    budget = created.budget
    assert budget.scope is not None and budget.scope.identity is not None
    assert budget.scope.identity.identity_external_id == "user_123"
    assert budget.match is not None and budget.match.cel == 'identity == "user_123"'
    assert budget.limits.amount == 10.5 and budget.limits.token_limit == 100000
    assert budget.limits.period == "BUDGET_PERIOD_MONTHLY"
    assert budget.rate_limit is not None and budget.rate_limit.requests_per_minute == 60
    assert budget.is_active is True and budget.usage is None
    assert budget.expires_at == datetime(2027, 1, 1, tzinfo=UTC)
    assert budget.created_at == START
    assert budget.alerts is not None and budget.alerts[0].id and budget.alerts[0].threshold_percent == 80
    wire = raw(server, "GET", f"/v2/budgets/{budget.budget_id}").json()["budget"]
    assert wire["isActive"] is True and wire["usage"] == {"amount": 0, "tokens": 0, "requests": 0}
    assert wire["createdAt"] == "2026-03-10T12:00:00Z"


def test_every_scope_kind_and_cel(orq: Orq) -> None:
    """Each of the six scopes and a CEL match create a budget; the list filters by scope kind."""
    scopes: list[Any] = [
        {"workspace": {}},
        {"project": {"project_id": "p1"}},
        {"identity": {"identity_external_id": "u1"}},
        {"api_key": {"api_key_id": "k1"}},
        {"provider": {"provider": "openai"}},
        {"model": {"model_id": "openai/gpt-4o"}},
    ]
    for scope in scopes:
        orq.budgets.create(scope=scope, limits={"period": "BUDGET_PERIOD_DAILY", "amount": 1.0})
    custom = orq.budgets.create(match={"cel": 'metadata.team == "ml"'}, limits={"token_limit": 5000.0}).budget
    assert custom.scope is None and custom.match is not None and custom.match.cel == 'metadata.team == "ml"'
    listed = orq.budgets.list(limit=200)
    assert len(listed.data) == 7 and listed.has_more is False
    assert all(b.usage is not None and b.usage.requests == 0 for b in listed.data)
    kinds = orq.budgets.list(scope_kind=["BUDGET_SCOPE_KIND_API_KEY", "BUDGET_SCOPE_KIND_MODEL"]).data
    assert {(b.scope.api_key is not None, b.scope.model is not None) for b in kinds if b.scope} == {
        (True, False),
        (False, True),
    }
    assert [b.budget_id for b in orq.budgets.list(scope_target_id="p1").data] != []
    assert {b.budget_id for b in orq.budgets.list(query="TEAM").data} == {custom.budget_id}


def test_duplicate_scope_target_is_409(orq: Orq, server: ServerThread) -> None:
    """A second budget for the same scope target conflicts; another workspace may have its own."""
    first = orq.budgets.create(
        scope={"provider": {"provider": "openai"}}, rate_limit={"requests_per_minute": 5}
    )
    with pytest.raises(APIDefaultError) as info:
        orq.budgets.create(scope={"provider": {"provider": "openai"}}, limits={"amount": 1.0})
    assert info.value.status_code == 409
    response = raw(
        server,
        "POST",
        "/v2/budgets",
        json={"scope": {"provider": {"provider": "openai"}}, "limits": {"amount": 1}},
    )
    assert response.status_code == 409
    assert response.json()["code"] == 6 and first.budget.budget_id in response.json()["message"]
    with Orq(api_key=ADMIN_B, server_url=server.url) as other:
        other.budgets.create(scope={"provider": {"provider": "openai"}}, limits={"amount": 1.0})


def test_get_unknown_and_other_workspace_is_404(orq: Orq, server: ServerThread) -> None:
    """Unknown ids, and ids of another workspace, are 404 with gRPC code 5."""
    created = orq.budgets.create(scope={"workspace": {}}, limits={"amount": 1.0}).budget
    with pytest.raises(APIDefaultError) as info:
        orq.budgets.get(budget_id="01JZBUDGET000000000000001")
    assert info.value.status_code == 404
    for method in ("GET", "PATCH", "DELETE"):
        response = raw(server, method, f"/v2/budgets/{created.budget_id}", key=ADMIN_B, json={})
        assert response.status_code == 404 and response.json() == {
            "message": f"budget {created.budget_id!r} not found",
            "code": 5,
        }
    response = raw(server, "POST", f"/v2/budgets/{created.budget_id}/reset-consumption", key=ADMIN_B, json={})
    assert response.status_code == 404


def test_admin_keys_only(server: ServerThread) -> None:
    """No key: 401 typed error; a non-admin key: 403 (typed on get)."""
    with Orq(server_url=server.url) as anonymous, pytest.raises(ErrorResponse) as info:
        anonymous.budgets.list()
    assert info.value.status_code == 401 and info.value.data.code == 16
    with Orq(api_key=USER_A, server_url=server.url) as user:
        with pytest.raises(ErrorResponse) as forbidden:
            user.budgets.get(budget_id="x")
        assert forbidden.value.status_code == 403 and forbidden.value.data.code == 7
        with pytest.raises(APIDefaultError) as info2:
            user.budgets.create(scope={"workspace": {}}, limits={"amount": 1.0})
        assert info2.value.status_code == 403


def test_update_semantics(orq: Orq, clock: FakeClock) -> None:
    """Omitted fields stay; limits/rate_limit merge field by field; expiry clears; alerts are edited by id."""
    created = orq.budgets.create(
        scope={"identity": {"identity_external_id": "u1"}},
        limits={"period": "BUDGET_PERIOD_MONTHLY", "amount": 10.0, "token_limit": 1000},
        rate_limit={"requests_per_minute": 60},
        expires_at=START + timedelta(days=30),
        alerts=[
            BudgetAlert(threshold_percent=50, notifier_ids=["n1"]),
            BudgetAlert(threshold_percent=90, notifier_ids=["n1"]),
        ],
    ).budget
    assert created.alerts is not None
    a50, a90 = created.alerts[0].id, created.alerts[1].id
    clock.advance(60)
    updated = orq.budgets.update(budget_id=created.budget_id, is_active=False).budget
    assert updated.is_active is False and updated.limits.amount == 10.0 and updated.limits.token_limit == 1000
    assert updated.rate_limit is not None and updated.expires_at is not None and updated.alerts is not None
    assert len(updated.alerts) == 2 and updated.updated_at == START + timedelta(seconds=60)
    assert updated.created_at == START and updated.usage is None

    updated = orq.budgets.update(
        budget_id=created.budget_id,
        limits={"period": "BUDGET_PERIOD_MONTHLY", "amount": 20.0},
        rate_limit={"requests_per_minute": 10},
        clear_expires_at=True,
        alerts=[
            BudgetAlert(id=a90, threshold_percent=95, notifier_ids=["n2"]),
            BudgetAlert(threshold_percent=30, notifier_ids=["n1"]),
        ],
    ).budget
    assert updated.limits.amount == 20.0 and updated.limits.token_limit == 1000  # limits merged
    assert updated.rate_limit is not None and updated.rate_limit.requests_per_minute == 10
    assert updated.expires_at is None
    assert updated.alerts is not None
    assert [(a.id == a90, a.threshold_percent, a.notifier_ids) for a in updated.alerts] == [
        (True, 95, ["n2"]),
        (False, 30, ["n1"]),
    ]
    assert a50 not in {a.id for a in updated.alerts}

    updated = orq.budgets.update(budget_id=created.budget_id, clear_alerts=True).budget
    assert updated.alerts is None
    fetched = orq.budgets.get(budget_id=created.budget_id).budget
    assert fetched.limits.amount == 20.0 and fetched.alerts is None and fetched.is_active is False


def test_update_merges_limits_field_by_field(orq: Orq, server: ServerThread) -> None:
    """PATCH `limits: {"amount": 7}` changes the amount only: the period and token limit stay; a field sent
    as null is removed; `rate_limit: {}` leaves the rate limit alone, and null removes it."""
    created = orq.budgets.create(
        scope={"workspace": {}},
        limits={"period": "BUDGET_PERIOD_MONTHLY", "amount": 10.0, "token_limit": 1000},
        rate_limit={"requests_per_minute": 60},
    ).budget
    updated = orq.budgets.update(budget_id=created.budget_id, limits={"amount": 7.0}).budget
    assert updated.limits.period == "BUDGET_PERIOD_MONTHLY"
    assert (updated.limits.amount, updated.limits.token_limit) == (7.0, 1000)
    assert updated.rate_limit is not None and updated.rate_limit.requests_per_minute == 60
    path = f"/v2/budgets/{created.budget_id}"
    response = raw(server, "PATCH", path, json={"limits": {"token_limit": None}, "rate_limit": {}})
    assert response.status_code == 200, response.text
    limits = response.json()["budget"]["limits"]
    assert limits == {"period": "BUDGET_PERIOD_MONTHLY", "amount": 7}
    assert response.json()["budget"]["rateLimit"] == {"requestsPerMinute": 60}
    response = raw(server, "PATCH", path, json={"rate_limit": {"requests_per_minute": None}})
    assert response.status_code == 200 and "rateLimit" not in response.json()["budget"]
    fetched = orq.budgets.get(budget_id=created.budget_id).budget
    assert fetched.limits.period == "BUDGET_PERIOD_MONTHLY" and fetched.limits.amount == 7.0
    assert fetched.limits.token_limit is None and fetched.rate_limit is None


def test_update_match_only_for_cel_budgets(orq: Orq, server: ServerThread) -> None:
    """A CEL budget's expression can change (validated); a scoped budget's cannot."""
    custom = orq.budgets.create(match={"cel": "true"}, limits={"amount": 1.0}).budget
    changed = orq.budgets.update(budget_id=custom.budget_id, match={"cel": 'provider == "openai"'}).budget
    assert changed.match is not None and changed.match.cel == 'provider == "openai"'
    bad = raw(server, "PATCH", f"/v2/budgets/{custom.budget_id}", json={"match": {"cel": "provider =="}})
    assert bad.status_code == 400 and bad.json()["message"].startswith("match.cel: invalid CEL")
    scoped = orq.budgets.create(scope={"workspace": {}}, limits={"amount": 1.0}).budget
    response = raw(server, "PATCH", f"/v2/budgets/{scoped.budget_id}", json={"match": {"cel": "true"}})
    assert response.status_code == 400 and response.json()["message"].startswith(
        "match: only budgets without a scope"
    )
    response = raw(server, "PATCH", f"/v2/budgets/{scoped.budget_id}", json={"scope": {"workspace": {}}})
    assert response.status_code == 400 and response.json()["message"].startswith("scope: ")
    response = raw(server, "PATCH", f"/v2/budgets/{scoped.budget_id}", json={"limits": {"amount": None}})
    assert response.status_code == 400 and "at least one of limits.amount" in response.json()["message"]
    response = raw(
        server,
        "PATCH",
        f"/v2/budgets/{scoped.budget_id}",
        json={"alerts": [{"id": "nope", "threshold_percent": 5, "notifier_ids": ["n1"]}]},
    )
    assert (
        response.status_code == 400
        and response.json()["message"] == "alerts[0].id: this budget has no alert 'nope'"
    )
    response = raw(
        server, "PATCH", f"/v2/budgets/{scoped.budget_id}", json={"expires_at": "2020-01-01T00:00:00Z"}
    )
    assert response.status_code == 400 and response.json()["message"].startswith(
        "expires_at: must be in the future"
    )


def test_delete_returns_empty_object_and_clears_counters(
    proxy: tuple[OrqProxy, ServerThread], orq: Orq
) -> None:
    """DELETE answers `{}`; the budget and its counters are gone."""
    app, server = proxy
    budget_id = orq.budgets.create(scope={"workspace": {}}, limits={"amount": 5.0}).budget.budget_id
    counters: InMemoryCounters = app.services.budget_counters
    store: InMemoryBudgetStore = app.services.budget_store
    budget = asyncio.run(store.get("ws_a", budget_id))
    assert budget is not None
    reservation = asyncio.run(counters.reserve("ws_a", [budget], USD, 10, START))
    assert isinstance(reservation, Reservation) and len(counters) == 1
    response = raw(server, "DELETE", f"/v2/budgets/{budget_id}")
    assert response.status_code == 200 and response.json() == {}
    assert response.headers["content-type"] == "application/json"
    assert len(counters) == 0
    with pytest.raises(APIDefaultError) as info:
        orq.budgets.get(budget_id=budget_id)
    assert info.value.status_code == 404
    budget_id = orq.budgets.create(scope={"workspace": {}}, limits={"amount": 5.0}).budget.budget_id
    orq.budgets.delete(budget_id=budget_id)  # the SDK parses the `{}`


def test_usage_and_reset_consumption(proxy: tuple[OrqProxy, ServerThread], orq: Orq) -> None:
    """get/list show current-period usage; reset-consumption zeroes it and returns the budget."""
    app, _server = proxy
    budget_id = orq.budgets.create(scope={"workspace": {}}, limits={"amount": 5.0}).budget.budget_id
    counters: InMemoryCounters = app.services.budget_counters
    budget = asyncio.run(app.services.budget_store.get("ws_a", budget_id))

    async def spend() -> None:
        reservation = await counters.reserve("ws_a", [budget], 2 * USD, 100, START)
        assert isinstance(reservation, Reservation)
        await counters.settle(reservation, 1_250_000_000, 42, START)

    asyncio.run(spend())
    usage = orq.budgets.get(budget_id=budget_id).budget.usage
    assert usage is not None and (usage.amount, usage.tokens, usage.requests) == (1.25, 42, 1)
    listed = orq.budgets.list().data[0].usage
    assert listed is not None and listed.amount == 1.25
    reset = orq.budgets.reset_consumption(budget_id=budget_id, reset_budget_consumption_request={})
    assert reset.budget is not None and reset.budget.budget_id == budget_id and reset.budget.usage is None
    usage = orq.budgets.get(budget_id=budget_id).budget.usage
    assert usage is not None and (usage.amount, usage.tokens, usage.requests) == (0, 0, 0)


def test_list_paging_sorting_and_filters(orq: Orq, clock: FakeClock) -> None:
    """limit, starting_after/ending_before with hasMore, sort_by, is_active and period filters."""
    ids = []
    for i in range(7):
        budget = orq.budgets.create(
            scope={"project": {"project_id": f"p{i}"}},
            limits={"period": "BUDGET_PERIOD_DAILY" if i % 2 else "BUDGET_PERIOD_WEEKLY", "amount": 1.0},
            is_active=i != 3,
            expires_at=START + timedelta(days=10 - i),
        ).budget
        ids.append(budget.budget_id)
        clock.advance(1)
    newest_first = list(reversed(ids))
    page1 = orq.budgets.list(limit=3)
    assert [b.budget_id for b in page1.data] == newest_first[:3] and page1.has_more
    page2 = orq.budgets.list(limit=3, starting_after=page1.data[-1].budget_id)
    assert [b.budget_id for b in page2.data] == newest_first[3:6] and page2.has_more
    page3 = orq.budgets.list(limit=3, starting_after=page2.data[-1].budget_id)
    assert [b.budget_id for b in page3.data] == newest_first[6:] and not page3.has_more
    back = orq.budgets.list(limit=3, ending_before=page2.data[0].budget_id)
    assert [b.budget_id for b in back.data] == newest_first[:3] and not back.has_more
    # touching a budget moves it to the front of the default order; created_at order does not change
    orq.budgets.update(budget_id=ids[0], limits={"period": "BUDGET_PERIOD_WEEKLY", "amount": 2.0})
    assert orq.budgets.list(limit=1).data[0].budget_id == ids[0]
    created = orq.budgets.list(sort_by="BUDGET_SORT_FIELD_CREATED_AT")
    assert [b.budget_id for b in created.data] == newest_first
    expiring = orq.budgets.list(sort_by="BUDGET_SORT_FIELD_EXPIRES_AT")
    assert [b.budget_id for b in expiring.data] == newest_first
    assert [b.budget_id for b in orq.budgets.list(is_active=False).data] == [ids[3]]
    daily = orq.budgets.list(period=["BUDGET_PERIOD_DAILY"]).data
    assert {b.budget_id for b in daily} == {ids[1], ids[3], ids[5]}
    both = orq.budgets.list(period=["BUDGET_PERIOD_DAILY", "BUDGET_PERIOD_WEEKLY"], is_active=True).data
    assert len(both) == 6


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit: must be an integer from 1 to 200"),
        ("limit=201", "limit: must be an integer from 1 to 200"),
        ("limit=ten", "limit: must be an integer from 1 to 200"),
        ("limit=1&limit=2", "limit: give it at most once"),
        ("scope_kind=BUDGET_SCOPE_KIND_TEAM", "scope_kind: must be one of BUDGET_SCOPE_KIND_WORKSPACE"),
        ("period=BUDGET_PERIOD_HOURLY", "period: must be one of BUDGET_PERIOD_DAILY"),
        ("is_active=maybe", "is_active: must be true or false"),
        ("sort_by=name", "sort_by: must be one of BUDGET_SORT_FIELD_EXPIRES_AT"),
        ("starting_after=a&ending_before=b", "starting_after, ending_before: give at most one"),
        ("starting_after=nope", "starting_after: no budget 'nope' in this list"),
        ("ending_before=nope", "ending_before: no budget 'nope' in this list"),
        ("query=" + "x" * 257, "query: at most 256 characters"),
        ("pagesize=3", "pagesize: unknown query parameter"),
    ],
)
def test_invalid_list_params(shared_server: ServerThread, query: str, message: str) -> None:
    """Each bad list parameter is a 400 naming it and the rule."""
    response = raw(shared_server, "GET", f"/v2/budgets?{query}")
    assert response.status_code == 400
    assert response.json()["message"].startswith(message) and response.json()["code"] == 3


FUTURE = "2030-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"match": {"cel": "identity =="}, "limits": {"amount": 1}}, "match.cel: invalid CEL"),
        ({"match": {"cel": 'user == "x"'}, "limits": {"amount": 1}}, "match.cel: unknown variable(s) user"),
        (
            {"scope": {"workspace": {}}, "match": {"cel": ""}, "limits": {"amount": 1}},
            "body: Value error, exactly one of scope or match",
        ),
        ({"scope": {"workspace": {}}}, "body: Value error, at least one of limits.amount"),
        (
            {"scope": {"workspace": {}}, "limits": {"token_limit": 100000.5}},
            "limits.token_limit: Value error, must be a whole number",
        ),
        (
            {"scope": {"workspace": {}}, "limits": {"amount": 1}, "expires_at": "2020-01-01T00:00:00Z"},
            "expires_at: must be in the future",
        ),
        (
            {
                "scope": {"workspace": {}},
                "limits": {"amount": 1},
                "alerts": [{"threshold_percent": 50, "notifier_ids": ["slack"]}],
            },
            "alerts[0].notifier_ids: unknown notifier 'slack'",
        ),
        (
            {
                "scope": {"workspace": {}},
                "limits": {"token_limit": 5},
                "alerts": [{"threshold_percent": 50, "notifier_ids": ["n1"]}],
            },
            "alerts: threshold alerts watch cost",
        ),
        (
            {
                "scope": {"workspace": {}},
                "limits": {"amount": 1},
                "alerts": [
                    {
                        "threshold_percent": 50,
                        "notifier_ids": ["n1"],
                        "dimension": "BUDGET_ALERT_DIMENSION_TOKENS",
                    }
                ],
            },
            "alerts.0.dimension: Value error, BUDGET_ALERT_DIMENSION_TOKENS is not supported",
        ),
    ],
)
def test_invalid_create_bodies(shared_server: ServerThread, body: dict[str, Any], message: str) -> None:
    """Each invalid create is a 400 in orq's shape naming the field and the rule."""
    response = raw(shared_server, "POST", "/v2/budgets", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith(message), response.json()
    assert response.json()["code"] == 3


def test_inactive_budget_may_have_a_past_expiry(shared_server: ServerThread) -> None:
    """`expires_at` must be in the future only for an active budget."""
    body = {
        "scope": {"model": {"model_id": "old/model"}},
        "limits": {"amount": 1},
        "is_active": False,
        "expires_at": "2020-01-01T00:00:00",
    }
    response = raw(shared_server, "POST", "/v2/budgets", json=body)
    assert response.status_code == 200 and response.json()["budget"]["expiresAt"] == "2020-01-01T00:00:00Z"
    assert response.json()["budget"]["isActive"] is False


def test_not_json_body(shared_server: ServerThread) -> None:
    """A body that is not a JSON object is a 400."""
    response = raw(shared_server, "POST", "/v2/budgets", content=b"[1]", key=ADMIN_B)
    assert response.status_code == 400 and response.json()["message"] == "request body must be a JSON object"


def test_identity_include_budget_and_delete(orq: Orq) -> None:
    """identities.list(include_budget) embeds the snake_case budget; deleting the identity deletes it."""
    identity = orq.identities.create(external_id="user_9").result.identity
    budget = orq.budgets.create(
        scope={"identity": {"identity_external_id": "user_9"}},
        limits={"period": "BUDGET_PERIOD_DAILY", "amount": 3.0},
        rate_limit={"requests_per_minute": 7},
    ).budget
    other = orq.budgets.create(match={"cel": 'identity == "user_9"'}, limits={"amount": 1.0}).budget
    listed = orq.identities.list(include_budget=True).data
    embedded = next(i.budget for i in listed if i.external_id == "user_9")
    assert embedded is not None and embedded.budget_id == budget.budget_id
    assert embedded.limits.amount == 3.0 and embedded.rate_limit is not None
    assert embedded.rate_limit.requests_per_minute == 7 and embedded.usage is None
    orq.identities.delete(id=identity.id)
    with pytest.raises(APIDefaultError):
        orq.budgets.get(budget_id=budget.budget_id)
    assert orq.budgets.get(budget_id=other.budget_id).budget.budget_id == other.budget_id  # CEL budgets stay
