"""`GET /openapi.json` describes every route the app serves, and every reference in it resolves."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.routing import Route


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_covers_routes_and_resolves(proxy_factory: Any) -> None:
    """Every management route is documented; every `$ref` points at a schema in the document."""
    app, server = proxy_factory()
    doc = httpx.get(server.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    documented = {re.sub(r"\{[^}]+\}", "{}", p) for p in doc["paths"]}
    for route in app.management.routes:
        assert isinstance(route, Route)
        if route.path == "/openapi.json":
            continue
        path = re.sub(r"\{[^}]+\}", "{}", route.path)
        assert path in documented, path
    assert "external_id" in schemas["IdentityCreate"]["required"]


def test_every_path_template_parameter_is_declared(proxy_factory: Any) -> None:
    """A `{name}` in a path is a declared path parameter of each of its operations (tools can fill it)."""
    _app, server = proxy_factory()
    doc = httpx.get(server.url + "/openapi.json").json()
    for path, item in doc["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        for method, operation in item.items():
            if method == "parameters":
                continue
            declared = {
                p["name"]
                for p in [*item.get("parameters", []), *operation.get("parameters", [])]
                if p["in"] == "path" and p["required"]
            }
            assert declared == names, (method, path)


def _declared(doc: dict[str, Any], path: str, name: str) -> dict[str, Any]:
    (param,) = [p for p in doc["paths"][path]["get"]["parameters"] if p["name"] == name]
    schema: dict[str, Any] = param["schema"]
    return schema


# (path, parameter, where the bound is in its schema, the bound, query params at the bound)
_BOUNDS = [
    (
        "/v2/identities",
        "filter_by.tags",
        ("items", "maxLength"),
        100,
        lambda n: [("filter_by.tags", "t" * n)],
    ),
    (
        "/v2/identities",
        "filter_by.tags",
        ("maxItems",),
        10,
        lambda n: [("filter_by.tags", f"t{i}") for i in range(n)],
    ),
    ("/v2/identities", "search", ("maxLength",), 255, lambda n: [("search", "s" * n)]),
    ("/v2/identities", "starting_after", ("maxLength",), 255, lambda n: [("starting_after", "c" * n)]),
    ("/v2/identities", "limit", ("maximum",), 50, lambda n: [("limit", str(n))]),
    ("/v2/budgets", "limit", ("maximum",), 200, lambda n: [("limit", str(n))]),
    ("/v2/budgets", "query", ("maxLength",), 256, lambda n: [("query", "q" * n)]),
]


@pytest.mark.parametrize(("path", "name", "where", "bound", "params"), _BOUNDS)
def test_declared_bounds_are_the_enforced_ones(
    module_proxy_factory: Any,
    path: str,
    name: str,
    where: tuple[str, ...],
    bound: int,
    params: Callable[[int], list[tuple[str, str]]],
) -> None:
    """A list parameter's declared bound is where the server starts answering 400 naming the parameter."""
    _app, server = module_proxy_factory({"api_keys": [{"key": "sk-admin", "admin": True}]})
    doc = httpx.get(server.url + "/openapi.json").json()
    declared: Any = _declared(doc, path, name)
    for key in where:
        declared = declared[key]
    assert declared == bound
    headers = {"Authorization": "Bearer sk-admin"}
    at_bound = httpx.get(server.url + path, params=params(bound), headers=headers)
    beyond = httpx.get(server.url + path, params=params(bound + 1), headers=headers)
    # At the bound a cursor may name no record (400 for that reason, not for its length).
    assert at_bound.status_code == 200 or "no identity" in at_bound.json()["message"]
    assert beyond.status_code == 400 and beyond.json()["message"].startswith(name)


def test_patch_without_a_body_is_answered_as_documented(proxy_factory: Any) -> None:
    """A PATCH without a body: an empty update (200) where the body is optional, else 400 naming the body."""
    _app, server = proxy_factory({"api_keys": [{"key": "sk-admin", "admin": True}]})
    doc = httpx.get(server.url + "/openapi.json").json()
    headers = {"Authorization": "Bearer sk-admin"}
    identity = httpx.post(server.url + "/v2/identities", json={"external_id": "u1"}, headers=headers)
    budget = httpx.post(
        server.url + "/v2/budgets",
        json={"scope": {"workspace": {}}, "limits": {"amount": 10}},
        headers=headers,
    )
    assert identity.status_code == 201 and budget.status_code == 200
    for path, url in (
        ("/v2/identities/{id}", "/v2/identities/u1"),
        ("/v2/budgets/{budget_id}", f"/v2/budgets/{budget.json()['budget']['budgetId']}"),
    ):
        response = httpx.patch(server.url + url, headers=headers)
        if doc["paths"][path]["patch"]["requestBody"]["required"]:
            assert response.status_code == 400, path
            assert response.json() == {"message": "request body must be a JSON object", "code": 3}
        else:
            assert response.status_code == 200, path
    assert doc["paths"]["/v2/budgets/{budget_id}"]["patch"]["requestBody"]["required"] is True


def test_anthropic_messages_are_documented_with_anthropics_error_shape(proxy_factory: Any) -> None:
    """`/v1/messages` (and `count_tokens`) are described, their errors in Anthropic's shape, which is what
    the proxy answers there (checked against a real refusal: no key)."""
    _app, server = proxy_factory({"api_keys": [{"key": "sk-k"}]})
    doc = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        refused = doc["paths"][path]["post"]["responses"]["401"]
        assert refused["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/AnthropicError"
        }
    answer = httpx.post(server.url + "/v1/messages", json={"model": "claude-opus-4-7", "max_tokens": 1})
    assert answer.status_code == 401
    body = answer.json()
    schema = doc["components"]["schemas"]["AnthropicError"]
    assert body["type"] == schema["properties"]["type"]["const"]
    assert set(schema["required"]) <= set(body) and set(schema["properties"]["error"]["required"]) <= set(
        body["error"]
    )


@pytest.mark.parametrize(
    "email", ["ada@example.com", "", "a\x1f@b.c", "a@b\x85c", "\ufeffa@b.c", "a b@c.d", "a@@b", "a\u3000@b.c"]
)
def test_the_documented_email_pattern_is_the_rule_the_server_applies(email: str) -> None:
    """Python's `\\s` and ECMAScript's differ (U+001C-U+001F, U+0085, U+FEFF): the document's pattern names
    those explicitly, so a JSON Schema tool and the server accept the same addresses (schemathesis found one
    that it generated as valid and the server refused)."""
    from orq_proxy.identities.rules import IdentityRuleError, check_email
    from orq_proxy.openapi import openapi_document

    schema = openapi_document()["components"]["schemas"]["IdentityUpdate"]["properties"]["email"]["anyOf"][0]
    # The pattern as a JSON Schema tool reads it: ECMAScript's `\s`, spelled out for Python's `re`.
    ecma_space = "\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
    documented = re.fullmatch(schema["pattern"].replace("\\s", ecma_space), email) is not None
    try:
        check_email(email, "email")
        accepted = True
    except IdentityRuleError:
        accepted = False
    assert documented == accepted
