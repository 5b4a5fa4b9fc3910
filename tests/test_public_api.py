"""Every module of `orq_proxy` keeps an `__all__` that is sorted, complete and names only real objects.

The rule, applied to each module the package contains (`orq_proxy` itself and everything
`pkgutil.walk_packages` finds under it):

- A module's *public names* are the names its own top-level statements bind with `def`, `async def`,
  `class`, `NAME = ...` or `NAME: T = ...`, except names starting with `_` and the module's `logger`.
  Imported names are not public names (a package may still re-export them, see below).
- A module with public names has an `__all__`; a module without any may leave it out.
- `__all__` holds every public name, no name twice, and nothing that is not an attribute of the module
  (so a re-export such as `orq_proxy.testing.FakeClock` is allowed, a stale name is not).
- `__all__` is sorted: UPPER_CASE constants first, then everything else, each group in code-point order.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import orq_proxy

MODULE_NAMES = [
    "orq_proxy",
    *sorted(info.name for info in pkgutil.walk_packages(orq_proxy.__path__, prefix="orq_proxy.")),
]

# Known gaps in files this review could not edit (their owners are on them). Strict: once a module is
# fixed its test XPASSes and fails, so the entry has to be removed here.
KNOWN_GAPS: dict[str, str] = {}


def public_names(module: ModuleType) -> set[str]:
    """The public names a module binds itself at the top level (see the module docstring)."""
    names: set[str] = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_") and name != "logger"}


def export_order(name: str) -> tuple[bool, str]:
    """Sort key of `__all__`: constants first, then the rest, each group in code-point order."""
    return (not name.isupper(), name)


def test_walk_finds_every_slice() -> None:
    """The walk reaches into every subpackage, so a new module cannot slip past the check."""
    packages = {name.split(".")[1] for name in MODULE_NAMES if "." in name}
    assert {"budgets", "identities", "metering", "proxy", "reporting", "sinks", "testing"} <= packages


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_GAPS[name], strict=True))
        if name in KNOWN_GAPS
        else name
        for name in MODULE_NAMES
    ],
)
def test_all_sorted_complete_and_real(name: str) -> None:
    """`__all__` lists every public name the module defines, each once, each existing, sorted."""
    module = importlib.import_module(name)
    defined = public_names(module)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert not defined, f"{name} defines public names but has no __all__"
        return
    exported = list(exported)
    assert sorted(defined - set(exported)) == [], f"{name}: public names missing from __all__"
    assert [n for n in exported if not hasattr(module, n)] == [], f"{name}: __all__ names missing objects"
    assert len(exported) == len(set(exported)), f"{name}: __all__ repeats a name"
    assert exported == sorted(exported, key=export_order), f"{name}: __all__ is not sorted"
