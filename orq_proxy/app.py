"""`build_app(config)`: the one place that knows the order of the stack.

Proxied requests (`/v1/*`, `/v2/router/*`, `/v3/router/*`) go through the middleware stack, outermost
first: Request -> Auth -> Routing -> Identity -> Budget -> Metering -> Upstream. Everything else (the
management API, operations endpoints) is a Starlette app with the lifespan that starts and stops the
shared resources (upstream client, sink dispatcher, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.auth import AuthMiddleware, KeyRing, Principal, hash_key
from orq_proxy.budgets.alerts import AlertDispatcher
from orq_proxy.budgets.api import BudgetIdentityHooks
from orq_proxy.budgets.api import routes as budget_routes
from orq_proxy.budgets.counters import Counters, InMemoryCounters
from orq_proxy.budgets.ledger import rebuild_counters
from orq_proxy.budgets.middleware import BudgetMiddleware
from orq_proxy.budgets.redis_counters import RedisCounters, redis_counters_from_url
from orq_proxy.budgets.store import BudgetStore, SqliteBudgetStore, budget_store_from_url
from orq_proxy.clock import Clock, SystemClock
from orq_proxy.config import ProxyConfig
from orq_proxy.errors import GRPC_INTERNAL, orq_error
from orq_proxy.identities.api import IdentityBudgetHooks
from orq_proxy.identities.api import routes as identity_routes
from orq_proxy.identities.metrics import IdentityMetrics
from orq_proxy.identities.middleware import IdentityMiddleware
from orq_proxy.identities.store import IdentityStore, identity_store_from_url
from orq_proxy.metering.middleware import MeteringMiddleware
from orq_proxy.metering.prometheus import PrometheusMetrics, prometheus_route
from orq_proxy.openapi import openapi_document
from orq_proxy.proxy.request import PROXY_PREFIXES, RequestMiddleware, route_path
from orq_proxy.proxy.routing import RoutingMiddleware
from orq_proxy.proxy.upstream import UpstreamApp, targets_from_config
from orq_proxy.reporting.api import routes as reporting_routes
from orq_proxy.sinks.base import EventBus, UsageSink, build_sinks
from orq_proxy.sinks.duckdb import DuckDBEventStore
from orq_proxy.usage.pricing import Pricer

__all__ = ["Hook", "OrqProxy", "build_app", "keyring_from_config", "tune_gc", "untune_gc"]

logger = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


def keyring_from_config(config: ProxyConfig) -> KeyRing:
    """The proxy keys of `[[api_keys]]` as a `KeyRing` (digests only; plain keys are hashed here)."""
    entries = []
    for entry in config.api_keys:
        digest = (entry.key_sha256 or hash_key(entry.key or "")).lower()
        key_id = entry.id or f"key_{digest[:12]}"
        principal = Principal(
            workspace=entry.workspace,
            project=entry.project,
            key_id=key_id,
            owner=entry.owner,
            admin=entry.admin,
        )
        entries.append((digest, principal))
    return KeyRing(entries)


class OrqProxy:
    """The ASGI app `build_app` returns: proxied paths go to the middleware stack, the rest to `management`.

    Mount it in an existing app and run its lifespan there:

        proxy = build_app(config)
        app = Starlette(routes=[Mount("/llm", app=proxy)], lifespan=proxy.lifespan)

    Attributes:
        config, clock, keyring, event_store, upstream: the shared resources (read-only after build).
        components: slice objects by name (`"identity_store"`, `"bus"`, ...), for tests and embedding code.
    """

    def __init__(
        self,
        *,
        config: ProxyConfig,
        clock: Clock,
        keyring: KeyRing,
        event_store: DuckDBEventStore,
        upstream: UpstreamApp,
        proxy_stack: ASGIApp,
        routes: list[BaseRoute],
        startup: list[Hook],
        shutdown: list[Hook],
        components: dict[str, Any],
    ) -> None:
        self.config = config
        self.clock = clock
        self.keyring = keyring
        self.event_store = event_store
        self.upstream = upstream
        self.proxy_stack = proxy_stack
        self.components = components
        self._startup = startup
        self._shutdown = shutdown
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
        self._shutdown.insert(0, hook)  # shutdown hooks run last-registered first

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Start the shared resources, yield, stop them (in reverse order)."""
        self._state = "running"
        try:
            for hook in self._startup:
                await hook()
            self.ready = True
            yield
        finally:
            self.ready = False
            self._state = "stopped"
            for hook in reversed(self._shutdown):
                try:
                    await hook()
                except Exception:
                    logger.exception("shutdown step %s failed", getattr(hook, "__qualname__", hook))

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


def build_app(
    config: ProxyConfig,
    *,
    clock: Clock | None = None,
    event_store: DuckDBEventStore | None = None,
    **overrides: Any,
) -> OrqProxy:
    """Build the proxy from its configuration.

    Args:
        config: the `ProxyConfig`.
        clock: time source (tests pass a `FakeClock`).
        event_store: the DuckDB event store (default: from `config.storage.events`).
        overrides: ready-made components by name, replacing what config would build (e.g. `sinks=[...]`
            for extra `UsageSink`s, `identity_store=...`).
    """
    if not config.upstreams:
        raise ValueError("no upstream configured: add an [upstreams.<name>] table or pass --upstream URL")
    clock = clock or SystemClock()
    keyring = keyring_from_config(config)
    if keyring.open_mode:
        logger.warning(
            "no [[api_keys]] configured: OPEN MODE, every caller is an admin of workspace 'default'"
        )
    event_store = event_store or DuckDBEventStore.from_url(config.storage.events)
    _warn_about_lifetimes(config, event_store)
    _warn_about_credentials(config)
    upstream = UpstreamApp(targets_from_config(config.upstreams))
    components: dict[str, Any] = {"event_store": event_store, "upstream": upstream}
    startup: list[Hook] = [upstream.startup]
    shutdown: list[Hook] = [upstream.aclose]
    routes: list[BaseRoute] = []

    # ---- slices: shared objects (each slice builds its own here) ----

    # identities: records (`[storage] state`: memory or sqlite:///path) and the 30-day metric rings.
    identity_store: IdentityStore = overrides.get("identity_store") or identity_store_from_url(
        config.storage.state, clock=clock
    )
    identity_metrics: IdentityMetrics = overrides.get("identity_metrics") or IdentityMetrics(clock=clock)
    # `identity_metrics.record` is a metering listener (it must see every settled UsageEvent). At startup
    # the rings are rebuilt from the event store (so a file store keeps include_metrics across restarts),
    # and every hour the rings of identities idle for the whole window are freed.
    components.update(identity_store=identity_store, identity_metrics=identity_metrics)

    async def seed_identity_metrics() -> None:
        rows = await asyncio.to_thread(identity_metrics.seed_from_events, event_store)
        if rows:
            logger.info("identity metrics: rebuilt %d identity-days from the event store", rows)

    startup.append(seed_identity_metrics)
    prune_task = _Periodic(3600.0, identity_metrics.prune)
    startup.append(prune_task.start)
    shutdown.append(prune_task.stop)
    shutdown.append(identity_store.close)
    # budgets: records + scope/CEL index, counters (reservations, periods, RPM windows), alert webhooks.
    # The gate prices its estimates with metering's `pricer` (below), so estimate and actual agree.
    budget_store: BudgetStore | None = overrides.get("budget_store")
    if budget_store is None:  # `[storage] state`: memory, or the same SQLite file as the identities
        budget_store = budget_store_from_url(config.storage.state)
        if isinstance(budget_store, SqliteBudgetStore):
            shutdown.append(budget_store.close)
    budget_counters: Counters | None = overrides.get("budget_counters")
    if budget_counters is None:
        budget_counters = _budget_counters(config.storage.counters)
        if isinstance(budget_counters, RedisCounters):
            shutdown.append(budget_counters.aclose)  # after the gate's drain (shutdown runs in reverse)
    if isinstance(budget_counters, InMemoryCounters):
        # In-memory counters start empty: rebuild the current windows from the event store (the ledger), so
        # durable records and a file event store give a durable budget.
        counters, records = budget_counters, budget_store

        async def restore_budget_counters() -> None:
            restored = await rebuild_counters(records, counters, event_store, clock.now())
            if restored:
                logger.info("budgets: rebuilt the counters of %d budgets from the event store", restored)

        startup.append(restore_budget_counters)
    budget_alerts: AlertDispatcher = overrides.get("budget_alerts") or AlertDispatcher(config.notifiers)
    components.update(budget_store=budget_store, budget_counters=budget_counters, budget_alerts=budget_alerts)
    startup.append(budget_alerts.start)
    shutdown.append(budget_alerts.aclose)
    # include_budget on identities, and deleting an identity deletes its identity-scoped budget.
    identity_budget_hooks: IdentityBudgetHooks | None = overrides.get(
        "identity_budget_hooks"
    ) or BudgetIdentityHooks(budget_store, budget_counters)

    # metering: prices (genai-prices + `[prices."provider/model"]`), the sink bus (the event store that
    # reporting reads, `[[sinks]]`, and `sinks=[...]` passed here), Prometheus counters for /metrics.
    # Each upstream's genai-prices provider is resolved once, here (`prices_as`, its name, or none).
    pricer: Pricer = overrides.get("pricer") or Pricer(
        {
            ref: (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok)
            for ref, p in config.prices.items()
        },
        prices_as={name: up.prices_as for name, up in config.upstreams.items()},
    )
    extra_sinks: list[UsageSink] = list(overrides.get("sinks") or ())
    bus: EventBus = overrides.get("bus") or EventBus([*build_sinks(config, event_store), *extra_sinks])
    prom: PrometheusMetrics = overrides.get("prom") or PrometheusMetrics()
    components.update(pricer=pricer, bus=bus, prom=prom)
    startup.append(bus.start)
    shutdown.append(bus.stop)  # runs before the event store closes: queued events are flushed into it
    routes.append(prometheus_route(prom, bus, connections=upstream.connection_counts))

    # ---- proxied stack, innermost first ----
    app: ASGIApp = upstream
    # Metering wraps the upstream directly: it sees exactly the bytes the client gets, and settles after
    # everything outside it (budget reservation via ctx.settle_hooks, identity metrics as a listener).
    app = metering = MeteringMiddleware(
        app, bus=bus, pricer=pricer, clock=clock, listeners=[identity_metrics.record], prom=prom
    )
    # Budget: inside Identity (it matches on ctx.identity), outside Metering (whose settle hook settles
    # the reservation with the actual usage; without metering a reservation is only released).
    app = budget_gate = BudgetMiddleware(
        app,
        store=budget_store,
        counters=budget_counters,
        pricer=pricer,
        clock=clock,
        default_max_output_tokens=config.budgets.default_max_output_tokens,
        fail_open=config.budgets.fail_open,
        alerts=budget_alerts,
        # A refused request never reaches metering; it is recorded all the same (status 429/503, no usage).
        on_refused=metering.record_unforwarded,
    )
    components["budget_gate"] = budget_gate
    shutdown.append(budget_gate.drain)  # settlements still talking to a remote counters backend
    # Identity needs ctx.principal (auth) and runs before the budget gate, which matches on the identity.
    # Routing runs after auth so an unauthenticated caller learns nothing about the configured upstreams.
    app = IdentityMiddleware(app, store=identity_store)
    app = RoutingMiddleware(app, upstreams=config.upstreams.keys(), default=config.default_upstream)
    app = AuthMiddleware(app, keyring=keyring)
    # Outermost: request id, bounded body read, parse once; answers 500 if anything inside raises early.
    app = RequestMiddleware(app, max_body_bytes=config.server.max_body_bytes, clock=clock)

    # ---- management API and operations ----
    proxy: OrqProxy

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # /readyz asks every remote backend to answer (each within _READY_TIMEOUT seconds).
    readiness: dict[str, Callable[[], Awaitable[None]]] = {}
    if isinstance(budget_counters, RedisCounters):
        readiness["budget counters (Redis)"] = budget_counters.ping

    async def readyz(request: Request) -> Response:
        if not proxy.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        failing = await _failing_backends(readiness)
        if failing:
            return JSONResponse({"status": "unavailable", "failing": failing}, status_code=503)
        return JSONResponse({"status": "ready"})

    routes += identity_routes(
        keyring=keyring,
        store=identity_store,
        metrics=identity_metrics,
        clock=clock,
        budget_hooks=identity_budget_hooks,
    )
    routes += budget_routes(
        keyring=keyring, store=budget_store, counters=budget_counters, clock=clock, notifiers=config.notifiers
    )
    # reporting reads the same event store the sink bus writes (`[reporting] retention_days` bounds `from`,
    # and events older than that are deleted: at startup, then hourly, in a worker thread).
    retention = timedelta(days=config.reporting.retention_days)

    def apply_retention() -> None:
        deleted = event_store.delete_before(clock.now() - retention)
        if deleted:
            logger.info("event store: deleted %d events older than %s", deleted, retention)

    retention_task = _Periodic(3600.0, apply_retention, in_thread=True, at_start=True)
    startup.append(retention_task.start)
    shutdown.append(retention_task.stop)
    routes += reporting_routes(
        keyring=keyring, event_store=event_store, clock=clock, retention_days=config.reporting.retention_days
    )
    openapi: dict[str, Any] | None = None

    async def openapi_json(request: Request) -> Response:
        nonlocal openapi
        if openapi is None:  # built on first use: it walks every request model's schema
            openapi = openapi_document()
        return JSONResponse(openapi)

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/openapi.json", openapi_json),
        *routes,
    ]
    shutdown.insert(0, _close_event_store(event_store))
    proxy = OrqProxy(
        config=config,
        clock=clock,
        keyring=keyring,
        event_store=event_store,
        upstream=upstream,
        proxy_stack=app,
        routes=routes,
        startup=startup,
        shutdown=shutdown,
        components=components,
    )
    return proxy


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


def _warn_about_credentials(config: ProxyConfig) -> None:
    """An `api_key_env` that is not set means every call goes upstream without a credential (and gets
    401 there): say so at startup, naming the variable and the upstream."""
    for name, upstream in config.upstreams.items():
        if upstream.api_key_env and not upstream.api_key and upstream.credential() is None:
            logger.warning(
                "upstream %r (%s): api_key_env %s is not set; calls will reach it without a credential",
                name,
                upstream.base_url,
                upstream.api_key_env,
            )


def _warn_about_lifetimes(config: ProxyConfig, event_store: DuckDBEventStore) -> None:
    """Say at startup what does not outlive the process with this `[storage]`."""
    storage = config.storage
    if storage.state == "memory":
        logger.warning(
            '[storage] state = "memory": identities, budgets and their spend last only as long as this '
            'process; set state = "sqlite:///<path>" and events = "duckdb:///<path>" to keep them'
        )
    elif event_store.path == ":memory:" and storage.counters == "memory":
        logger.warning(
            "[storage] events are in memory: budgets survive a restart but their spend starts again at "
            'zero (it is rebuilt from the event store); set events = "duckdb:///<path>" to keep it'
        )


def _budget_counters(url: str) -> Counters:
    """`[storage] counters`: in memory, or Redis shared by replicas (the optional `redis` extra)."""
    if url == "memory":
        return InMemoryCounters()
    return redis_counters_from_url(url)


class _Periodic:
    """Calls a synchronous `job` every `interval` seconds while the app runs: on the loop when it is cheap,
    in a worker thread when it blocks (`in_thread`); the first time at start-up too with `at_start`."""

    def __init__(
        self, interval: float, job: Callable[[], object], *, in_thread: bool = False, at_start: bool = False
    ) -> None:
        self.interval = interval
        self.job = job
        self.in_thread = in_thread
        self.at_start = at_start
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        if not self.at_start:
            await asyncio.sleep(self.interval)
        while True:
            try:
                if self.in_thread:
                    await asyncio.to_thread(self.job)
                else:
                    self.job()
            except Exception:
                logger.exception("periodic job %s failed", getattr(self.job, "__qualname__", self.job))
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _close_event_store(store: DuckDBEventStore) -> Hook:
    async def close_event_store() -> None:
        store.close()

    return close_event_store


# ---- errors outside the management endpoints: orq's JSON shape, not Starlette's plain text ----


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
