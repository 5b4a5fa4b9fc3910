"""`POST /v2/reporting`: orq's Reporting API over the event store (spec §4).

Admin keys only (401 without a valid key, 403 for a non-admin key, both in orq's error shape). A key sees
its own workspace, and only its own project when it is project-scoped (`ReportScope.of`); filtering on
another project is 403. Every response, errors included, carries `X-Request-Id` (= `meta.request_id` on
success). Invalid requests: 400 `{"message", "code": 3}` listing every problem.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from ulid import ULID

from orq_proxy.auth import KeyRing
from orq_proxy.clock import Clock
from orq_proxy.errors import GRPC_INTERNAL, OrqAPIError, orq_error
from orq_proxy.management import admin_principal, json_ok, read_json_object
from orq_proxy.reporting.engine import ReportEngine, ReportResult
from orq_proxy.reporting.query import ReportQuery, ReportQueryError, parse_report_query
from orq_proxy.reporting.source import ReportScope, ReportSource, ReportSourceError
from orq_proxy.timefmt import rfc3339

__all__ = [
    "REQUEST_ID_HEADER",
    "render_report",
    "routes",
]

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"


def render_report(query: ReportQuery, result: ReportResult, request_id: str) -> dict[str, Any]:
    """The response body: `{"object": "report", "request", "data", "totals"?, "has_more", "meta"}`."""
    data: list[dict[str, Any]] = []
    for row in result.rows:
        item: dict[str, Any] = {}
        if row.timestamp is not None:
            item["timestamp"] = rfc3339(row.timestamp)
        item["dimensions"] = row.dimensions
        item["metrics"] = row.metrics
        data.append(item)
    body: dict[str, Any] = {"object": "report", "request": query.echo, "data": data}
    if result.totals is not None:
        body["totals"] = {"metrics": result.totals}
    body["has_more"] = result.has_more
    body["meta"] = {
        "effective_grain": result.effective_grain,
        "row_count": len(data),
        "request_id": request_id,
        "currency": "USD",
        "warnings": result.warnings,
    }
    return body


def _check_project_filters(query: ReportQuery, scope: ReportScope) -> None:
    if scope.project is None:
        return
    for i, item in enumerate(query.filters):
        if item.field == "project" and item.op in ("eq", "in"):
            other = [v for v in item.values if v != scope.project]
            if other:
                raise OrqAPIError(
                    403,
                    f"filters[{i}]: this API key is scoped to project {scope.project!r} and cannot read "
                    f"project {other[0]!r}",
                )


def routes(
    *,
    keyring: KeyRing,
    event_store: ReportSource,
    clock: Clock,
    retention_days: int = 90,
) -> list[BaseRoute]:
    """The reporting routes.

    Args:
        keyring: the proxy keys (admin keys may query).
        event_store: where the usage events are (any `ReportSource`: the app passes its event store).
        clock: time source (for the retention rule).
        retention_days: how far back `from` may reach (config `reporting.retention_days`).
    """
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
    engine = ReportEngine(event_store)

    async def query_report(request: Request) -> Response:
        request_id = f"req_{ULID()}"
        headers = {REQUEST_ID_HEADER: request_id}
        try:
            principal = admin_principal(keyring, request)
            body = await read_json_object(request)
            try:
                query = parse_report_query(body, now=clock.now(), retention_days=retention_days)
            except ReportQueryError as exc:
                raise OrqAPIError(400, str(exc)) from exc
            scope = ReportScope.of(principal)
            _check_project_filters(query, scope)
            result = await engine.run(query, scope)
        except OrqAPIError as exc:
            return orq_error(exc.status, exc.message, code=exc.code, headers=headers)
        except ReportSourceError:
            logger.exception("reporting query failed (request %s)", request_id)
            return orq_error(
                500,
                f"the report could not be computed; quote request id {request_id}",
                code=GRPC_INTERNAL,
                headers=headers,
            )
        return json_ok(render_report(query, result, request_id), headers=headers)

    return [Route("/v2/reporting", query_report, methods=["POST"])]
