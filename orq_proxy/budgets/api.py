"""`/v2/budgets`: orq's budgets API (spec §3), for admin keys of the caller's workspace only.

| method | path | success |
|---|---|---|
| POST | /v2/budgets | 200 `{"budget"}` (409 when the scope target already has a budget) |
| GET | /v2/budgets | 200 `{"object": "list", "data", "hasMore"}`, each with live `usage` |
| GET | /v2/budgets/{budget_id} | 200 `{"budget"}` with live `usage` |
| PATCH | /v2/budgets/{budget_id} | 200 `{"budget"}` |
| DELETE | /v2/budgets/{budget_id} | 200 `{}` (its counters go too) |
| POST | /v2/budgets/{budget_id}/reset-consumption | 200 `{"budget"}` |

Requests are snake_case, responses camelCase. Errors use orq's shape `{"message", "code"}`: 400 naming the
field and the rule, 401 without a valid key, 403 for a non-admin key, 404 (code 5) for an unknown budget,
409 (code 6) for a second budget on the same scope target.

`BudgetIdentityHooks` gives the identities API the identity-scoped budget (`include_budget`) and deletes it
with its identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from ulid import ULID

from orq_proxy.auth import KeyRing
from orq_proxy.budgets.counters import Counters
from orq_proxy.budgets.matching import check_cel
from orq_proxy.budgets.models import (
    Alert,
    AlertIn,
    Budget,
    BudgetCreate,
    BudgetUpdate,
    Period,
    ScopeKind,
    amount_to_nanos,
    budget_rest,
    derived_cel,
    identity_budget,
)
from orq_proxy.budgets.store import BudgetConflict, BudgetListQuery, BudgetStore, SortField, UnknownCursor
from orq_proxy.clock import Clock
from orq_proxy.errors import OrqAPIError
from orq_proxy.management import admin_principal, json_ok, orq_endpoint, read_json_object
from orq_proxy.timefmt import rfc3339

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "BudgetIdentityHooks", "routes"]

DEFAULT_LIMIT = 25
MAX_LIMIT = 200
_QUERY_MAX = 256
_BOOLS = {"true": True, "false": False, "1": True, "0": False}


class BudgetIdentityHooks:
    """The identities API's view of budgets (`IdentityBudgetHooks` in `identities/api.py`).

    Args:
        store: the budget store.
        counters: the budget counters (cleared when an identity's budget is deleted).
    """

    def __init__(self, store: BudgetStore, counters: Counters) -> None:
        self.store = store
        self.counters = counters

    async def identity_budget(self, workspace: str, external_id: str) -> dict[str, Any] | None:
        """The identity-scoped budget as snake_case `IdentityBudget` (no usage), or None."""
        budget = await self.store.find_scoped(workspace, ScopeKind.IDENTITY, external_id)
        return None if budget is None else identity_budget(budget)

    async def delete_identity_budgets(self, workspace: str, external_id: str) -> None:
        """Delete the budget scoped to this identity, with its counters (CEL budgets are left alone)."""
        budget = await self.store.find_scoped(workspace, ScopeKind.IDENTITY, external_id)
        if budget is not None and await self.store.delete(workspace, budget.budget_id) is not None:
            await self.counters.forget(budget.budget_id)


# ---------------------------------------------------------------------------------------------------------
# Query parameters


def _single(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise OrqAPIError(400, f"{name}: give it at most once")
    return values[0] if values else None


def _enum_list(request: Request, name: str, allowed: type[ScopeKind] | type[Period]) -> frozenset[Any]:
    out = set()
    for value in request.query_params.getlist(name):
        try:
            out.add(allowed(value))
        except ValueError:
            raise OrqAPIError(
                400, f"{name}: must be one of {', '.join(m.value for m in allowed)}, got {value!r}"
            ) from None
    return frozenset(out)


def _list_query(request: Request) -> BudgetListQuery:
    """The list parameters of spec §3.4, each checked; a bad one is a 400 naming it."""
    known = {
        "limit",
        "starting_after",
        "ending_before",
        "scope_kind",
        "scope_target_id",
        "is_active",
        "period",
        "query",
        "sort_by",
    }
    unknown = sorted(set(request.query_params.keys()) - known)
    if unknown:
        raise OrqAPIError(400, f"{unknown[0]}: unknown query parameter; known: {', '.join(sorted(known))}")
    limit = DEFAULT_LIMIT
    raw = _single(request, "limit")
    if raw is not None:
        # ASCII digits only (str.isdigit also accepts "²"), and short enough for int() to be cheap.
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_LIMIT:
            raise OrqAPIError(400, f"limit: must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
        limit = int(raw)
    starting_after = _single(request, "starting_after") or None
    ending_before = _single(request, "ending_before") or None
    if starting_after and ending_before:
        raise OrqAPIError(400, "starting_after, ending_before: give at most one of the two cursors")
    is_active = None
    raw = _single(request, "is_active")
    if raw is not None:
        if raw.lower() not in _BOOLS:
            raise OrqAPIError(400, f"is_active: must be true or false, got {raw!r}")
        is_active = _BOOLS[raw.lower()]
    query = _single(request, "query")
    if query is not None:
        query = query.strip() or None
    if query is not None and len(query) > _QUERY_MAX:
        raise OrqAPIError(400, f"query: at most {_QUERY_MAX} characters, got {len(query)}")
    sort_by = SortField.UPDATED_AT
    raw = _single(request, "sort_by")
    if raw is not None:
        try:
            sort_by = SortField(raw)
        except ValueError:
            raise OrqAPIError(
                400, f"sort_by: must be one of {', '.join(m.value for m in SortField)}, got {raw!r}"
            ) from None
    return BudgetListQuery(
        limit=limit,
        starting_after=starting_after,
        ending_before=ending_before,
        scope_kinds=_enum_list(request, "scope_kind", ScopeKind),
        scope_target_id=_single(request, "scope_target_id"),
        is_active=is_active,
        periods=_enum_list(request, "period", Period),
        query=query,
        sort_by=sort_by,
    )


# ---------------------------------------------------------------------------------------------------------


class _BudgetsAPI:
    def __init__(
        self,
        *,
        keyring: KeyRing,
        store: BudgetStore,
        counters: Counters,
        clock: Clock,
        notifiers: Collection[str],
    ) -> None:
        self.keyring = keyring
        self.store = store
        self.counters = counters
        self.clock = clock
        self.notifiers = frozenset(notifiers)

    async def _budget(self, workspace: str, request: Request) -> Budget:
        budget_id: str = request.path_params["budget_id"]
        budget = await self.store.get(workspace, budget_id)
        if budget is None:
            raise OrqAPIError(404, f"budget {budget_id!r} not found")
        return budget

    # -- validation shared by create and update ---------------------------------------------------------
    def _check_alerts(self, alerts: list[AlertIn]) -> None:
        for i, alert in enumerate(alerts):
            for notifier_id in alert.notifier_ids:
                if notifier_id not in self.notifiers:
                    configured = ", ".join(sorted(self.notifiers)) or "none"
                    raise OrqAPIError(
                        400,
                        f"alerts[{i}].notifier_ids: unknown notifier {notifier_id!r} "
                        f"(configure [notifiers.{notifier_id}] url = ...; configured: {configured})",
                    )

    @staticmethod
    def _check_budget(budget: Budget, now: datetime, *, check_expiry: bool) -> None:
        if budget.amount_nanos is None and budget.token_limit is None and budget.requests_per_minute is None:
            raise OrqAPIError(
                400,
                "limits, rate_limit: at least one of limits.amount, limits.token_limit or "
                "rate_limit.requests_per_minute must be set",
            )
        if budget.alerts and budget.amount_nanos is None:
            raise OrqAPIError(400, "alerts: threshold alerts watch cost, so they need limits.amount")
        if check_expiry and budget.is_active and budget.expires_at is not None and budget.expires_at <= now:
            raise OrqAPIError(
                400,
                f"expires_at: must be in the future for an active budget "
                f"(got {rfc3339(budget.expires_at)}, now is {rfc3339(now)})",
            )

    @staticmethod
    def _check_cel(expression: str) -> None:
        problem = check_cel(expression)
        if problem is not None:
            raise OrqAPIError(400, f"match.cel: {problem}")

    # -- endpoints --------------------------------------------------------------------------------------
    async def collection(self, request: Request) -> Response:
        principal = admin_principal(self.keyring, request)
        if request.method == "POST":
            return await self._create(principal.workspace, request)
        query = _list_query(request)
        try:
            page = await self.store.page(principal.workspace, query)
        except UnknownCursor as exc:
            raise OrqAPIError(400, str(exc)) from None
        usages = await self.counters.usage_many(page.items, self.clock.now())
        data = [budget_rest(b, u) for b, u in zip(page.items, usages, strict=True)]
        return json_ok({"object": "list", "data": data, "hasMore": page.has_more})

    async def _create(self, workspace: str, request: Request) -> Response:
        create = BudgetCreate.model_validate(await read_json_object(request))
        now = self.clock.now()
        if create.scope is not None:
            kind: ScopeKind | None
            kind, target = create.scope.kind_and_target()
            cel = derived_cel(kind, target)
        else:
            assert create.match is not None
            kind, target, cel = None, "", create.match.cel
            self._check_cel(cel)
        self._check_alerts(create.alerts or [])
        limits = create.limits
        budget = Budget(
            budget_id=str(ULID()),
            workspace=workspace,
            scope_kind=kind,
            scope_target=target,
            cel=cel,
            period=limits.period if limits else None,
            amount_nanos=amount_to_nanos(limits.amount) if limits else None,
            token_limit=limits.token_limit if limits else None,
            requests_per_minute=create.rate_limit.requests_per_minute if create.rate_limit else None,
            alerts=tuple(_alert(a) for a in create.alerts or ()),
            is_active=create.is_active,
            expires_at=create.expires_at,
            created_at=now,
            updated_at=now,
            time_zone=create.time_zone,
        )
        self._check_budget(budget, now, check_expiry=True)
        try:
            await self.store.create(budget)
        except BudgetConflict as exc:
            raise OrqAPIError(409, str(exc)) from None
        return json_ok({"budget": budget_rest(budget)})

    async def item(self, request: Request) -> Response:
        principal = admin_principal(self.keyring, request)
        workspace = principal.workspace
        if request.method == "GET":
            budget = await self._budget(workspace, request)
            usage = await self.counters.usage(budget, self.clock.now())
            return json_ok({"budget": budget_rest(budget, usage)})
        if request.method == "PATCH":
            return await self._update(workspace, request)
        budget = await self._budget(workspace, request)  # DELETE
        if await self.store.delete(workspace, budget.budget_id) is not None:
            await self.counters.forget(budget.budget_id)
        return json_ok({})

    async def _update(self, workspace: str, request: Request) -> Response:
        current = await self._budget(workspace, request)
        update = BudgetUpdate.model_validate(await read_json_object(request))
        now = self.clock.now()
        given = update.model_fields_set
        changes: dict[str, Any] = {"updated_at": now}
        if update.match is not None:
            if current.scope_kind is not None:
                raise OrqAPIError(
                    400,
                    "match: only budgets without a scope take a match expression; a scope is immutable "
                    "(delete and recreate the budget to change it)",
                )
            self._check_cel(update.match.cel)
            changes["cel"] = update.match.cel
        # `limits` and `rate_limit` merge field by field: a field left out is unchanged, a field sent as
        # null is removed (`{"limits": {"token_limit": null}}`); `"limits": null` removes all of them.
        if "limits" in given:
            limits = update.limits
            sent = limits.model_fields_set if limits is not None else {"period", "amount", "token_limit"}
            if "period" in sent:
                changes["period"] = limits.period if limits else None
            if "amount" in sent:
                changes["amount_nanos"] = amount_to_nanos(limits.amount) if limits else None
            if "token_limit" in sent:
                changes["token_limit"] = limits.token_limit if limits else None
        if "rate_limit" in given:
            rate_limit = update.rate_limit
            if rate_limit is None or "requests_per_minute" in rate_limit.model_fields_set:
                changes["requests_per_minute"] = rate_limit.requests_per_minute if rate_limit else None
        if update.is_active is not None:
            changes["is_active"] = update.is_active
        if update.clear_expires_at:
            changes["expires_at"] = None
        elif update.expires_at is not None:
            changes["expires_at"] = update.expires_at
        if update.time_zone is not None:
            changes["time_zone"] = update.time_zone
        if update.clear_alerts:
            changes["alerts"] = ()
        elif update.alerts is not None:
            self._check_alerts(update.alerts)
            changes["alerts"] = _edited_alerts(current.alerts, update.alerts)
        budget = dataclasses.replace(current, **changes)
        if (budget.effective_period, budget.time_zone) != (current.effective_period, current.time_zone):
            budget = dataclasses.replace(budget, counting_since=now)  # the counters start a new window
        self._check_budget(
            budget, now, check_expiry=update.expires_at is not None or update.is_active is True
        )
        try:
            await self.store.replace(budget)
        except KeyError:
            raise OrqAPIError(404, f"budget {current.budget_id!r} not found") from None
        return json_ok({"budget": budget_rest(budget)})

    async def reset_consumption(self, request: Request) -> Response:
        principal = admin_principal(self.keyring, request)
        budget = await self._budget(principal.workspace, request)
        await read_json_object(request, allow_empty=True)  # always `{}`; anything else is still JSON-checked
        now = self.clock.now()
        # Recorded first: the ledger (the event store) then counts this period from here on, so the reset
        # survives a restart that rebuilds the counters from it.
        budget = await self.store.replace(dataclasses.replace(budget, counting_since=now))
        await self.counters.reset(budget, now)
        return json_ok({"budget": budget_rest(budget)})


def _alert(alert: AlertIn, alert_id: str | None = None) -> Alert:
    return Alert(
        id=alert_id or str(ULID()),
        threshold_percent=alert.threshold_percent,
        notifier_ids=tuple(dict.fromkeys(alert.notifier_ids)),
        dimension=alert.dimension or "BUDGET_ALERT_DIMENSION_COST",
    )


def _edited_alerts(current: tuple[Alert, ...], given: list[AlertIn]) -> tuple[Alert, ...]:
    """The new alert list: an entry with a known id edits that alert, one without an id is a new alert."""
    known = {a.id for a in current}
    seen: set[str] = set()
    out = []
    for i, alert in enumerate(given):
        if alert.id is not None:
            if alert.id not in known:
                raise OrqAPIError(400, f"alerts[{i}].id: this budget has no alert {alert.id!r}")
            if alert.id in seen:
                raise OrqAPIError(400, f"alerts[{i}].id: alert {alert.id!r} is listed twice")
            seen.add(alert.id)
        out.append(_alert(alert, alert.id))
    return tuple(out)


def routes(
    *,
    keyring: KeyRing,
    store: BudgetStore,
    counters: Counters,
    clock: Clock,
    notifiers: Iterable[str] = (),
) -> list[BaseRoute]:
    """The `/v2/budgets` routes.

    Args:
        keyring: API keys (admin keys only may use these routes).
        store: the budget store; counters: the budget counters (live usage, reset, delete).
        clock: time source.
        notifiers: the configured notifier ids (`config.notifiers`); alerts may only name these.
    """
    api = _BudgetsAPI(keyring=keyring, store=store, counters=counters, clock=clock, notifiers=list(notifiers))
    return [
        Route("/v2/budgets", orq_endpoint(api.collection), methods=["GET", "POST"]),
        Route(
            "/v2/budgets/{budget_id}/reset-consumption", orq_endpoint(api.reset_consumption), methods=["POST"]
        ),
        Route("/v2/budgets/{budget_id}", orq_endpoint(api.item), methods=["GET", "PATCH", "DELETE"]),
    ]
