"""`/v2/identities`: orq's identities API (spec §2), for admin keys of the caller's workspace only.

| method | path | success |
|---|---|---|
| POST | /v2/identities | 201 `{"identity"}` (409 when `external_id` is taken) |
| GET | /v2/identities | 200 `{"object": "list", "data", "has_more"}` |
| GET, PATCH | /v2/identities/{id} | 200 `{"identity"}`; `{id}` is the `_id`, else the `external_id` |
| DELETE | /v2/identities/{id} | 200 `{}` (also drops its metrics and its identity-scoped budgets) |

Errors use orq's shape `{"message", "code"}` with a gRPC code: 400 naming the parameter or field and the
rule, 401 without a valid key, 403 for a non-admin key, 404 (code 5) for an unknown identity.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Protocol, TypeVar, cast

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from orq_proxy.auth import KeyRing
from orq_proxy.clock import Clock
from orq_proxy.errors import GRPC_ALREADY_EXISTS, OrqAPIError
from orq_proxy.identities.metrics import IdentityMetrics
from orq_proxy.identities.models import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    SEARCH_MAX,
    SEARCH_MIN,
    SORT_DISPLAY_NAME,
    SORT_UPDATED,
    TAG_MAX_CHARS,
    TAGS_MAX,
    Identity,
    IdentityCreate,
    IdentityExistsError,
    IdentityQuery,
    IdentityUpdate,
    InvalidCursorError,
    SortBy,
    identity_to_wire,
)
from orq_proxy.identities.rules import IdentityRuleError
from orq_proxy.identities.store import IdentityStore
from orq_proxy.management import admin_principal, json_ok, orq_endpoint, read_json_object

__all__ = ["IdentityBudgetHooks", "routes"]

_SORT_VALUES = (SORT_DISPLAY_NAME, SORT_UPDATED)
_CURSOR_MAX = 255
_LIMIT = re.compile(r"[0-9]{1,6}")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}

_P = TypeVar("_P", IdentityCreate, IdentityUpdate)


class IdentityBudgetHooks(Protocol):
    """What the identities API needs from the budgets slice.

    Example:
        class Hooks:
            async def identity_budget(self, workspace, external_id):
                return {"budget_id": "01J...", "limits": {"amount": 10.0}, "created_at": ..., "updated_at": ...}

            async def delete_identity_budgets(self, workspace, external_id):
                ...
    """

    async def identity_budget(self, workspace: str, external_id: str) -> dict[str, Any] | None:
        """The identity-scoped budget as spec §2.1 `IdentityBudget` (snake_case, no usage), or None."""
        ...

    async def delete_identity_budgets(self, workspace: str, external_id: str) -> None:
        """Remove the budgets scoped to this identity (it is being deleted)."""
        ...


def _single(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise OrqAPIError(400, f"{name}: give it at most once")
    return values[0] if values else None


def _bool_param(request: Request, name: str) -> bool:
    value = _single(request, name)
    if value is None:
        return False
    parsed = _BOOLS.get(value.lower())
    if parsed is None:
        raise OrqAPIError(400, f"{name}: must be true or false, got {value!r}")
    return parsed


def _cursor_param(request: Request, name: str) -> str | None:
    value = _single(request, name)
    if not value:
        return None
    if len(value) > _CURSOR_MAX:
        raise OrqAPIError(400, f"{name}: must be an identity _id (at most {_CURSOR_MAX} characters)")
    return value


def _payload(model: type[_P], data: dict[str, Any]) -> _P:
    """The validated body; a field that breaks an identity rule is a 400 saying `<field>: <rule>`, the
    same words a proxied call's body identity gets (`rules`)."""
    try:
        return model.model_validate(data)
    except IdentityRuleError as exc:
        raise OrqAPIError(400, str(exc)) from exc


def _list_query(request: Request) -> IdentityQuery:
    """The list parameters of spec §2.2, each checked; a bad one is a 400 naming it."""
    raw_limit = _single(request, "limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not _LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise OrqAPIError(400, f"limit: must be an integer from 1 to {MAX_LIMIT}, got {raw_limit!r}")
        limit = int(raw_limit)
    starting_after = _cursor_param(request, "starting_after")
    ending_before = _cursor_param(request, "ending_before")
    if starting_after and ending_before:
        raise OrqAPIError(400, "starting_after, ending_before: give at most one of the two cursors")
    search = _single(request, "search")
    if search is not None:
        search = search.strip() or None
    if search is not None and not SEARCH_MIN <= len(search) <= SEARCH_MAX:
        raise OrqAPIError(400, f"search: must be {SEARCH_MIN} to {SEARCH_MAX} characters, got {len(search)}")
    tags = tuple(dict.fromkeys(request.query_params.getlist("filter_by.tags")))
    if len(tags) > TAGS_MAX:
        raise OrqAPIError(400, f"filter_by.tags: at most {TAGS_MAX} tags, got {len(tags)}")
    for tag in tags:
        if not tag or len(tag) > TAG_MAX_CHARS:
            raise OrqAPIError(400, f"filter_by.tags: each tag must be 1 to {TAG_MAX_CHARS} characters")
    sort_by = _single(request, "sort_by")
    if sort_by is not None and sort_by not in _SORT_VALUES:
        raise OrqAPIError(400, f"sort_by: must be one of {', '.join(_SORT_VALUES)}, got {sort_by!r}")
    return IdentityQuery(
        limit=limit,
        starting_after=starting_after,
        ending_before=ending_before,
        search=search,
        tags=tags,
        sort_by=cast(SortBy | None, sort_by),
    )


class _IdentitiesAPI:
    def __init__(
        self,
        *,
        keyring: KeyRing,
        store: IdentityStore,
        metrics: IdentityMetrics,
        budget_hooks: IdentityBudgetHooks | None,
    ) -> None:
        self.keyring = keyring
        self.store = store
        self.metrics = metrics
        self.budget_hooks = budget_hooks

    async def _render(
        self, workspace: str, records: list[Identity], *, include_metrics: bool, include_budget: bool
    ) -> list[dict[str, Any]]:
        budgets: list[dict[str, Any] | None] = [None] * len(records)
        if include_budget and self.budget_hooks is not None and records:
            hooks = self.budget_hooks
            budgets = list(
                await asyncio.gather(*(hooks.identity_budget(workspace, r.external_id) for r in records))
            )
        metrics: list[dict[str, Any] | None] = [None] * len(records)
        if include_metrics:
            metrics = list(await self.metrics.snapshots(workspace, [r.external_id for r in records]))
        return [
            identity_to_wire(record, metrics=figures, budget=budget)
            for record, figures, budget in zip(records, metrics, budgets, strict=True)
        ]

    async def _existing(self, workspace: str, ref: str) -> Identity:
        record = await self.store.resolve(workspace, ref) if ref else None
        if record is None:
            raise OrqAPIError(404, f"identity {ref!r} not found (looked up by _id, then external_id)")
        return record

    async def collection(self, request: Request) -> Response:
        principal = admin_principal(self.keyring, request)
        if request.method == "POST":
            payload = _payload(IdentityCreate, await read_json_object(request))
            try:
                record = await self.store.create(principal.workspace, payload.external_id, payload.fields())
            except IdentityExistsError as exc:
                raise OrqAPIError(409, f"external_id: {exc}", code=GRPC_ALREADY_EXISTS) from exc
            return json_ok({"identity": identity_to_wire(record)}, status=201)
        query = _list_query(request)
        include_metrics = _bool_param(request, "include_metrics")
        include_budget = _bool_param(request, "include_budget")
        try:
            page = await self.store.list(principal.workspace, query)
        except InvalidCursorError as exc:
            raise OrqAPIError(400, str(exc)) from exc
        data = await self._render(
            principal.workspace, page.data, include_metrics=include_metrics, include_budget=include_budget
        )
        return json_ok({"object": "list", "data": data, "has_more": page.has_more})

    async def item(self, request: Request) -> Response:
        principal = admin_principal(self.keyring, request)
        workspace = principal.workspace
        ref: str = request.path_params["id"]
        if request.method == "GET":
            include_metrics = _bool_param(request, "include_metrics")
            include_budget = _bool_param(request, "include_budget")
            record = await self._existing(workspace, ref)
            (wire,) = await self._render(
                workspace, [record], include_metrics=include_metrics, include_budget=include_budget
            )
            return json_ok({"identity": wire})
        if request.method == "PATCH":
            payload = _payload(IdentityUpdate, await read_json_object(request, allow_empty=True))
            record = await self._existing(workspace, ref)
            updated = await self.store.update(workspace, record.id, payload.fields())
            if updated is None:  # deleted between the two calls
                raise OrqAPIError(404, f"identity {ref!r} not found")
            return json_ok({"identity": identity_to_wire(updated)})
        record = await self._existing(workspace, ref)
        deleted = await self.store.delete(workspace, record.id)
        if deleted is None:
            raise OrqAPIError(404, f"identity {ref!r} not found")
        self.metrics.forget(workspace, deleted.external_id)
        if self.budget_hooks is not None:
            await self.budget_hooks.delete_identity_budgets(workspace, deleted.external_id)
        return json_ok({})


def routes(
    *,
    keyring: KeyRing,
    store: IdentityStore,
    metrics: IdentityMetrics,
    clock: Clock,
    budget_hooks: IdentityBudgetHooks | None = None,
) -> list[BaseRoute]:
    """The `/v2/identities` routes, for app.py to mount.

    Args:
        keyring: the proxy's keys (admin keys only; the key's workspace scopes every call).
        store: the identity records.
        metrics: the 30-day rings behind `include_metrics`.
        clock: the time source (records take theirs from the store; kept for symmetry with the other
            management slices).
        budget_hooks: the budgets slice, for `include_budget` and for deleting an identity's budgets.
    """
    del clock  # timestamps come from the store's clock, the metrics window from the metrics' clock
    api = _IdentitiesAPI(keyring=keyring, store=store, metrics=metrics, budget_hooks=budget_hooks)
    return [
        Route("/v2/identities", orq_endpoint(api.collection), methods=["GET", "POST"]),
        Route("/v2/identities/{id:path}", orq_endpoint(api.item), methods=["GET", "PATCH", "DELETE"]),
    ]
