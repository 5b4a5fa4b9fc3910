"""`GET /openapi.json`: an OpenAPI 3.1 description of the three surfaces.

Request bodies of the management API come from the same pydantic models that validate them, so the
document cannot drift from what the endpoints accept. Proxied paths are described as pass-through.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from orq_proxy import __version__
from orq_proxy.budgets.models import BudgetCreate, BudgetUpdate
from orq_proxy.identities.models import IdentityCreate, IdentityUpdate
from orq_proxy.reporting.query import FILTER_FIELDS, GRAINS, GROUP_BY_VALUES, METRICS, MODES, OPS, SORTS

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_ORQ_ERROR = {"$ref": "#/components/schemas/OrqError"}
_OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(shape: dict[str, Any], *statuses: int) -> dict[str, Any]:
    return {str(s): _json(shape, "error") for s in statuses}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _param(name: str, where: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (built once by the caller and served as is)."""
    _, defs = models_json_schema(
        [(m, "validation") for m in (IdentityCreate, IdentityUpdate, BudgetCreate, BudgetUpdate)],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["OrqError"] = {
        "type": "object",
        "required": ["message"],
        "properties": {
            "message": {"type": "string"},
            "code": {"type": "integer", "description": "gRPC code"},
        },
    }
    schemas["OpenAIError"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code", "param"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": ["string", "null"]},
                    "param": {"type": ["string", "null"]},
                },
            }
        },
    }
    schemas["ReportRequest"] = {
        "type": "object",
        "required": ["metric", "from", "to"],
        "additionalProperties": False,
        "properties": {
            "metric": {"enum": list(METRICS)},
            "from": {"type": "string", "format": "date-time", "description": "inclusive"},
            "to": {"type": "string", "format": "date-time", "description": "exclusive"},
            "grain": {"enum": list(GRAINS)},
            "group_by": {"type": "array", "items": {"enum": list(GROUP_BY_VALUES)}},
            "filters": {
                "type": "array",
                "maxItems": 20,
                "items": {
                    "type": "object",
                    "properties": {
                        "field": {"enum": list(FILTER_FIELDS)},
                        "op": {"enum": list(OPS)},
                        "values": {
                            "type": "array",
                            "items": {"type": "string"},
                            "minItems": 1,
                            "maxItems": 100,
                        },
                    },
                },
            },
            "limit": {"type": "integer", "minimum": 1, "maximum": 5000},
            "time_zone": {"type": "string", "description": "IANA zone for bucket boundaries"},
            "include_totals": {"type": "boolean"},
            "mode": {"enum": list(MODES)},
            "sort": {"enum": list(SORTS)},
        },
    }
    any_object = {"type": "object"}
    orq_errors = _errors(_ORQ_ERROR, 400, 401, 403, 404)
    identity_id = _param("id", "path", {"type": "string"}, required=True)
    budget_id = _param("budget_id", "path", {"type": "string"}, required=True)
    proxied = {
        "post": {
            "summary": "Forwarded to the upstream chosen by the model's provider prefix",
            "description": "Attribution: body `orq.identity` / top-level `identity`, else header "
            "`X-ORQ-IDENTITY-ID`, else the API key's owner. Budgets are enforced before forwarding (429).",
            "responses": {"200": _json(any_object), **_errors(_OPENAI_ERROR, 400, 401, 413, 429, 502, 504)},
        }
    }
    paths: dict[str, Any] = {f"{prefix}/{{path}}": proxied for prefix in ("/v1", "/v2/router", "/v3/router")}
    paths.update(
        {
            "/v2/identities": {
                "get": {
                    "summary": "List identities",
                    "parameters": [
                        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 50}),
                        _param("starting_after", "query", {"type": "string"}),
                        _param("ending_before", "query", {"type": "string"}),
                        _param("search", "query", {"type": "string"}),
                        _param("filter_by.tags", "query", {"type": "array", "items": {"type": "string"}}),
                        _param("include_metrics", "query", {"type": "boolean"}),
                        _param("include_budget", "query", {"type": "boolean"}),
                        _param(
                            "sort_by",
                            "query",
                            {"enum": ["IDENTITY_SORT_FIELD_DISPLAY_NAME", "IDENTITY_SORT_FIELD_UPDATED"]},
                        ),
                    ],
                    "responses": {"200": _json(any_object), **orq_errors},
                },
                "post": {
                    "summary": "Create an identity",
                    "requestBody": _body(_REF.format(model="IdentityCreate")),
                    "responses": {
                        "201": _json(any_object, "Created"),
                        **_errors(_ORQ_ERROR, 400, 401, 403, 409),
                    },
                },
            },
            "/v2/identities/{id}": {
                "parameters": [identity_id],
                "get": {
                    "summary": "Retrieve by _id or external_id",
                    "responses": {"200": _json(any_object), **orq_errors},
                },
                "patch": {
                    "summary": "Update an identity",
                    "requestBody": _body(_REF.format(model="IdentityUpdate")),
                    "responses": {"200": _json(any_object), **orq_errors},
                },
                "delete": {
                    "summary": "Delete an identity and its identity-scoped budget",
                    "responses": {"200": _json(any_object), **orq_errors},
                },
            },
            "/v2/budgets": {
                "get": {"summary": "List budgets", "responses": {"200": _json(any_object), **orq_errors}},
                "post": {
                    "summary": "Create a budget",
                    "requestBody": _body(_REF.format(model="BudgetCreate")),
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, 400, 401, 403, 409)},
                },
            },
            "/v2/budgets/{budget_id}": {
                "parameters": [budget_id],
                "get": {
                    "summary": "Get a budget with live usage",
                    "responses": {"200": _json(any_object), **orq_errors},
                },
                "patch": {
                    "summary": "Update a budget",
                    "requestBody": _body(_REF.format(model="BudgetUpdate")),
                    "responses": {"200": _json(any_object), **orq_errors},
                },
                "delete": {
                    "summary": "Delete a budget",
                    "responses": {"200": _json(any_object), **orq_errors},
                },
            },
            "/v2/budgets/{budget_id}/reset-consumption": {
                "parameters": [budget_id],
                "post": {
                    "summary": "Zero the current period's usage",
                    "responses": {"200": _json(any_object), **orq_errors},
                },
            },
            "/v2/reporting": {
                "post": {
                    "summary": "Query usage, cost, errors and latency",
                    "requestBody": _body("#/components/schemas/ReportRequest"),
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, 400, 401, 403)},
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json(any_object)}}},
            "/readyz": {
                "get": {"summary": "Readiness (503 while starting)", "responses": {"200": _json(any_object)}}
            },
            "/metrics": {
                "get": {"summary": "Prometheus text", "responses": {"200": {"description": "text/plain"}}}
            },
        }
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "orq-proxy", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
