"""orq-proxy: attribute, budget and report LLM usage per identity, as a composable ASGI middleware stack.

The names most users need, importable from here (loaded on first use, so `import orq_proxy` stays cheap):

    from orq_proxy import build_app, load_config

    proxy = build_app(load_config("orq-proxy.toml"))

Everything else lives in the submodules; names starting with `_` (and `proxy._http1`) are internal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orq_proxy.app import OrqProxy, build_app
    from orq_proxy.budgets.counters import Counters
    from orq_proxy.budgets.store import BudgetStore
    from orq_proxy.clock import Clock
    from orq_proxy.config import ProxyConfig, load_config
    from orq_proxy.context import RequestContext
    from orq_proxy.eventstore import EventStore
    from orq_proxy.eventstore.duckdb import DuckDBEventStore
    from orq_proxy.identities.store import IdentityStore
    from orq_proxy.services import Services, build_services
    from orq_proxy.sinks.base import UsageSink
    from orq_proxy.usage.events import UsageEvent
    from orq_proxy.usage.pricing import Pricer

__version__ = "0.1.0"

__all__ = [
    "BudgetStore",
    "Clock",
    "Counters",
    "DuckDBEventStore",
    "EventStore",
    "IdentityStore",
    "OrqProxy",
    "Pricer",
    "ProxyConfig",
    "RequestContext",
    "Services",
    "UsageEvent",
    "UsageSink",
    "build_app",
    "build_services",
    "load_config",
]

# name -> the module that defines it
_EXPORTS = {
    "BudgetStore": "orq_proxy.budgets.store",
    "Clock": "orq_proxy.clock",
    "Counters": "orq_proxy.budgets.counters",
    "DuckDBEventStore": "orq_proxy.eventstore.duckdb",
    "EventStore": "orq_proxy.eventstore",
    "IdentityStore": "orq_proxy.identities.store",
    "OrqProxy": "orq_proxy.app",
    "Pricer": "orq_proxy.usage.pricing",
    "ProxyConfig": "orq_proxy.config",
    "RequestContext": "orq_proxy.context",
    "Services": "orq_proxy.services",
    "UsageEvent": "orq_proxy.usage.events",
    "UsageSink": "orq_proxy.sinks.base",
    "build_app": "orq_proxy.app",
    "build_services": "orq_proxy.services",
    "load_config": "orq_proxy.config",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'orq_proxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
