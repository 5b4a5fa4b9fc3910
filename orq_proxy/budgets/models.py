"""Budgets: the internal `Budget` record, the admin request models and the two wire renderings.

- Requests (`BudgetCreate`, `BudgetUpdate`) are snake_case, validated precisely: every rejection names the
  field and the rule (spec §3.2).
- `budget_rest()` renders orq's camelCase `BudgetRestResponse` (spec §3.3): `isActive` always present,
  absent optional fields omitted (never null), `usage` only when the caller passes it (get / list).
- `identity_budget()` renders the snake_case `IdentityBudget` embedded in identities (spec §2.1), no usage.

Money is integer nano-USD inside; USD floats only here, at the edge (rounded to 10 decimals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from orq_proxy.timefmt import rfc3339
from orq_proxy.usage.money import nanos_to_usd, usd_to_nanos

__all__ = [
    "ALERT_DIMENSION_COST",
    "ALERT_DIMENSION_TOKENS",
    "MAX_AMOUNT_USD",
    "MAX_COUNT",
    "Alert",
    "AlertIn",
    "Budget",
    "BudgetCreate",
    "BudgetUpdate",
    "LimitsIn",
    "MatchIn",
    "Period",
    "RateLimitIn",
    "ScopeIn",
    "ScopeKind",
    "Usage",
    "amount_to_nanos",
    "budget_rest",
    "derived_cel",
    "identity_budget",
]

ALERT_DIMENSION_COST = "BUDGET_ALERT_DIMENSION_COST"
ALERT_DIMENSION_TOKENS = "BUDGET_ALERT_DIMENSION_TOKENS"
# The largest amount accepted, in USD: keeps nano-USD inside a signed 64-bit integer (for Redis/SQL backends).
MAX_AMOUNT_USD = 9_000_000_000.0
MAX_COUNT = 2**62


class Period(StrEnum):
    """A budget's calendar period (spec §3.1)."""

    DAILY = "BUDGET_PERIOD_DAILY"
    WEEKLY = "BUDGET_PERIOD_WEEKLY"
    MONTHLY = "BUDGET_PERIOD_MONTHLY"
    YEARLY = "BUDGET_PERIOD_YEARLY"
    ONE_TIME = "BUDGET_PERIOD_ONE_TIME"


class ScopeKind(StrEnum):
    """What a scoped budget is attached to (spec §3.1). A CEL ("custom") budget has no scope kind."""

    WORKSPACE = "BUDGET_SCOPE_KIND_WORKSPACE"
    PROJECT = "BUDGET_SCOPE_KIND_PROJECT"
    IDENTITY = "BUDGET_SCOPE_KIND_IDENTITY"
    API_KEY = "BUDGET_SCOPE_KIND_API_KEY"
    PROVIDER = "BUDGET_SCOPE_KIND_PROVIDER"
    MODEL = "BUDGET_SCOPE_KIND_MODEL"


# scope variant on the wire -> (kind, snake target key, camel target key, CEL variable)
_SCOPES: dict[str, tuple[ScopeKind, str | None, str | None, str | None]] = {
    "workspace": (ScopeKind.WORKSPACE, None, None, None),
    "project": (ScopeKind.PROJECT, "project_id", "projectId", "project"),
    "identity": (ScopeKind.IDENTITY, "identity_external_id", "identityExternalId", "identity"),
    "api_key": (ScopeKind.API_KEY, "api_key_id", "apiKeyId", "api_key"),
    "provider": (ScopeKind.PROVIDER, "provider", "provider", "provider"),
    "model": (ScopeKind.MODEL, "model_id", "modelId", "model_id"),
}
_VARIANT_BY_KIND = {kind: name for name, (kind, *_rest) in _SCOPES.items()}
_CAMEL_VARIANT = {"api_key": "apiKey"}


# ---------------------------------------------------------------------------------------------------------
# Internal record


@dataclass(frozen=True, slots=True)
class Alert:
    """A threshold notification: fires once per period when cost consumption reaches `threshold_percent`."""

    id: str
    threshold_percent: int
    notifier_ids: tuple[str, ...]
    dimension: str = ALERT_DIMENSION_COST


@dataclass(frozen=True, slots=True)
class Budget:
    """One budget. Immutable: the store replaces the whole record on update.

    Attributes:
        scope_kind: None for a CEL ("custom") budget.
        scope_target: the scope's target id (`""` for the workspace scope and for CEL budgets).
        cel: the match expression: the client's for CEL budgets, derived for scoped ones.
        period: as the client sent it (None = not sent; counters then use `ONE_TIME`).
        amount_nanos / token_limit / requests_per_minute: the limits; None = no limit on that dimension.
        time_zone: IANA zone for the period boundaries (None = UTC); an extension to orq's API.
        counting_since: when the current count began, if after its window's start (a reset, or a change of
            period or time zone); rebuilding counters from the event store counts from here.
    """

    budget_id: str
    workspace: str
    scope_kind: ScopeKind | None
    scope_target: str
    cel: str
    period: Period | None
    amount_nanos: int | None
    token_limit: int | None
    requests_per_minute: int | None
    alerts: tuple[Alert, ...]
    is_active: bool
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    time_zone: str | None = None
    counting_since: datetime | None = None

    @property
    def effective_period(self) -> Period:
        """The period the counters use: a limit without a period never resets."""
        return self.period or Period.ONE_TIME

    def applies(self, now: datetime) -> bool:
        """Active and not expired at `now`."""
        return self.is_active and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class Usage:
    """Current-period consumption of one budget: spend, tokens, and requests in the last 60 s."""

    amount_nanos: int = 0
    tokens: int = 0
    requests: int = 0


def derived_cel(kind: ScopeKind, target: str) -> str:
    """The CEL expression equivalent to a scope (shown in `match.cel` of scoped budgets)."""
    var = _SCOPES[_VARIANT_BY_KIND[kind]][3]
    if var is None:
        return ""
    return f"{var} == {_cel_string(target)}"


def _cel_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


# ---------------------------------------------------------------------------------------------------------
# Request models (snake_case)


def _whole_number(value: Any) -> Any:
    """Integer-semantic fields accept JSON numbers with no fraction (`100000.0`, as the SDK sends)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    if not isinstance(value, int):
        raise ValueError("must be a whole number")
    return value


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


_WholeNumber = Annotated[int, BeforeValidator(_whole_number)]
_Number = Annotated[float, BeforeValidator(_json_number)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Empty(_Request):
    pass


_TargetId = Annotated[str, Field(min_length=1, max_length=512)]


class _ProjectTarget(_Request):
    project_id: _TargetId


class _IdentityTarget(_Request):
    identity_external_id: _TargetId


class _ApiKeyTarget(_Request):
    api_key_id: _TargetId


class _ProviderTarget(_Request):
    provider: _TargetId


class _ModelTarget(_Request):
    model_id: _TargetId


class ScopeIn(_Request):
    """Exactly one scope variant (spec §3.2)."""

    workspace: _Empty | None = None
    project: _ProjectTarget | None = None
    identity: _IdentityTarget | None = None
    api_key: _ApiKeyTarget | None = None
    provider: _ProviderTarget | None = None
    model: _ModelTarget | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ScopeIn:
        given = [name for name in _SCOPES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"must set exactly one of {', '.join(_SCOPES)}; got {', '.join(given) if given else 'none'}"
            )
        return self

    def kind_and_target(self) -> tuple[ScopeKind, str]:
        for name, (kind, key, _camel, _var) in _SCOPES.items():
            value = getattr(self, name)
            if value is not None:
                return kind, (getattr(value, key) if key else "")
        raise AssertionError("validated: exactly one scope variant")  # pragma: no cover


class MatchIn(_Request):
    """A CEL expression; an empty string matches every request of the workspace."""

    cel: str = Field(max_length=4096)


class LimitsIn(_Request):
    """Per-period ceilings. `amount` is USD; `token_limit` has integer semantics."""

    period: Period | None = None
    amount: _Number | None = Field(None, ge=0, le=MAX_AMOUNT_USD, allow_inf_nan=False)
    token_limit: _WholeNumber | None = Field(None, ge=0, le=MAX_COUNT)


class RateLimitIn(_Request):
    """A rolling 60-second request ceiling."""

    requests_per_minute: _WholeNumber | None = Field(None, ge=1, le=MAX_COUNT)


_NotifierId = Annotated[str, Field(min_length=1, max_length=256)]


class AlertIn(_Request):
    """A threshold notification (`id` only on update, to edit an existing alert)."""

    threshold_percent: _WholeNumber = Field(ge=1, le=100)
    notifier_ids: list[_NotifierId] = Field(min_length=1, max_length=32)
    id: str | None = Field(None, min_length=1, max_length=64)
    dimension: Literal["BUDGET_ALERT_DIMENSION_COST", "BUDGET_ALERT_DIMENSION_TOKENS"] | None = None

    @field_validator("dimension")
    @classmethod
    def _cost_only(cls, value: str | None) -> str | None:
        if value == ALERT_DIMENSION_TOKENS:
            raise ValueError("BUDGET_ALERT_DIMENSION_TOKENS is not supported; alerts watch cost only")
        return value


def _utc(value: datetime | None) -> datetime | None:
    """Naive datetimes are UTC (spec §1.3 [rec]); aware ones are converted to UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+01:00 has no UTC equivalent
        raise ValueError("datetime is out of range once converted to UTC") from exc


def _check_zone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a tzdata folder, a huge name
        raise ValueError(f"unknown IANA time zone {value!r}") from exc
    return value


class _BudgetFields(_Request):
    """Validators shared by create and update."""

    @field_validator("expires_at", check_fields=False)
    @classmethod
    def _utc_expiry(cls, value: datetime | None) -> datetime | None:
        return _utc(value)

    @field_validator("time_zone", check_fields=False)
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return _check_zone(value)


class BudgetCreate(_BudgetFields):
    """`POST /v2/budgets`. Exactly one of `scope` / `match`; at least one limit."""

    scope: ScopeIn | None = None
    match: MatchIn | None = None
    limits: LimitsIn | None = None
    rate_limit: RateLimitIn | None = None
    is_active: StrictBool = True
    expires_at: datetime | None = None
    alerts: list[AlertIn] | None = Field(None, max_length=32)
    time_zone: str | None = Field(None, description="Extension: IANA zone of the period boundaries (UTC).")

    @model_validator(mode="after")
    def _rules(self) -> BudgetCreate:
        if (self.scope is None) == (self.match is None):
            raise ValueError("exactly one of scope or match must be set")
        _check_some_limit(self.limits, self.rate_limit)
        return self

    @field_validator("alerts")
    @classmethod
    def _no_alert_ids(cls, value: list[AlertIn] | None) -> list[AlertIn] | None:
        for i, alert in enumerate(value or ()):
            if alert.id is not None:
                raise ValueError(f"alerts[{i}].id must be omitted on create (the server assigns alert ids)")
        return value


class BudgetUpdate(_BudgetFields):
    """`PATCH /v2/budgets/{id}`. Omitted fields are unchanged; `limits` and `rate_limit` merge field by field
    (a field sent as null is removed)."""

    limits: LimitsIn | None = None
    rate_limit: RateLimitIn | None = None
    is_active: StrictBool | None = None
    expires_at: datetime | None = None
    clear_expires_at: StrictBool | None = None
    match: MatchIn | None = None
    alerts: list[AlertIn] | None = Field(None, max_length=32)
    clear_alerts: StrictBool | None = None
    time_zone: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> BudgetUpdate:
        if self.clear_expires_at and self.expires_at is not None:
            raise ValueError("expires_at and clear_expires_at are mutually exclusive")
        if self.clear_alerts and self.alerts:
            raise ValueError("clear_alerts and a non-empty alerts list are mutually exclusive")
        return self


def _check_some_limit(limits: LimitsIn | None, rate_limit: RateLimitIn | None) -> None:
    if (limits is None or (limits.amount is None and limits.token_limit is None)) and (
        rate_limit is None or rate_limit.requests_per_minute is None
    ):
        raise ValueError(
            "at least one of limits.amount, limits.token_limit or rate_limit.requests_per_minute must be set"
        )


def amount_to_nanos(amount: float | None) -> int | None:
    return None if amount is None else usd_to_nanos(amount)


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _limits(budget: Budget, *, camel: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if budget.period is not None:
        out["period"] = budget.period.value
    if budget.amount_nanos is not None:
        out["amount"] = nanos_to_usd(budget.amount_nanos)
    if budget.token_limit is not None:
        out["tokenLimit" if camel else "token_limit"] = budget.token_limit
    return out


def _scope(budget: Budget, *, camel: bool) -> dict[str, Any] | None:
    if budget.scope_kind is None:
        return None
    name = _VARIANT_BY_KIND[budget.scope_kind]
    _kind, snake_key, camel_key, _var = _SCOPES[name]
    inner: dict[str, Any] = {}
    if snake_key is not None and camel_key is not None:
        inner[camel_key if camel else snake_key] = budget.scope_target
    return {(_CAMEL_VARIANT.get(name, name) if camel else name): inner}


def _alerts(budget: Budget, *, camel: bool) -> list[dict[str, Any]]:
    return [
        {
            "id": a.id,
            ("thresholdPercent" if camel else "threshold_percent"): a.threshold_percent,
            ("notifierIds" if camel else "notifier_ids"): list(a.notifier_ids),
            "dimension": a.dimension,
        }
        for a in budget.alerts
    ]


def _render(budget: Budget, *, camel: bool) -> dict[str, Any]:
    """The budget's configuration, in camelCase (REST) or snake_case (embedded in an identity)."""

    def key(snake: str, camel_name: str) -> str:
        return camel_name if camel else snake

    out: dict[str, Any] = {key("budget_id", "budgetId"): budget.budget_id}
    scope = _scope(budget, camel=camel)
    if scope is not None:
        out["scope"] = scope
    out["match"] = {"cel": budget.cel}
    out["limits"] = _limits(budget, camel=camel)
    if budget.requests_per_minute is not None:
        rpm = key("requests_per_minute", "requestsPerMinute")
        out[key("rate_limit", "rateLimit")] = {rpm: budget.requests_per_minute}
    out[key("is_active", "isActive")] = budget.is_active
    if budget.expires_at is not None:
        out[key("expires_at", "expiresAt")] = rfc3339(budget.expires_at)
    if budget.alerts:
        out["alerts"] = _alerts(budget, camel=camel)
    out[key("created_at", "createdAt")] = rfc3339(budget.created_at)
    out[key("updated_at", "updatedAt")] = rfc3339(budget.updated_at)
    return out


def budget_rest(budget: Budget, usage: Usage | None = None) -> dict[str, Any]:
    """orq's camelCase `BudgetRestResponse`; `usage` only on get/list; `timeZone` when set (extension)."""
    out = _render(budget, camel=True)
    if budget.time_zone is not None:
        out["timeZone"] = budget.time_zone
    if usage is not None:
        out["usage"] = {
            "amount": nanos_to_usd(usage.amount_nanos),
            "tokens": usage.tokens,
            "requests": usage.requests,
        }
    return out


def identity_budget(budget: Budget) -> dict[str, Any]:
    """The snake_case `IdentityBudget` embedded in an identity (`include_budget`); no live usage."""
    return _render(budget, camel=False)
