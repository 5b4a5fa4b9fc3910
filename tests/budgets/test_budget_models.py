"""Budget request validation (every rule names its field) and the two wire renderings."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from orq_ai_sdk.models import BudgetRestResponse
from orq_ai_sdk.models.identity import Budget as SDKIdentityBudget
from pydantic import ValidationError

from orq_proxy.budgets.models import (
    Alert,
    Budget,
    BudgetCreate,
    BudgetUpdate,
    Period,
    ScopeKind,
    Usage,
    budget_rest,
    derived_cel,
    identity_budget,
)
from orq_proxy.management import validation_message

MakeBudget = Callable[..., Budget]

# The captured SDK requests of spec §3.5, verbatim.
CAPTURED = [
    '{"scope":{"identity":{"identity_external_id":"user_123"}},"limits":{"period":"BUDGET_PERIOD_MONTHLY","amount":10.5,'
    '"token_limit":100000.0},"rate_limit":{"requests_per_minute":60},"is_active":true,"expires_at":"2027-01-01T00:00:00Z",'
    '"alerts":[{"threshold_percent":80,"notifier_ids":["n1"],"dimension":"BUDGET_ALERT_DIMENSION_COST"}]}',
    '{"scope":{"workspace":{}},"limits":{"period":"BUDGET_PERIOD_DAILY","amount":1.0}}',
    '{"scope":{"model":{"model_id":"openai/gpt-4o"}},"limits":{"period":"BUDGET_PERIOD_WEEKLY","amount":1.0}}',
    '{"scope":{"project":{"project_id":"p1"}},"limits":{"period":"BUDGET_PERIOD_YEARLY","amount":1.0}}',
    '{"scope":{"api_key":{"api_key_id":"k1"}},"limits":{"period":"BUDGET_PERIOD_ONE_TIME","amount":1.0}}',
    '{"scope":{"provider":{"provider":"openai"}},"rate_limit":{"requests_per_minute":5}}',
    '{"match":{"cel":"metadata.team == \\"ml\\""},"limits":{"token_limit":5000.0}}',
]


@pytest.mark.parametrize("body", CAPTURED)
def test_captured_create_requests_parse(body: str) -> None:
    """Every create request the SDK was seen sending is accepted."""
    BudgetCreate.model_validate(json.loads(body))


def test_integer_semantic_floats_and_naive_datetimes() -> None:
    """`token_limit: 100000.0` is the integer 100000; a naive `expires_at` is UTC."""
    create = BudgetCreate.model_validate(
        {
            "scope": {"workspace": {}},
            "limits": {"token_limit": 100000.0, "amount": 10},
            "rate_limit": {"requests_per_minute": 60.0},
            "expires_at": "2027-05-01T00:00:00",
            "alerts": [{"threshold_percent": 80.0, "notifier_ids": ["n1"]}],
        }
    )
    assert create.limits is not None and create.limits.token_limit == 100000
    assert isinstance(create.limits.token_limit, int)
    assert create.expires_at == datetime(2027, 5, 1, tzinfo=UTC)
    assert create.scope is not None and create.scope.kind_and_target() == (ScopeKind.WORKSPACE, "")
    with_offset = BudgetCreate.model_validate(
        {"scope": {"workspace": {}}, "limits": {"amount": 1}, "expires_at": "2027-05-01T02:00:00+02:00"}
    )
    assert with_offset.expires_at == datetime(2027, 5, 1, tzinfo=UTC)


OK: dict[str, Any] = {"scope": {"workspace": {}}, "limits": {"amount": 1.0}}


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"limits": {"amount": 1}}, "body", "exactly one of scope or match"),
        ({**OK, "match": {"cel": "true"}}, "body", "exactly one of scope or match"),
        ({"scope": {"workspace": {}}}, "body", "at least one of limits.amount, limits.token_limit"),
        ({"scope": {"workspace": {}}, "limits": {"period": "BUDGET_PERIOD_DAILY"}}, "body", "at least one"),
        ({"scope": {"workspace": {}}, "rate_limit": {}}, "body", "at least one"),
        ({"scope": {}, "limits": {"amount": 1}}, "scope", "exactly one of workspace, project"),
        (
            {"scope": {"workspace": {}, "project": {"project_id": "p"}}, "limits": {"amount": 1}},
            "scope",
            "got workspace, project",
        ),
        (
            {"scope": {"identity": {"identity_external_id": ""}}, "limits": {"amount": 1}},
            "scope.identity.identity_external_id",
            "at least 1",
        ),
        ({"scope": {"model": {}}, "limits": {"amount": 1}}, "scope.model.model_id", "Field required"),
        ({"scope": {"team": {}}, "limits": {"amount": 1}}, "scope.team", "Extra inputs"),
        ({**OK, "limits": {"token_limit": 100000.5}}, "limits.token_limit", "whole number"),
        ({**OK, "limits": {"token_limit": True}}, "limits.token_limit", "not a boolean"),
        ({**OK, "limits": {"token_limit": "5"}}, "limits.token_limit", "whole number"),
        ({**OK, "limits": {"token_limit": -1}}, "limits.token_limit", "greater than or equal to 0"),
        ({**OK, "limits": {"amount": -0.01}}, "limits.amount", "greater than or equal to 0"),
        ({**OK, "limits": {"amount": "1"}}, "limits.amount", "must be a number"),
        (
            {**OK, "limits": {"amount": 1, "period": "BUDGET_PERIOD_HOURLY"}},
            "limits.period",
            "BUDGET_PERIOD_DAILY",
        ),
        (
            {**OK, "rate_limit": {"requests_per_minute": 0}},
            "rate_limit.requests_per_minute",
            "greater than or equal to 1",
        ),
        (
            {**OK, "rate_limit": {"requests_per_minute": 1.5}},
            "rate_limit.requests_per_minute",
            "whole number",
        ),
        ({**OK, "is_active": "yes"}, "is_active", "boolean"),
        ({**OK, "expires_at": "tomorrow"}, "expires_at", "datetime"),
        (
            {**OK, "alerts": [{"threshold_percent": 0, "notifier_ids": ["n"]}]},
            "alerts.0.threshold_percent",
            "greater than or equal to 1",
        ),
        (
            {**OK, "alerts": [{"threshold_percent": 101, "notifier_ids": ["n"]}]},
            "alerts.0.threshold_percent",
            "less than or equal to 100",
        ),
        (
            {**OK, "alerts": [{"threshold_percent": 50.5, "notifier_ids": ["n"]}]},
            "alerts.0.threshold_percent",
            "whole number",
        ),
        (
            {**OK, "alerts": [{"threshold_percent": 50, "notifier_ids": []}]},
            "alerts.0.notifier_ids",
            "at least 1",
        ),
        ({**OK, "alerts": [{"threshold_percent": 50}]}, "alerts.0.notifier_ids", "Field required"),
        (
            {
                **OK,
                "alerts": [
                    {
                        "threshold_percent": 50,
                        "notifier_ids": ["n"],
                        "dimension": "BUDGET_ALERT_DIMENSION_TOKENS",
                    }
                ],
            },
            "alerts.0.dimension",
            "TOKENS is not supported",
        ),
        (
            {**OK, "alerts": [{"threshold_percent": 50, "notifier_ids": ["n"], "id": "a1"}]},
            "alerts",
            "alerts[0].id must be omitted",
        ),
        ({**OK, "time_zone": "Mars/Olympus"}, "time_zone", "unknown IANA time zone"),
        ({**OK, "budget_id": "x"}, "budget_id", "Extra inputs"),
    ],
)
def test_create_validation(body: dict[str, Any], field: str, rule: str) -> None:
    """Each invalid create body fails naming the field and the rule."""
    with pytest.raises(ValidationError) as info:
        BudgetCreate.model_validate(body)
    message = validation_message(info.value)
    assert message.startswith(f"{field}: ") and rule in message, message


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({"expires_at": "2030-01-01T00:00:00Z", "clear_expires_at": True}, "mutually exclusive"),
        (
            {"alerts": [{"threshold_percent": 5, "notifier_ids": ["n"]}], "clear_alerts": True},
            "mutually exclusive",
        ),
        ({"scope": {"workspace": {}}}, "scope: Extra inputs"),
    ],
)
def test_update_validation(body: dict[str, Any], rule: str) -> None:
    """Update rejects contradictory fields and a scope (immutable)."""
    with pytest.raises(ValidationError) as info:
        BudgetUpdate.model_validate(body)
    assert rule in validation_message(info.value)


def test_derived_cel() -> None:
    """Scoped budgets show the CEL equivalent of their scope, literals escaped."""
    assert derived_cel(ScopeKind.WORKSPACE, "") == ""
    assert derived_cel(ScopeKind.IDENTITY, "user_123") == 'identity == "user_123"'
    assert derived_cel(ScopeKind.MODEL, 'a"b\\c') == 'model_id == "a\\"b\\\\c"'
    assert derived_cel(ScopeKind.API_KEY, "k1") == 'api_key == "k1"'


def test_rest_rendering_parses_with_the_sdk(make_budget: MakeBudget) -> None:
    """`budget_rest` is camelCase, always has isActive, omits absent fields, and the SDK model parses it."""
    full = make_budget(
        kind=ScopeKind.API_KEY,
        target="k1",
        period=Period.MONTHLY,
        amount_nanos=10_500_000_000,
        token_limit=100000,
        rpm=60,
        alerts=(Alert("a1", 80, ("n1",)),),
        expires_at=datetime(2027, 1, 1, tzinfo=UTC),
        is_active=False,
    )
    wire = budget_rest(full, Usage(1_250_000_000, 42, 3))
    assert wire["scope"] == {"apiKey": {"apiKeyId": "k1"}}
    assert wire["limits"] == {"period": "BUDGET_PERIOD_MONTHLY", "amount": 10.5, "tokenLimit": 100000}
    assert wire["rateLimit"] == {"requestsPerMinute": 60}
    assert wire["isActive"] is False
    assert wire["expiresAt"] == "2027-01-01T00:00:00Z"
    assert wire["createdAt"] == "2026-01-15T12:00:00Z"
    assert wire["usage"] == {"amount": 1.25, "tokens": 42, "requests": 3}
    assert wire["alerts"] == [
        {
            "id": "a1",
            "thresholdPercent": 80,
            "notifierIds": ["n1"],
            "dimension": "BUDGET_ALERT_DIMENSION_COST",
        }
    ]
    parsed = BudgetRestResponse.model_validate(wire)
    assert parsed.scope is not None and parsed.scope.api_key is not None
    assert parsed.usage is not None and parsed.usage.amount == 1.25
    assert parsed.is_active is False and parsed.limits.token_limit == 100000

    bare = make_budget(kind=None, cel="true", period=None, token_limit=5)
    wire = budget_rest(bare)
    assert set(wire) == {"budgetId", "match", "limits", "isActive", "createdAt", "updatedAt"}
    assert wire["limits"] == {"tokenLimit": 5} and wire["isActive"] is True
    assert None not in wire.values()
    BudgetRestResponse.model_validate(wire)


def test_identity_budget_rendering_parses_with_the_sdk(make_budget: MakeBudget) -> None:
    """`identity_budget` is snake_case, has no usage, and the SDK's identity.budget model parses it."""
    budget = make_budget(
        kind=ScopeKind.IDENTITY,
        target="user_123",
        amount_nanos=1_000_000_000,
        rpm=5,
        alerts=(Alert("a1", 50, ("n1", "n2")),),
    )
    wire = identity_budget(budget)
    assert wire["scope"] == {"identity": {"identity_external_id": "user_123"}}
    assert wire["limits"] == {"period": "BUDGET_PERIOD_MONTHLY", "amount": 1.0}
    assert wire["rate_limit"] == {"requests_per_minute": 5}
    assert wire["alerts"][0]["threshold_percent"] == 50 and "usage" not in wire
    assert wire["match"] == {"cel": 'identity == "user_123"'} and wire["is_active"] is True
    parsed = SDKIdentityBudget.model_validate(wire)
    assert (
        parsed.budget_id == budget.budget_id
        and parsed.scope is not None
        and parsed.scope.identity is not None
    )
