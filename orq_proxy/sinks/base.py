"""The `UsageSink` protocol and `EventBus`, the bounded in-process bus that batches events to every sink.

Failure policy: sinks fail **open**. A request only ever calls `EventBus.put_nowait`, which appends to
bounded in-memory queues and never blocks or raises. Each sink has its own queue and its own worker task,
so a slow, failing or hanging sink never holds back another sink, let alone a request. A batch that fails
(or does not finish within `write_timeout`) is retried with exponential backoff; after `max_attempts` it
is dropped. Events that do not fit a full queue are dropped too. Every drop is counted (see `stats()`,
exported on `/metrics`) and logged. `stop()` flushes what is queued, within its timeout.
With a `spool` (`sinks/spool.py`), each event is first appended to a local file, which the first sink (the
event store) acknowledges batch by batch, so a killed process loses none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from orq_proxy.usage.events import UsageEvent

if TYPE_CHECKING:
    from orq_proxy.config import ProxyConfig
    from orq_proxy.sinks.spool import EventSpool

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_QUEUE",
    "EventBus",
    "EventWriter",
    "SinkStats",
    "UsageSink",
    "build_sinks",
    "sink_name",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 100_000
DEFAULT_BATCH_SIZE = 1_000
DEFAULT_FLUSH_INTERVAL = 0.25  # reporting promises events within 1 s; each DuckDB flush costs ~2 ms of CPU
_LOG_EVERY_DROPS = 1_000


@runtime_checkable
class UsageSink(Protocol):
    """Where usage events are written. Implement both methods to add a sink.

    `write` gets a batch (in arrival order) and may raise: the bus retries the batch with backoff. It is
    never called concurrently for one sink. `close` is called once, at shutdown, after the last write.

    Example:
        class PrintSink:
            async def write(self, events: Sequence[UsageEvent]) -> None:
                for event in events:
                    print(event.event_id, event.total_cost_nanos)

            async def close(self) -> None:
                pass
    """

    async def write(self, events: Sequence[UsageEvent]) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class EventWriter(Protocol):
    """The write side of an event store, what `DuckDBSink` needs (`orq_proxy.eventstore.EventStore`
    includes it)."""

    def insert(self, events: Sequence[UsageEvent]) -> None:
        """Append `events`, all or none (blocking: the sink calls it in a worker thread)."""
        ...

    async def aclose(self) -> None:
        """Release the store (called by a sink that owns it, at shutdown)."""
        ...


def sink_name(sink: object) -> str:
    """A sink's label in stats and logs: its `name` attribute, else its class name."""
    name = getattr(sink, "name", None)
    return name if isinstance(name, str) and name else type(sink).__name__


@dataclass(slots=True)
class SinkStats:
    """Counters of one sink's queue (all monotonic except `queued`)."""

    name: str
    queued: int = 0
    written: int = 0
    failed_batches: int = 0
    dropped_full: int = 0  # did not fit the queue
    dropped_failed: int = 0  # their batch failed `max_attempts` times
    dropped_shutdown: int = 0  # still queued when `stop()` timed out

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_failed + self.dropped_shutdown


class _SinkQueue:
    """One sink's bounded queue, its worker and its counters."""

    def __init__(self, sink: UsageSink, name: str, max_queue: int) -> None:
        self.sink = sink
        self.queue: deque[UsageEvent] = deque()
        self.max_queue = max_queue
        self.stats = SinkStats(name=name)
        self.inflight: list[UsageEvent] = []  # the batch being written (popped from `queue`)
        self.wake: asyncio.Event | None = None
        self.worker: asyncio.Task[None] | None = None


class EventBus:
    """Bounded queues and background workers that batch usage events to every sink.

    Args:
        sinks: the sinks; each gets every event.
        max_queue: events held per sink before new ones are dropped (and counted).
        batch_size: the most events in one `write`.
        flush_interval: how long a worker waits to fill a batch before writing a partial one (seconds).
        max_attempts: tries per batch before it is dropped.
        backoff_initial, backoff_max: retry delays (seconds), doubling from the first up to the max.
        write_timeout: a `write` taking longer counts as failed (and is cancelled).
        spool: an `EventSpool` every event is appended to before it is queued; the first sink's written
            batches acknowledge it, and `stop()` closes it (`build_sinks` puts the event store first).

    Example:
        bus = EventBus([MemorySink(), JsonlSink("events.jsonl")])
        await bus.start(); bus.put_nowait(event); await bus.stop(timeout=5)
    """

    def __init__(
        self,
        sinks: Iterable[UsageSink],
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_attempts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        write_timeout: float = 30.0,
        spool: EventSpool | None = None,
    ) -> None:
        if max_queue < 1 or batch_size < 1 or max_attempts < 1:
            raise ValueError("max_queue, batch_size and max_attempts must be at least 1")
        if flush_interval < 0 or backoff_initial < 0 or backoff_max < 0 or write_timeout <= 0:
            raise ValueError("flush_interval and backoffs must be >= 0, write_timeout > 0")
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.write_timeout = write_timeout
        self.spool = spool
        self._queues: list[_SinkQueue] = []
        names: set[str] = set()
        for sink in sinks:
            name = base = sink_name(sink)
            n = 1
            while name in names:
                n += 1
                name = f"{base}-{n}"
            names.add(name)
            self._queues.append(_SinkQueue(sink, name, max_queue))
        self._running = False
        self._stopping = False

    @property
    def sinks(self) -> list[UsageSink]:
        return [q.sink for q in self._queues]

    # -- request side --------------------------------------------------------------------------------
    def put_nowait(self, event: UsageEvent) -> None:
        """Queue `event` for every sink. Never blocks, never raises; a full queue drops (and counts) it."""
        if self.spool is not None:
            self.spool.append(event)
        for q in self._queues:
            if len(q.queue) >= q.max_queue:
                q.stats.dropped_full += 1
                if q.stats.dropped_full % _LOG_EVERY_DROPS == 1:
                    logger.error(
                        "sink %s: queue full (%d events), %d events dropped so far",
                        q.stats.name,
                        q.max_queue,
                        q.stats.dropped_full,
                    )
                continue
            q.queue.append(event)
            wake = q.wake
            if wake is not None and (len(q.queue) == 1 or len(q.queue) == self.batch_size):
                wake.set()

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start one worker task per sink (on the running loop)."""
        if self._running:
            return
        self._running = True
        self._stopping = False
        for q in self._queues:
            q.wake = asyncio.Event()
            if q.queue:
                q.wake.set()
            q.worker = asyncio.create_task(self._work(q), name=f"orq-proxy sink {q.stats.name}")

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - one deadline over all sinks
        """Flush every queue (within `timeout` seconds overall), then close every sink.

        What is still queued when the time is up (a hanging or dead sink) is dropped and counted.
        """
        self._stopping = True
        workers = [q.worker for q in self._queues if q.worker is not None]
        for q in self._queues:
            if q.wake is not None:
                q.wake.set()
        if not workers:  # never started: flush here
            workers = [asyncio.create_task(self._drain(q)) for q in self._queues if q.queue]
        if workers:
            _, pending = await asyncio.wait(workers, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for q in self._queues:
            lost = len(q.queue) + len(q.inflight)
            if lost:
                q.queue.clear()
                q.inflight = []
                q.stats.dropped_shutdown += lost
                logger.error("sink %s: %d events not written before shutdown, dropped", q.stats.name, lost)
            q.worker = None
            q.wake = None
            try:
                await asyncio.wait_for(q.sink.close(), timeout=max(self.write_timeout, 1.0))
            except Exception:
                logger.exception("sink %s: close failed", q.stats.name)
        if self.spool is not None:
            self.spool.close()  # empties it if the event store got everything, else keeps it for replay
        self._running = False

    # -- observability -------------------------------------------------------------------------------
    def stats(self) -> list[SinkStats]:
        """A snapshot of every sink's counters."""
        out = []
        for q in self._queues:
            s = q.stats
            out.append(
                SinkStats(
                    name=s.name,
                    queued=len(q.queue) + len(q.inflight),
                    written=s.written,
                    failed_batches=s.failed_batches,
                    dropped_full=s.dropped_full,
                    dropped_failed=s.dropped_failed,
                    dropped_shutdown=s.dropped_shutdown,
                )
            )
        return out

    @property
    def dropped(self) -> int:
        """Events dropped by any sink, for any reason."""
        return sum(q.stats.dropped for q in self._queues)

    @property
    def depth(self) -> int:
        """Events waiting, over every sink."""
        return sum(len(q.queue) + len(q.inflight) for q in self._queues)

    # -- workers -------------------------------------------------------------------------------------
    async def _work(self, q: _SinkQueue) -> None:
        wake = q.wake
        assert wake is not None  # set by start() before the task exists
        while True:
            if not q.queue:
                if self._stopping:
                    return
                wake.clear()
                await wake.wait()
                continue
            if len(q.queue) < self.batch_size and not self._stopping and self.flush_interval > 0:
                # Let a batch fill up for a moment; a full batch (or stop()) wakes us at once.
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.flush_interval)
            await self._drain(q, once=True)

    async def _drain(self, q: _SinkQueue, *, once: bool = False) -> None:
        """Write batches from the head of `q` (one batch when `once`)."""
        while q.queue:
            n = min(len(q.queue), self.batch_size)
            batch = q.inflight = [q.queue.popleft() for _ in range(n)]
            await self._deliver(q, batch)
            q.inflight = []
            if once:
                return

    async def _deliver(self, q: _SinkQueue, batch: list[UsageEvent]) -> None:
        """Write one batch, retrying with backoff; drop (and count) it after `max_attempts`."""
        delay = self.backoff_initial
        for attempt in range(1, self.max_attempts + 1):
            try:
                await asyncio.wait_for(q.sink.write(batch), self.write_timeout)
            except Exception as exc:
                q.stats.failed_batches += 1
                reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                if attempt == self.max_attempts:
                    q.stats.dropped_failed += len(batch)
                    logger.error(
                        "sink %s: batch of %d events dropped after %d attempts (%s)",
                        q.stats.name,
                        len(batch),
                        attempt,
                        reason,
                    )
                    return
                logger.warning(
                    "sink %s: write of %d events failed (attempt %d/%d, %s); retrying in %.2fs",
                    q.stats.name,
                    len(batch),
                    attempt,
                    self.max_attempts,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
            else:
                q.stats.written += len(batch)
                if self.spool is not None and q is self._queues[0]:
                    # In order, by count: dropped events are never counted, so this can only lag, which
                    # keeps a segment longer (its events are re-inserted idempotently at startup).
                    self.spool.acknowledge(len(batch))
                return


def build_sinks(config: ProxyConfig, event_store: EventWriter) -> list[UsageSink]:
    """The sinks the configuration asks for: the event store first (what reporting reads), then every
    `[[sinks]]` entry (`jsonl` needs `path`; `duckdb` needs `path`, a separate database file; `memory`).

    Raises:
        ValueError: an entry misses a required key (the message names it).
    """
    # A `duckdb` entry names a DuckDB file by configuration, so this one place opens the DuckDB store.
    from orq_proxy.eventstore.duckdb import DuckDBEventStore
    from orq_proxy.sinks.duckdb import DuckDBSink
    from orq_proxy.sinks.jsonl import JsonlSink
    from orq_proxy.sinks.memory import MemorySink

    sinks: list[UsageSink] = [DuckDBSink(event_store, name="event_store")]
    for i, entry in enumerate(config.sinks):
        if entry.type == "memory":
            sinks.append(MemorySink())
            continue
        if not entry.path:
            raise ValueError(f"sinks[{i}].path is required for a {entry.type} sink")
        if entry.type == "jsonl":
            sinks.append(JsonlSink(entry.path))
        else:
            sinks.append(
                DuckDBSink(DuckDBEventStore(entry.path), owns_store=True, name=f"duckdb:{entry.path}")
            )
    return sinks
