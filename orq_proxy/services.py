"""The proxy's shared, stateful objects as one typed graph: `Services`, built from config by
`build_services`, started and stopped by `Services.running()`.

`build_services(config, **overrides)` takes each field by keyword to replace what config would build (tests
pass a `FakeClock`, a ready `budget_counters`, extra `sinks`, ...); a misspelled name is a `TypeError`, as
for any Python call. `running()` starts the services in dependency order on an `AsyncExitStack` and
registers each one's stop right after its start, so a startup that fails half way stops exactly what had
started, in reverse. Stores are opened when built, so their `aclose` is registered first and runs last,
after the sink bus has flushed into the event store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, runtime_checkable

from orq_proxy.auth import KeyRing, keyring_from_config
from orq_proxy.budgets.alerts import AlertDispatcher
from orq_proxy.budgets.api import BudgetIdentityHooks
from orq_proxy.budgets.counters import Counters, InMemoryCounters
from orq_proxy.budgets.ledger import rebuild_counters
from orq_proxy.budgets.redis_counters import RedisCounters, redis_counters_from_url
from orq_proxy.budgets.store import BudgetStore, budget_store_from_url
from orq_proxy.clock import Clock, SystemClock
from orq_proxy.config import API_PRICES_AS, ProxyConfig
from orq_proxy.errors import ServiceUnavailable
from orq_proxy.eventstore import EventStore, event_store_from_url
from orq_proxy.eventstore.duckdb import parse_events_url
from orq_proxy.identities.api import IdentityBudgetHooks
from orq_proxy.identities.metrics import IdentityMetrics, IdentityTotals, SharedIdentityMetrics
from orq_proxy.identities.store import IdentityStore, identity_store_from_url
from orq_proxy.metering.prometheus import PrometheusMetrics
from orq_proxy.postgres import is_postgres_url
from orq_proxy.proxy.upstream import UpstreamApp, targets_from_config
from orq_proxy.sinks.base import EventBus, UsageSink, build_sinks
from orq_proxy.sinks.spool import EventSpool, IdempotentEventWriter
from orq_proxy.usage.pricing import Pricer

__all__ = ["Services", "build_services"]

logger = logging.getLogger(__name__)

_Stop = Callable[[], Awaitable[object]]


@runtime_checkable
class _Opens(Protocol):
    """A store that connects at startup rather than when built (the PostgreSQL stores)."""

    async def open(self) -> None: ...


@dataclass(kw_only=True, slots=True)
class Services:
    """Every shared object of one proxy. Built by `build_services`; the stack and the APIs get theirs
    from here, and `running()` is their lifespan.

    Attributes:
        config: the configuration; clock: time source; keyring: the proxy keys.
        event_store: usage events (the ledger; reporting, identity metrics and budget rebuilds read it).
        upstream: the forwarding app (its connection pool).
        identity_store, identity_metrics: identity records and their 30-day rings.
        budget_store, budget_counters, budget_alerts: budget records, counters, alert webhooks.
        identity_budget_hooks: the identities API's view of budgets.
        pricer: prices (metering and the budget gate share it); bus: the sink bus; prom: /metrics.
    """

    config: ProxyConfig
    clock: Clock
    keyring: KeyRing
    event_store: EventStore
    upstream: UpstreamApp
    identity_store: IdentityStore
    identity_metrics: IdentityMetrics
    budget_store: BudgetStore
    budget_counters: Counters
    budget_alerts: AlertDispatcher
    identity_budget_hooks: IdentityBudgetHooks
    pricer: Pricer
    bus: EventBus
    prom: PrometheusMetrics

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start everything (each stop registered right after its start), yield, stop in reverse."""
        async with contextlib.AsyncExitStack() as stack:

            def on_exit(stop: _Stop) -> None:
                stack.push_async_callback(_logged(stop))

            # Opened when built: closed last, once everything that writes to them has stopped.
            on_exit(self.event_store.aclose)
            on_exit(self.identity_store.aclose)
            on_exit(self.budget_store.aclose)
            on_exit(self.budget_counters.aclose)
            for store in (self.identity_store, self.budget_store, self.event_store):
                if isinstance(store, _Opens):
                    await store.open()  # (its aclose, registered above, copes with a half-open store)
            await self.upstream.startup()
            on_exit(self.upstream.aclose)
            await self._replay_spool()  # first: the rebuilds below read the events it recovers
            await self._seed_identity_metrics()
            prune = _Periodic(3600.0, self.identity_metrics.prune)  # rings idle for the whole window
            await prune.start()
            on_exit(prune.stop)
            if isinstance(self.budget_counters, InMemoryCounters):
                await self._rebuild_budget_counters(self.budget_counters)
            elif isinstance(self.budget_counters, RedisCounters):
                await self._watch_redis_counters(self.budget_counters)
            await self.budget_alerts.start()
            on_exit(self.budget_alerts.aclose)
            await self.bus.start()
            on_exit(self.bus.stop)  # flushes what is queued into the (still open) event store
            retention = _Periodic(3600.0, self._apply_retention, in_thread=True, at_start=True)
            await retention.start()
            on_exit(retention.stop)
            yield

    async def _replay_spool(self) -> None:
        """Insert the spooled events a killed process left into the event store (those it lacks), then
        start the spool; the bus closes it at shutdown."""
        spool = self.bus.spool
        if spool is None:
            return
        events = await asyncio.to_thread(spool.recover)
        if events:
            if not isinstance(self.event_store, IdempotentEventWriter):
                raise TypeError("[storage] spool needs an event store with insert_new")
            added = await asyncio.to_thread(self.event_store.insert_new, events)
            logger.warning(
                "event spool: recovered %d events of a previous process, %d were not in the event store",
                len(events),
                added,
            )
        await asyncio.to_thread(spool.start)

    async def _seed_identity_metrics(self) -> None:
        """The 30-day rings from the events already stored (a file store keeps include_metrics)."""
        rows = await asyncio.to_thread(self.identity_metrics.seed_from_events, self.event_store)
        if rows:
            logger.info("identity metrics: rebuilt %d identity-days from the event store", rows)

    async def _rebuild_budget_counters(self, counters: InMemoryCounters) -> None:
        """In-memory counters start empty: rebuild the current windows from the ledger, so durable records
        and a file event store give a durable budget."""
        restored = await rebuild_counters(self.budget_store, counters, self.event_store, self.clock.now())
        if restored:
            logger.info("budgets: rebuilt the counters of %d budgets from the event store", restored)

    async def _watch_redis_counters(self, counters: RedisCounters) -> None:
        """Redis counters are rebuilt from the ledger when Redis has lost its dataset: now, if it has, and
        whenever a request finds its generation marker gone. Redis down at startup is not fatal: the
        first request that reaches it rebuilds (until then requests get 503)."""

        async def rebuild() -> None:
            restored = await rebuild_counters(self.budget_store, counters, self.event_store, self.clock.now())
            if restored:
                logger.warning(
                    "budgets: Redis had lost its counters; rebuilt %d budgets from the event store", restored
                )

        counters.rebuild = rebuild
        try:
            await rebuild()
        except ServiceUnavailable as exc:
            logger.warning("budgets: %s; the counters will be checked again on the first request", exc)

    def _apply_retention(self) -> None:
        """Delete events older than `[reporting] retention_days` (blocking: runs in a worker thread)."""
        retention = timedelta(days=self.config.reporting.retention_days)
        deleted = self.event_store.delete_before(self.clock.now() - retention)
        if deleted:
            logger.info("event store: deleted %d events older than %s", deleted, retention)


def build_services(
    config: ProxyConfig,
    *,
    clock: Clock | None = None,
    keyring: KeyRing | None = None,
    event_store: EventStore | None = None,
    upstream: UpstreamApp | None = None,
    identity_store: IdentityStore | None = None,
    identity_metrics: IdentityMetrics | None = None,
    budget_store: BudgetStore | None = None,
    budget_counters: Counters | None = None,
    budget_alerts: AlertDispatcher | None = None,
    identity_budget_hooks: IdentityBudgetHooks | None = None,
    pricer: Pricer | None = None,
    sinks: Iterable[UsageSink] = (),
    bus: EventBus | None = None,
    prom: PrometheusMetrics | None = None,
) -> Services:
    """The `Services` that `config` describes; any keyword replaces the one config would build.

    Args:
        config: the `ProxyConfig`.
        sinks: extra `UsageSink`s, after the event store and `[[sinks]]` (ignored when `bus` is given).
        The rest: ready-made services (tests pass a `FakeClock`, a `budget_counters`, ...).
    """
    if not config.upstreams:
        raise ValueError("no upstream configured: add an [upstreams.<name>] table or pass --upstream URL")
    clock = clock or SystemClock()
    keyring = keyring or keyring_from_config(config)
    if keyring.open_mode:
        logger.warning(
            "no [[api_keys]] configured: OPEN MODE, every caller is an admin of workspace 'default'"
        )
    event_store = event_store or event_store_from_url(
        config.storage.events, memory_events_max=config.reporting.memory_events_max
    )
    _warn_about_lifetimes(config)
    _warn_about_credentials(config)
    storage = config.storage
    budget_store = budget_store or budget_store_from_url(storage.state)  # the identities' SQLite file too
    budget_counters = budget_counters or _budget_counters(config)
    return Services(
        config=config,
        clock=clock,
        keyring=keyring,
        event_store=event_store,
        upstream=upstream
        or UpstreamApp(
            targets_from_config(config.upstreams),
            trust_forwarded_headers=config.server.trust_forwarded_headers,
        ),
        identity_store=identity_store or identity_store_from_url(storage.state, clock=clock),
        identity_metrics=identity_metrics or _identity_metrics(event_store, clock),
        budget_store=budget_store,
        budget_counters=budget_counters,
        budget_alerts=budget_alerts or AlertDispatcher(config.notifiers),
        identity_budget_hooks=identity_budget_hooks or BudgetIdentityHooks(budget_store, budget_counters),
        # genai-prices + `[prices."provider/model"]`; each upstream's provider is resolved once, here.
        pricer=pricer
        or Pricer(
            {
                ref: (
                    p.input_per_mtok,
                    p.output_per_mtok,
                    p.cached_input_per_mtok,
                    p.cache_write_per_mtok,
                    p.cache_write_1h_per_mtok,
                )
                for ref, p in config.prices.items()
            },
            # `prices_as`, else the provider its API is (anthropic, azure), else what its name names.
            prices_as={
                name: up.prices_as or API_PRICES_AS.get(up.api) for name, up in config.upstreams.items()
            },
        ),
        # The event store first (what reporting reads), then `[[sinks]]`, then `sinks` passed here.
        bus=bus or EventBus([*build_sinks(config, event_store), *sinks], spool=_spool(config)),
        prom=prom or PrometheusMetrics(),
    )


def _identity_metrics(event_store: EventStore, clock: Clock) -> IdentityMetrics:
    """`include_metrics` from the event store when replicas share it (every replica then answers the same
    figures), else from in-process rings fed by metering."""
    if isinstance(event_store, IdentityTotals):
        return SharedIdentityMetrics(event_store, clock=clock)
    return IdentityMetrics(clock=clock)


def _spool(config: ProxyConfig) -> EventSpool | None:
    """`[storage] spool`: "auto" is `<events file>.spool` for a file event store and off in memory (an
    in-memory store loses every event at exit anyway) and for PostgreSQL (several replicas, one database:
    a spool is one process's, so it takes an explicit path)."""
    setting = config.storage.spool
    if setting == "off":
        return None
    if setting == "auto":
        if is_postgres_url(config.storage.events):
            return None
        path = parse_events_url(config.storage.events)
        return None if path == ":memory:" else EventSpool(path + ".spool")
    return EventSpool(setting)


def _budget_counters(config: ProxyConfig) -> Counters:
    """`[storage] counters`: in memory, or Redis shared by replicas (the optional `redis` extra)."""
    storage = config.storage
    if storage.counters == "memory":
        return InMemoryCounters()
    return redis_counters_from_url(
        storage.counters,
        prefix=storage.counters_prefix,
        socket_timeout=storage.redis_socket_timeout,
        connect_timeout=storage.redis_connect_timeout,
        reservation_ttl=_reservation_ttl(config),
    )


def _reservation_ttl(config: ProxyConfig) -> int:
    """`[budgets] reservation_ttl`, or the longest an upstream lets a request wait for its connection, its
    headers and a body chunk (what a request that is not streaming can take; a longer stream is still
    charged when it settles, see `redis_counters.py`)."""
    if config.budgets.reservation_ttl is not None:
        return config.budgets.reservation_ttl
    bounds = [u.connect_timeout + u.headers_timeout + u.read_timeout for u in config.upstreams.values()]
    return math.ceil(max(bounds, default=3600.0))


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


def _warn_about_lifetimes(config: ProxyConfig) -> None:
    """Say at startup what does not outlive the process with this `[storage]`."""
    storage = config.storage
    if storage.state == "memory":
        logger.warning(
            '[storage] state = "memory": identities, budgets and their spend last only as long as this '
            'process; set state = "sqlite:///<path>" and events = "duckdb:///<path>" to keep them'
        )
    elif _events_in_memory(storage.events) and storage.counters == "memory":
        logger.warning(
            "[storage] events are in memory: budgets survive a restart but their spend starts again at "
            'zero (it is rebuilt from the event store); set events = "duckdb:///<path>" to keep it'
        )
    if _events_in_memory(storage.events):
        logger.info(
            "usage events are kept in memory: at most %d ([reporting] memory_events_max, ~370 B each; the "
            "oldest are dropped past it) for %d days, gone at exit",
            config.reporting.memory_events_max,
            config.reporting.retention_days,
        )


def _events_in_memory(url: str) -> bool:
    return not is_postgres_url(url) and parse_events_url(url) == ":memory:"


def _logged(stop: _Stop) -> Callable[[], Awaitable[None]]:
    """`stop`, with a failure logged instead of raised, so one failing stop does not skip the others."""

    async def run() -> None:
        try:
            await stop()
        except Exception:
            logger.exception("shutdown step %s failed", getattr(stop, "__qualname__", stop))

    return run


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
