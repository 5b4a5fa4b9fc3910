"""`GET /openapi.json` describes every route the app serves, and every reference in it resolves."""

from __future__ import annotations

import re
from typing import Any

import httpx
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
