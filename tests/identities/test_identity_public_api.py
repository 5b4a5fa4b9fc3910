"""Each identities module's `__all__` lists exactly its public names."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

MODULES = [
    "orq_proxy.identities.models",
    "orq_proxy.identities.store",
    "orq_proxy.identities.sqlite",
    "orq_proxy.identities.metrics",
    "orq_proxy.identities.middleware",
    "orq_proxy.identities.api",
]


def public_names(source: str) -> set[str]:
    """Top-level names a module defines (defs, classes, assignments), minus private ones and `logger`."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_") and n != "logger"}


@pytest.mark.parametrize("name", MODULES)
def test_all_is_complete(name: str) -> None:
    """Every public name the module defines is exported, and every export exists."""
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert public_names(inspect.getsource(module)) <= exported
    assert all(hasattr(module, n) for n in exported)
    assert len(module.__all__) == len(exported)
