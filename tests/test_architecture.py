"""The package's shape, checked from its source: no import cycles, the dependency direction of
docs/architecture.md (kernel -> slices -> app), no slice reaching into another slice's private names,
`build_app` short enough to stay the wiring and nothing else, and the public surface of `orq_proxy`.

Imports are read with `ast` from every module's top level (imports inside functions and under
`if TYPE_CHECKING:` do not run at import time, so they cannot make a cycle).
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from pathlib import Path

import pytest

import orq_proxy

ROOT = Path(orq_proxy.__file__).parent
MODULES = {
    info.name: Path(importlib.util.find_spec(info.name).origin or "")  # type: ignore[union-attr]
    for info in pkgutil.walk_packages(orq_proxy.__path__, prefix="orq_proxy.")
}
# The layers, bottom up. A module may import from its own layer and those below, never above.
KERNEL = {"usage"}  # what a request used and cost: below every slice
BASE = {"clock", "config", "context", "errors", "ids", "logs", "timefmt", "auth", "management", "postgres"}
SLICES = {"budgets", "identities", "metering", "proxy", "reporting", "sinks", "eventstore", "ui"}
TOP = {"services", "app", "openapi", "cli", "demo", "__main__"}  # openapi documents every slice's API


def part(module: str) -> str:
    """The top-level part of `orq_proxy` a module belongs to (`orq_proxy.budgets.api` -> `budgets`)."""
    return module.split(".")[1] if "." in module else ""


@functools.cache
def top_level_imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for each import that runs when `module` is imported."""
    tree = ast.parse(MODULES[module].read_text())
    out: list[tuple[str, list[str]]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                out.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return out


@functools.cache
def internal_edges() -> dict[str, set[str]]:
    """module -> the `orq_proxy` modules it imports at import time."""
    edges: dict[str, set[str]] = {}
    for module in MODULES:
        targets = set()
        for imported, names in top_level_imports(module):
            if not imported.startswith("orq_proxy."):
                continue
            for name in names:  # `from orq_proxy.budgets import api` imports the submodule
                if f"{imported}.{name}" in MODULES:
                    targets.add(f"{imported}.{name}")
            if imported in MODULES:
                targets.add(imported)
        edges[module] = targets - {module}
    return edges


def test_every_module_is_placed_in_a_layer() -> None:
    """A new top-level module or package must be given a layer here, so the direction check sees it."""
    parts = {part(m) for m in MODULES}
    assert parts <= KERNEL | BASE | SLICES | TOP | {"testing"}, parts - (KERNEL | BASE | SLICES | TOP)


def test_no_import_cycles() -> None:
    """No chain of import-time imports inside `orq_proxy` leads back to where it started."""
    edges = internal_edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])
    assert cycles == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependency_direction(module: str) -> None:
    """The kernel imports no slice; base modules import no slice; slices import neither the app layer
    nor `testing`; only the app layer wires slices together (a slice may import another slice's public
    protocols and models, never its private names)."""
    mine = part(module)
    allowed = {
        **dict.fromkeys(KERNEL, KERNEL),
        **dict.fromkeys(BASE, KERNEL | BASE | {"proxy"}),  # config checks URLs with the client's rules
        **dict.fromkeys(SLICES, KERNEL | BASE | SLICES),
        **dict.fromkeys(TOP, KERNEL | BASE | SLICES | TOP | {"testing"}),
        "testing": KERNEL | BASE | SLICES | TOP | {"testing"},
    }[mine]
    bad = sorted(t for t in internal_edges()[module] if part(t) not in allowed | {mine})
    assert bad == [], f"{module} ({mine}) imports upward: {bad}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_slice_imports_another_slices_private_names(module: str) -> None:
    """`from orq_proxy.budgets.x import _helper` is allowed inside budgets only."""
    mine = part(module)
    bad = [
        f"{imported}.{name}"
        for imported, names in top_level_imports(module)
        if imported.startswith("orq_proxy.") and part(imported) != mine and part(imported) in SLICES
        for name in names
        if name.startswith("_") or any(p.startswith("_") for p in imported.split(".")[2:])
    ]
    if mine in TOP | {"testing"}:
        bad = [b for b in bad if "._http1" not in b]  # the pool is the app's and the tests' to build
    assert bad == [], f"{module} imports private names of another slice: {bad}"


def test_build_app_is_only_the_wiring() -> None:
    """`build_app` stays under 80 lines: the services are built elsewhere (`build_services`)."""
    tree = ast.parse((ROOT / "app.py").read_text())
    (build_app,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_app"]
    assert build_app.end_lineno is not None
    assert build_app.end_lineno - build_app.lineno + 1 < 80


def test_public_surface() -> None:
    """The names users need import from `orq_proxy` itself, and are the submodules' own objects."""
    from orq_proxy.app import build_app
    from orq_proxy.config import load_config
    from orq_proxy.services import Services
    from orq_proxy.usage.events import UsageEvent

    assert orq_proxy.build_app is build_app and orq_proxy.load_config is load_config
    assert orq_proxy.Services is Services and orq_proxy.UsageEvent is UsageEvent
    for name in orq_proxy.__all__:
        assert getattr(orq_proxy, name) is not None
    with pytest.raises(AttributeError):
        _ = orq_proxy.no_such_name  # type: ignore[attr-defined]


def test_a_wrong_service_name_is_a_type_error() -> None:
    """`build_app(config, budget_stor=...)` fails loudly instead of silently building the default."""
    from orq_proxy import ProxyConfig, build_app

    config = ProxyConfig.model_validate({"upstreams": {"openai": {"base_url": "http://127.0.0.1:9/v1"}}})
    with pytest.raises(TypeError, match="budget_stor"):
        build_app(config, budget_stor=object())
