"""Each budgets module's `__all__` lists exactly its public names, constants first, sorted."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

MODULES = [
    "orq_proxy.budgets.models",
    "orq_proxy.budgets.periods",
    "orq_proxy.budgets.matching",
    "orq_proxy.budgets.counters",
    "orq_proxy.budgets.redis_counters",
    "orq_proxy.budgets.store",
    "orq_proxy.budgets.middleware",
    "orq_proxy.budgets.alerts",
    "orq_proxy.budgets.api",
]


def defined_public_names(source: str) -> set[str]:
    """Names bound at the top level of a module's source (defs, classes, assignments), minus private ones."""
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
def test_all_sorted_and_complete(name: str) -> None:
    """Every public name defined in the module is in `__all__`, and `__all__` is sorted."""
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert set(exported) == defined_public_names(inspect.getsource(module))
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), n))
