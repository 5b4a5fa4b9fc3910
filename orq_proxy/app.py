"""`build_app(config)`: the one place that knows the order of the stack.

Proxied requests (`/v1/*`, `/v2/router/*`, `/v3/router/*`) go through the middleware stack, outermost
first: Request -> Auth -> Body -> Routing -> Identity -> Budget -> Metering -> Upstream. Everything else (the
management API, operations endpoints) is a Starlette app. The shared objects are a typed `Services` graph
(`orq_proxy.services`); the lifespan runs `Services.running()` and the gate's drain on one exit stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.auth import AuthMiddleware
from orq_proxy.budgets.api import routes as budget_routes
from orq_proxy.budgets.middleware import BudgetMiddleware
from orq_proxy.budgets.redis_counters import RedisCounters
from orq_proxy.clock import Clock
from orq_proxy.config import ProxyConfig
from orq_proxy.errors import GRPC_INTERNAL, orq_error
from orq_proxy.identities.api import routes as identity_routes
from orq_proxy.identities.middleware import IdentityMiddleware
from orq_proxy.metering.middleware import MeteringMiddleware
from orq_proxy.metering.prometheus import prometheus_route
from orq_proxy.openapi import openapi_document
from orq_proxy.proxy.request import PROXY_PREFIXES, BodyMiddleware, RequestMiddleware, route_path
from orq_proxy.proxy.routing import RoutingMiddleware
from orq_proxy.proxy.upstream import quiet_expected_aborts
from orq_proxy.reporting.api import routes as reporting_routes
from orq_proxy.services import Services, build_services
from orq_proxy.ui import routes as ui_routes

__all__ = ["Hook", "OrqProxy", "build_app", "tune_gc", "untune_gc"]

logger = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


class OrqProxy:
    """The ASGI app `build_app` returns: proxied paths go to the middleware stack, the rest to `management`.

    Mount it in an existing app and run its lifespan there:

        proxy = build_app(config)
        app = Starlette(routes=[Mount("/llm", app=proxy)], lifespan=proxy.lifespan)

    Attributes:
        services: the shared objects (`Services`: stores, counters, bus, upstream, ...).
        budget_gate: the budget layer of the stack (its `drain` runs at shutdown).
        config, clock: shortcuts to `services.config` and `services.clock`.
    """

    def __init__(
        self,
        *,
        services: Services,
        proxy_stack: ASGIApp,
        budget_gate: BudgetMiddleware,
        routes: list[BaseRoute],
    ) -> None:
        self.services = services
        self.config: ProxyConfig = services.config
        self.clock: Clock = services.clock
        self.proxy_stack = proxy_stack
        self.budget_gate = budget_gate
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self.ready = False
        # "new" until a lifespan (or the first request, when none ran) starts the resources; "stopped" after
        # a lifespan shut them down (requests then are not allowed to start them again).
        self._state = "new"
        self._start_lock = asyncio.Lock()
        self._lazy_lifespan: contextlib.AbstractAsyncContextManager[None] | None = None
        self.management = Starlette(
            routes=routes, lifespan=self.lifespan, exception_handlers=_MANAGEMENT_ERROR_HANDLERS
        )

    def on_startup(self, hook: Hook) -> None:
        """Run `hook` at the end of startup, after the shared resources are up (e.g. `tune_gc`)."""
        self._startup.append(hook)

    def on_shutdown(self, hook: Hook) -> None:
        """Run `hook` at the end of shutdown, after the shared resources are stopped."""
        self._shutdown.append(hook)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Start the shared resources, yield, stop them (in reverse order; each stop registered right
        after its start, so a failed startup stops only what had started)."""
        self._state = "running"
        quiet_expected_aborts()  # an upstream dying mid-stream: one warning line, not also a traceback
        try:
            async with contextlib.AsyncExitStack() as stack:
                for hook in self._shutdown:  # registered first: they run after everything else stopped
                    stack.push_async_callback(hook)
                await stack.enter_async_context(self.services.running())
                # Settlements still talking to a remote counters backend finish before it closes.
                stack.push_async_callback(self.budget_gate.drain)
                for hook in self._startup:
                    await hook()
                self.ready = True
                yield
        finally:
            self.ready = False
            self._state = "stopped"

    async def _start_without_lifespan(self) -> None:
        """The host never ran our lifespan (Starlette does not run a mounted app's): start the shared
        resources now, once, so that no usage event is lost; say so once."""
        async with self._start_lock:
            if self._state != "new":
                return
            logger.warning(
                "orq-proxy's lifespan did not run (mounted without it?): starting its resources on the first "
                "request. Run it in the host app's lifespan (`async with proxy.lifespan(app): yield`) so "
                "they also stop cleanly and queued usage events are flushed at shutdown"
            )
            self._lazy_lifespan = self.lifespan()
            await self._lazy_lifespan.__aenter__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self._state == "new":
                await self._start_without_lifespan()
            path = route_path(scope)
            for prefix in PROXY_PREFIXES:
                if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                    await self.proxy_stack(scope, receive, send)
                    return
        await self.management(scope, receive, send)


def build_app(config: ProxyConfig, **services: Any) -> OrqProxy:
    """Build the proxy from its configuration: the `Services`, the middleware stack, the routes.

    Args:
        config: the `ProxyConfig`.
        services: replacements for what config would build, by `build_services`' keywords (`clock=`,
            `event_store=`, `sinks=[...]` for extra `UsageSink`s, `budget_counters=`, ...); a wrong name is
            a `TypeError`.
    """
    s = build_services(config, **services)

    # ---- proxied stack, innermost first ----
    app: ASGIApp = s.upstream
    # Metering wraps the upstream directly: it sees exactly the bytes the client gets, and settles after
    # everything outside it (budget reservation via ctx.settle_hooks, identity metrics as a listener).
    app = metering = MeteringMiddleware(
        app, bus=s.bus, pricer=s.pricer, clock=s.clock, listeners=[s.identity_metrics.record], prom=s.prom
    )
    # Budget: inside Identity (it matches on ctx.identity), outside Metering (whose settle hook settles
    # the reservation with the actual usage; without metering a reservation is only released). The gate
    # prices its estimates with metering's `pricer`, so estimate and actual agree.
    app = gate = BudgetMiddleware(
        app,
        store=s.budget_store,
        counters=s.budget_counters,
        pricer=s.pricer,
        clock=s.clock,
        default_max_output_tokens=config.budgets.default_max_output_tokens,
        fail_open=config.budgets.fail_open,
        alerts=s.budget_alerts,
        # A refused request never reaches metering; it is recorded all the same (status 429/503, no usage).
        on_refused=metering.record_unforwarded,
        unpriced=config.budgets.unpriced,
    )
    # Identity needs ctx.principal (auth) and runs before the budget gate, which matches on the identity.
    # Its own 400s and 503s are usage events too (status ERROR, no usage), like the gate's refusals.
    app = IdentityMiddleware(app, store=s.identity_store, on_refused=metering.record_unforwarded)
    app = _routing(app, config)  # after auth: an unauthenticated caller learns nothing of the upstreams
    app = BodyMiddleware(app, max_body_bytes=config.server.max_body_bytes)  # bounded read, parsed once
    app = AuthMiddleware(app, keyring=s.keyring)  # from the headers: without a valid key no body is read
    # Outermost: request id, context, dot-segment paths refused; answers 500 if anything inside raises early.
    app = RequestMiddleware(app, clock=s.clock, read_body=False)

    # ---- management API and operations ----
    proxy: OrqProxy
    routes: list[BaseRoute] = [
        *_operations_routes(s, is_ready=lambda: proxy.ready),
        prometheus_route(
            s.prom,
            s.bus,
            connections=s.upstream.connection_counts,
            keyring=s.keyring,
            access=config.server.metrics,
        ),
        *identity_routes(
            keyring=s.keyring,
            store=s.identity_store,
            metrics=s.identity_metrics,
            clock=s.clock,
            budget_hooks=s.identity_budget_hooks,
        ),
        *budget_routes(
            keyring=s.keyring,
            store=s.budget_store,
            counters=s.budget_counters,
            clock=s.clock,
            notifiers=config.notifiers,
        ),
        # Reporting reads the event store the sink bus writes (`retention_days` bounds `from`).
        *reporting_routes(
            keyring=s.keyring,
            event_store=s.event_store,
            clock=s.clock,
            retention_days=config.reporting.retention_days,
        ),
        *ui_routes(),
    ]
    proxy = OrqProxy(services=s, proxy_stack=app, budget_gate=gate, routes=routes)
    return proxy


def _routing(app: ASGIApp, config: ProxyConfig) -> RoutingMiddleware:
    """Routing from `[upstreams]`: the defaults for bare names, each upstream's API, and the Azure
    deployments (deployment -> `upstream/model`) that Azure-style incoming paths name."""
    return RoutingMiddleware(
        app,
        upstreams=config.upstreams.keys(),
        default=config.default_upstream,
        apis={name: up.api for name, up in config.upstreams.items()},
        anthropic_default=config.default_anthropic_upstream,
        deployments={
            deployment: f"{name}/{model}"
            for name, up in config.upstreams.items()
            for model, deployment in up.deployments.items()
        },
    )


def _operations_routes(services: Services, *, is_ready: Callable[[], bool]) -> list[BaseRoute]:
    """`/healthz`, `/readyz` (started, and every remote backend answers) and `/openapi.json`."""
    readiness: dict[str, Callable[[], Awaitable[None]]] = {}
    counters = services.budget_counters
    if isinstance(counters, RedisCounters):
        readiness["budget counters (Redis)"] = counters.ping
    openapi: dict[str, Any] | None = None

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not is_ready():
            return JSONResponse({"status": "starting"}, status_code=503)
        failing = await _failing_backends(readiness)
        if failing:
            return JSONResponse({"status": "unavailable", "failing": failing}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def openapi_json(request: Request) -> Response:
        nonlocal openapi
        if openapi is None:  # built on first use: it walks every request model's schema
            openapi = openapi_document()
        return JSONResponse(openapi)

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/openapi.json", openapi_json)]


def tune_gc(threshold: int) -> None:
    """Tune the cyclic garbage collector for serving, once startup is done (`orq-proxy serve` calls it).

    Startup leaves ~100,000 long-lived objects (price tables, schemas, CEL programs, modules) that every
    full collection would walk again (60 ms each, several times a second under load); `gc.freeze()` moves
    them out of the collector's sight. Under concurrency the objects of in-flight requests outlive the
    default 700-allocation young collections and get promoted, which is what keeps triggering full
    collections; collecting the young generation every `threshold` allocations instead lets most of them
    die young. Garbage is still collected, only less often. `untune_gc` undoes it at shutdown.
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)


def untune_gc() -> None:
    """Undo `tune_gc`: Python's default threshold, and the frozen objects handed back to the collector
    (so that finalizers run at exit: DuckDB's bindings report frozen connections as leaks)."""
    gc.unfreeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(700, second, third)


_READY_TIMEOUT = 2.0


async def _failing_backends(checks: dict[str, Callable[[], Awaitable[None]]]) -> dict[str, str]:
    """Backend name -> why it cannot answer, for the checks that fail (all run at once, bounded)."""

    async def check(probe: Callable[[], Awaitable[None]]) -> str | None:
        try:
            await asyncio.wait_for(probe(), _READY_TIMEOUT)
        except TimeoutError:
            return f"no answer within {_READY_TIMEOUT:g} s"
        except Exception as exc:
            return str(exc)
        return None

    names = list(checks)
    results = await asyncio.gather(*(check(checks[name]) for name in names))
    return {name: why for name, why in zip(names, results, strict=True) if why is not None}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown path (404) or wrong method (405, with `Allow`) on the management side, as orq JSON."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        message = f"no API at {path}; the management API is /v2/identities, /v2/budgets and /v2/reporting"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} is not allowed on {path}; allowed: {allowed}"
    else:
        message = str(exc.detail)
    return orq_error(exc.status_code, message, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug: JSON 500 in orq's shape (Starlette still logs the traceback and re-raises)."""
    return orq_error(500, "internal error in the proxy", code=GRPC_INTERNAL)


_MANAGEMENT_ERROR_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HTTPException: _http_error,
    Exception: _internal_error,
}
