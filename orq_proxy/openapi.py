"""`GET /openapi.json`: an OpenAPI 3.1 description of the three surfaces.

Request bodies of the management API come from the same pydantic models that validate them, so the
document cannot drift from what the endpoints accept. The identity field rules run in validators (shared
with proxied calls, `identities/rules.py`), which pydantic cannot describe; their limits are added here from
the same constants. Every query parameter an endpoint checks is declared with the bounds it enforces, and
every status an operation can answer is listed (`tests/test_openapi_schemathesis.py` holds the server to
it). Proxied paths are described as pass-through: the upstream's status and body, or the proxy's own
denials in OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from orq_proxy import __version__
from orq_proxy.budgets.api import MAX_LIMIT as BUDGETS_MAX_LIMIT
from orq_proxy.budgets.models import ALERT_DIMENSION_COST, BudgetCreate, BudgetUpdate, Period, ScopeKind
from orq_proxy.budgets.store import SortField
from orq_proxy.identities.models import (
    DISPLAY_NAME_MAX,
    EMAIL_MAX,
    EXTERNAL_ID_MAX,
    METADATA_MAX_KEYS,
    SEARCH_MAX,
    SEARCH_MIN,
    SORT_DISPLAY_NAME,
    SORT_UPDATED,
    TAG_MAX_CHARS,
    TAGS_MAX,
    URL_MAX,
    IdentityCreate,
    IdentityUpdate,
)
from orq_proxy.identities.models import (
    MAX_LIMIT as IDENTITIES_MAX_LIMIT,
)
from orq_proxy.identities.rules import EMAIL_PART
from orq_proxy.reporting.query import (
    FILTER_FIELDS,
    GRAINS,
    GROUP_BY_VALUES,
    MAX_FILTER_VALUE_CHARS,
    MAX_FILTER_VALUES,
    MAX_FILTERS,
    METRICS,
    MODES,
    OPS,
    SORTS,
)
from orq_proxy.reporting.query import (
    MAX_LIMIT as REPORTING_MAX_LIMIT,
)

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_ORQ_ERROR = {"$ref": "#/components/schemas/OrqError"}
_OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}
_ANTHROPIC_ERROR = {"$ref": "#/components/schemas/AnthropicError"}

# The paths a proxy prefix commonly serves; any other path under a prefix is forwarded as well (`{path}`).
_PROXIED_PATHS = ("chat/completions", "completions", "embeddings", "responses")
_PROXY_PREFIXES = ("/v1", "/v2/router", "/v3/router")
# `identities/api.py` `_CURSOR_MAX`: a list cursor is an identity `_id`.
_IDENTITY_CURSOR_MAX = 255
# `budgets/api.py` `_QUERY_MAX`.
_BUDGET_QUERY_MAX = 256

_ERROR_TEXT = {
    400: "invalid request: the message names the parameter or field and the rule",
    401: "missing or invalid API key",
    403: "the API key may not do this (not an admin key, or another project)",
    404: "not found",
    409: "conflict with an existing record",
    413: "request body too large",
    429: "budget or rate limit exceeded",
    500: "the report could not be computed (the message quotes the request id)",
    502: "the upstream could not be reached or broke off",
    503: "a backend (store or counters) is unavailable; retry after `Retry-After`",
    504: "the upstream did not answer in time",
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(shape: dict[str, Any], *statuses: int) -> dict[str, Any]:
    return {str(s): _json(shape, _ERROR_TEXT[s]) for s in statuses}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _param(name: str, where: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}], "default": None}


def _json_schema_bounds(node: Any) -> None:
    """pydantic leaves `ge`/`le` of an `Annotated` number inside `X | None` as they are; JSON Schema calls
    them `minimum`/`maximum` (without the rename no tool sees the bound)."""
    if isinstance(node, dict):
        for ours, theirs in (("ge", "minimum"), ("le", "maximum")):
            if ours in node and "type" in node:
                node[theirs] = node.pop(ours)
        for value in node.values():
            _json_schema_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _json_schema_bounds(value)


def _identity_rules(schemas: dict[str, Any]) -> None:
    """The `identities/rules.py` limits, which run in validators pydantic cannot describe."""
    tag = {"type": "string", "minLength": 1, "maxLength": TAG_MAX_CHARS}
    fields = {
        "display_name": _or_null({"type": "string", "maxLength": DISPLAY_NAME_MAX}),
        "email": _or_null(
            {
                "type": "string",
                "maxLength": EMAIL_MAX,
                "pattern": f"^({EMAIL_PART}@{EMAIL_PART})?$",
                "description": "name@example.com; an empty string clears it",
            }
        ),
        "avatar_url": _or_null({"type": "string", "maxLength": URL_MAX}),
        "tags": _or_null({"type": "array", "items": tag, "maxItems": TAGS_MAX}),
        "metadata": _or_null({"type": "object", "maxProperties": METADATA_MAX_KEYS}),
    }
    for name in ("IdentityCreate", "IdentityUpdate"):
        schemas[name]["properties"].update(fields)
    schemas["IdentityCreate"]["properties"]["external_id"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": EXTERNAL_ID_MAX,
        "pattern": r"\S",
        "description": "not blank",
    }


def _budget_rules(schemas: dict[str, Any]) -> None:
    """Rules the budget models enforce in validators: alerts watch cost only."""
    dimension = schemas["AlertIn"]["properties"]["dimension"]
    dimension["anyOf"][0]["enum"] = [ALERT_DIMENSION_COST]
    for name in ("BudgetCreate", "BudgetUpdate"):
        zone = schemas[name]["properties"]["time_zone"]
        zone["description"] = "Extension: IANA zone of the period boundaries (default UTC)."


def _report_request() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["metric", "from", "to"],
        "additionalProperties": False,
        "description": "`from` < `to`, at most 90 days apart, `from` within the retention window; an "
        "explicit grain caps the range (minute: 1 day, hour: 31 days). `group_by` and `filters` "
        "dimensions must suit the metric (README).",
        "properties": {
            "metric": {"enum": list(METRICS)},
            "from": {"type": "string", "format": "date-time", "description": "inclusive"},
            "to": {"type": "string", "format": "date-time", "description": "exclusive"},
            "grain": {"enum": list(GRAINS)},
            "group_by": {"type": "array", "items": {"enum": list(GROUP_BY_VALUES)}, "uniqueItems": True},
            "filters": {
                "type": "array",
                "maxItems": MAX_FILTERS,
                "items": {
                    "type": "object",
                    "required": ["field", "op", "values"],
                    "additionalProperties": False,
                    "properties": {
                        "field": {"enum": list(FILTER_FIELDS)},
                        "op": {"enum": list(OPS)},
                        "values": {
                            "type": "array",
                            "items": {"type": "string", "minLength": 1, "maxLength": MAX_FILTER_VALUE_CHARS},
                            "minItems": 1,
                            "maxItems": MAX_FILTER_VALUES,
                            "description": "eq/neq: exactly one value",
                        },
                    },
                },
            },
            "limit": {"type": "integer", "minimum": 1, "maximum": REPORTING_MAX_LIMIT},
            "time_zone": {"type": "string", "description": "IANA zone for bucket boundaries; empty = UTC"},
            "include_totals": {"type": "boolean"},
            "mode": {"enum": list(MODES)},
            "sort": {"enum": list(SORTS)},
        },
    }


def _proxied_paths() -> dict[str, Any]:
    """The proxy prefixes: the usual OpenAI paths by name, and any other path under a prefix as `{path}`."""
    responses = {
        "200": _json({"type": "object"}, "the upstream's response (SSE when the request asks to stream)"),
        **_errors(_OPENAI_ERROR, 400, 401, 413, 429, 502, 504),
        "403": _json(
            _OPENAI_ERROR,
            "`identity_not_allowed`: the body identity or `X-ORQ-IDENTITY-ID` names an identity this API key "
            "may not attribute calls to (its `[[api_keys]] identities` rule); `param` says where it came from",
        ),
        "default": _json(_OPENAI_ERROR, "the upstream's own error status and body, passed through"),
    }

    def operation(summary: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "description": "Forwarded to the upstream chosen by the model's provider prefix. Attribution: "
                "body `orq.identity` / top-level `identity`, else header `X-ORQ-IDENTITY-ID`, else the API "
                "key's owner; a key may only name the identities its `identities` rule allows (403 "
                "`identity_not_allowed`). Budgets are enforced before forwarding (429, whose `error.rejection` says "
                "what the request would reserve, `requested`, and what is left, `remaining`; 400 "
                "`unpriced_model` for a model a cost budget cannot price). A body that is not a JSON object "
                "is a 400 `invalid_json` whatever its content type, except multipart uploads to the APIs "
                "that take them (audio transcriptions and translations, image edits and variations, files, "
                "upload parts, container files, videos).",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": responses,
            }
        }

    # Anthropic's Messages API (what Claude Code and the `anthropic` SDK call): its errors in Anthropic's shape.
    anthropic_responses = {
        "200": responses["200"],
        **_errors(_ANTHROPIC_ERROR, 400, 401, 403, 413, 429, 502, 504),
        "default": _json(_ANTHROPIC_ERROR, "the upstream's own error status and body, passed through"),
    }
    messages = operation('Anthropic\'s Messages API, forwarded to an upstream with `api = "anthropic"`')
    messages["post"]["responses"] = anthropic_responses
    messages["post"]["description"] = (
        'Forwarded to the Anthropic upstream (`[upstreams.X] api = "anthropic"`) as Claude Code and the '
        "`anthropic` SDK send it (key as `x-api-key` or `Authorization: Bearer`). Attribution as for the OpenAI "
        "paths, plus Anthropic's `metadata.user_id` (tags only) before the key's owner. Budgets reserve "
        "`max_tokens`; the proxy's own errors are in Anthropic's shape."
    )
    counting = operation("Anthropic's token counting, forwarded (never billed)")
    counting["post"]["responses"] = anthropic_responses
    paths: dict[str, Any] = {"/v1/messages": messages, "/v1/messages/count_tokens": counting}
    for prefix in _PROXY_PREFIXES:
        for name in _PROXIED_PATHS:
            paths[f"{prefix}/{name}"] = operation(f"`{name}`, forwarded")
        catch_all = operation("Any other path under the prefix, forwarded as written")
        catch_all["parameters"] = [
            {
                **_param("path", "path", {"type": "string", "pattern": r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]*$"}),
                "required": True,
                "description": "the rest of the path (one segment here; deeper paths are forwarded too, "
                "paths with `.`/`..` segments are refused)",
            }
        ]
        paths[f"{prefix}/{{path}}"] = catch_all
    return paths


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (built once by the caller and served as is)."""
    _, defs = models_json_schema(
        [(m, "validation") for m in (IdentityCreate, IdentityUpdate, BudgetCreate, BudgetUpdate)],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    _json_schema_bounds(schemas)
    _identity_rules(schemas)
    _budget_rules(schemas)
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
    schemas["AnthropicError"] = {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    }
    schemas["ReportRequest"] = _report_request()
    any_object = {"type": "object"}
    # Every management call: a bad parameter (400), no key (401), a non-admin key (403), a backend down (503).
    read_errors = (400, 401, 403, 503)
    write_errors = (400, 401, 403, 413, 503)
    identity_id = _param("id", "path", {"type": "string", "minLength": 1}, required=True)
    identity_id["description"] = "the identity's `_id`, else its `external_id`"
    budget_id = _param("budget_id", "path", {"type": "string", "minLength": 1}, required=True)
    boolean = {"type": "boolean"}
    includes = [_param("include_metrics", "query", boolean), _param("include_budget", "query", boolean)]
    identity_cursor = {"type": "string", "maxLength": _IDENTITY_CURSOR_MAX}
    paths = _proxied_paths()
    paths.update(
        {
            "/v2/identities": {
                "get": {
                    "summary": "List identities",
                    "description": "Give at most one of `starting_after` / `ending_before`; a cursor is an "
                    "`_id` of this workspace.",
                    "parameters": [
                        _param(
                            "limit",
                            "query",
                            {"type": "integer", "minimum": 1, "maximum": IDENTITIES_MAX_LIMIT},
                        ),
                        _param("starting_after", "query", identity_cursor),
                        _param("ending_before", "query", identity_cursor),
                        _param(
                            "search",
                            "query",
                            {"type": "string", "minLength": SEARCH_MIN, "maxLength": SEARCH_MAX},
                        ),
                        _param(
                            "filter_by.tags",
                            "query",
                            {
                                "type": "array",
                                "items": {"type": "string", "minLength": 1, "maxLength": TAG_MAX_CHARS},
                                "maxItems": TAGS_MAX,
                            },
                        ),
                        *includes,
                        _param("sort_by", "query", {"enum": [SORT_DISPLAY_NAME, SORT_UPDATED]}),
                    ],
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *read_errors)},
                },
                "post": {
                    "summary": "Create an identity",
                    "requestBody": _body(_REF.format(model="IdentityCreate")),
                    "responses": {
                        "201": _json(any_object, "Created"),
                        **_errors(_ORQ_ERROR, *write_errors, 409),
                    },
                },
            },
            "/v2/identities/{id}": {
                "parameters": [identity_id],
                "get": {
                    "summary": "Retrieve by _id or external_id",
                    "parameters": includes,
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *read_errors, 404)},
                },
                "patch": {
                    "summary": "Update an identity",
                    # The server treats a missing body as `{}`, an update of nothing (tests/test_robustness.py).
                    "requestBody": {
                        **_body(_REF.format(model="IdentityUpdate")),
                        "required": False,
                        "description": "the fields to change; no body is an empty update (a no-op)",
                    },
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *write_errors, 404)},
                },
                "delete": {
                    "summary": "Delete an identity and its identity-scoped budget",
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *read_errors, 404)},
                },
            },
            "/v2/budgets": {
                "get": {
                    "summary": "List budgets",
                    "description": "Give at most one of `starting_after` / `ending_before`; unknown "
                    "parameters are refused.",
                    "parameters": [
                        _param(
                            "limit", "query", {"type": "integer", "minimum": 1, "maximum": BUDGETS_MAX_LIMIT}
                        ),
                        _param("starting_after", "query", {"type": "string"}),
                        _param("ending_before", "query", {"type": "string"}),
                        _param(
                            "scope_kind",
                            "query",
                            {"type": "array", "items": {"enum": [k.value for k in ScopeKind]}},
                        ),
                        _param("scope_target_id", "query", {"type": "string"}),
                        _param("is_active", "query", boolean),
                        _param(
                            "period", "query", {"type": "array", "items": {"enum": [p.value for p in Period]}}
                        ),
                        _param("query", "query", {"type": "string", "maxLength": _BUDGET_QUERY_MAX}),
                        _param("sort_by", "query", {"enum": [f.value for f in SortField]}),
                    ],
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *read_errors)},
                },
                "post": {
                    "summary": "Create a budget",
                    "description": "Exactly one of `scope` / `match`, and at least one of `limits.amount`, "
                    "`limits.token_limit` or `rate_limit.requests_per_minute`.",
                    "requestBody": _body(_REF.format(model="BudgetCreate")),
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *write_errors, 409)},
                },
            },
            "/v2/budgets/{budget_id}": {
                "parameters": [budget_id],
                "get": {
                    "summary": "Get a budget with live usage",
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *read_errors, 404)},
                },
                "patch": {
                    "summary": "Update a budget",
                    "requestBody": _body(_REF.format(model="BudgetUpdate")),
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *write_errors, 404)},
                },
                "delete": {
                    "summary": "Delete a budget",
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *read_errors, 404)},
                },
            },
            "/v2/budgets/{budget_id}/reset-consumption": {
                "parameters": [budget_id],
                "post": {
                    "summary": "Zero the current period's usage",
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": {"type": "object", "maxProperties": 0}}},
                    },
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, *write_errors, 404)},
                },
            },
            "/v2/reporting": {
                "post": {
                    "summary": "Query usage, cost, errors and latency",
                    "requestBody": _body("#/components/schemas/ReportRequest"),
                    "responses": {"200": _json(any_object), **_errors(_ORQ_ERROR, 400, 401, 403, 413, 500)},
                }
            },
            "/healthz": {
                "get": {"summary": "Liveness", "security": [], "responses": {"200": _json(any_object)}}
            },
            # The dashboard (orq_proxy/ui): static files, no key (the page sends one to /v2/* itself).
            "/ui": {
                "get": {
                    "summary": "The dashboard (HTML page)",
                    "security": [],
                    "responses": {
                        "200": {"description": "OK", "content": {"text/html": {"schema": {"type": "string"}}}}
                    },
                }
            },
            "/ui/": {
                "get": {
                    "summary": "Redirects to /ui",
                    "security": [],
                    "responses": {"308": {"description": "Permanent redirect to /ui"}},
                }
            },
            "/ui/static/{path}": {
                "get": {
                    "summary": "A file of the dashboard (scripts, styles, the vendored uPlot)",
                    "security": [],
                    "parameters": [
                        {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {"description": "The file, with its content type"},
                        "404": {
                            "description": "No such file",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness",
                    "security": [],
                    "responses": {
                        "200": _json(any_object),
                        "503": _json(any_object, "starting, or a remote backend does not answer"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": 'Prometheus text (admin keys only unless `[server] metrics = "open"`)',
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **{
                            str(status): {
                                "description": _ERROR_TEXT[status],
                                "content": {"text/plain": {"schema": {"type": "string"}}},
                            }
                            for status in (401, 403)
                        },
                    },
                }
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
