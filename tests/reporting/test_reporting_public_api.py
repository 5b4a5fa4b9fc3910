"""Each reporting module's `__all__` lists exactly the names it defines publicly, constants first, sorted."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest


@pytest.mark.parametrize(
    "name", ["orq_proxy.reporting.query", "orq_proxy.reporting.engine", "orq_proxy.reporting.api"]
)
def test_all_sorted_and_complete(name: str) -> None:
    """Every top-level public def, class and assignment is exported, and nothing else."""
    module = importlib.import_module(name)
    defined: set[str] = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    exported = list(module.__all__)
    assert set(exported) == {n for n in defined if not n.startswith("_") and n != "logger"}
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), n))
