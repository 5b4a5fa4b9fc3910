"""EventBus: batching, per-sink isolation, retries with backoff, drops counted, shutdown flush."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pytest

from orq_proxy.sinks.base import EventBus, UsageSink, sink_name
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.usage.events import UsageEvent

FAST = {"flush_interval": 0.01, "backoff_initial": 0.001, "backoff_max": 0.005, "write_timeout": 0.2}


def make_event(i: int) -> UsageEvent:
    return UsageEvent(
        event_id=f"ev{i:06d}",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        workspace="w",
        project="p",
        api_key_id="k",
        input_tokens=i,
    )


class FailingSink:
    """Fails the first `failures` writes, then records."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.events: list[UsageEvent] = []
        self.closed = False

    async def write(self, events: Sequence[UsageEvent]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError("disk on fire")
        self.events.extend(events)

    async def close(self) -> None:
        self.closed = True


class HangingSink:
    """Never finishes a write (until released)."""

    name = "hanging"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.closed = False

    async def write(self, events: Sequence[UsageEvent]) -> None:
        self.calls += 1
        await self.release.wait()

    async def close(self) -> None:
        self.closed = True


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll `predicate` until it holds (at most 2 s)."""
    async with asyncio.timeout(2.0):
        while not predicate():  # noqa: ASYNC110 - the sinks under test have no event to wait on
            await asyncio.sleep(0.002)


def test_sinks_satisfy_protocol() -> None:
    """The built-in and test sinks are `UsageSink`s; names come from `name` or the class."""
    assert isinstance(MemorySink(), UsageSink)
    assert isinstance(FailingSink(0), UsageSink)
    assert sink_name(FailingSink(0)) == "FailingSink" and sink_name(HangingSink()) == "hanging"


async def test_events_delivered_in_batches_within_flush_interval() -> None:
    """Events reach the sink in order, batched, well within the flush interval."""
    sink = MemorySink()
    bus = EventBus([sink], batch_size=10, flush_interval=0.05)
    await bus.start()
    t0 = time.monotonic()
    for i in range(25):
        bus.put_nowait(make_event(i))
    await wait_for(lambda: len(sink.events) == 25)
    assert time.monotonic() - t0 < 0.5
    assert [e.event_id for e in sink.events] == [make_event(i).event_id for i in range(25)]
    await bus.stop(timeout=1)
    assert sink.closed and bus.stats()[0].written == 25 and bus.dropped == 0


async def test_default_flush_interval_meets_reporting_deadline() -> None:
    """With defaults, a single event is written in well under a second."""
    sink = MemorySink()
    bus = EventBus([sink])
    assert bus.flush_interval <= 0.25
    await bus.start()
    bus.put_nowait(make_event(1))
    t0 = time.monotonic()
    await wait_for(lambda: len(sink.events) == 1)
    assert time.monotonic() - t0 < 1.0
    await bus.stop()


async def test_failing_sink_retried_then_succeeds_and_others_unaffected() -> None:
    """A sink failing twice gets its batch on the third attempt; a healthy sink is not held back."""
    flaky = FailingSink(failures=2)
    good = MemorySink()
    bus = EventBus([flaky, good], max_attempts=5, **FAST)
    await bus.start()
    bus.put_nowait(make_event(1))
    await wait_for(lambda: len(flaky.events) == 1 and len(good.events) == 1)
    stats = {s.name: s for s in bus.stats()}
    assert stats["FailingSink"].failed_batches == 2 and stats["FailingSink"].written == 1
    assert bus.dropped == 0
    await bus.stop(timeout=1)


async def test_sink_failing_every_time_drops_after_max_attempts(caplog: pytest.LogCaptureFixture) -> None:
    """After `max_attempts` the batch is dropped, counted and logged; later batches still flow."""
    dead = FailingSink(failures=3)
    bus = EventBus([dead], max_attempts=3, **FAST)
    await bus.start()
    with caplog.at_level(logging.WARNING, logger="orq_proxy.sinks.base"):
        bus.put_nowait(make_event(1))
        await wait_for(lambda: bus.stats()[0].dropped_failed == 1)
    assert dead.calls == 3
    assert "dropped after 3 attempts" in caplog.text and "disk on fire" in caplog.text
    bus.put_nowait(make_event(2))  # the sink recovered
    await wait_for(lambda: len(dead.events) == 1)
    await bus.stop(timeout=1)
    assert [e.event_id for e in dead.events] == ["ev000002"]


async def test_hanging_sink_times_out_and_does_not_block_others() -> None:
    """A write that never returns is cut off by `write_timeout`; the healthy sink keeps receiving."""
    hanging = HangingSink()
    good = MemorySink()
    bus = EventBus([hanging, good], max_attempts=2, batch_size=5, **FAST)
    await bus.start()
    for i in range(20):
        bus.put_nowait(make_event(i))
    await wait_for(lambda: len(good.events) == 20)
    assert hanging.calls >= 1
    await wait_for(lambda: bus.stats()[0].dropped_failed >= 5)
    await bus.stop(timeout=0.3)
    stats = bus.stats()[0]
    assert stats.written == 0 and stats.dropped == 20 and hanging.closed


def test_put_nowait_never_blocks_and_counts_overflow(caplog: pytest.LogCaptureFixture) -> None:
    """A full queue drops new events for that sink only, counts and logs them; nothing raises."""
    small, big = MemorySink(), FailingSink(0)
    bus = EventBus([small, big], max_queue=3)
    bus._queues[1].max_queue = 10
    with caplog.at_level(logging.ERROR, logger="orq_proxy.sinks.base"):
        for i in range(5):
            bus.put_nowait(make_event(i))
    first, second = bus.stats()
    assert (first.queued, first.dropped_full) == (3, 2)
    assert (second.queued, second.dropped_full) == (5, 0)
    assert bus.depth == 8 and bus.dropped == 2
    assert "queue full" in caplog.text


async def test_stop_flushes_everything_queued() -> None:
    """Events queued right before shutdown are all written by `stop()`."""
    sink = MemorySink()
    bus = EventBus([sink], batch_size=7, flush_interval=10.0)
    await bus.start()
    for i in range(50):
        bus.put_nowait(make_event(i))
    await bus.stop(timeout=2)
    assert len(sink.events) == 50 and bus.dropped == 0 and sink.closed


async def test_stop_without_start_flushes() -> None:
    """A bus that was never started still flushes on stop."""
    sink = MemorySink()
    bus = EventBus([sink])
    bus.put_nowait(make_event(1))
    await bus.stop(timeout=1)
    assert len(sink.events) == 1


async def test_stop_timeout_drops_and_counts_what_a_hanging_sink_holds() -> None:
    """`stop()` gives up on a hanging sink after its timeout; the rest are counted as dropped."""
    hanging = HangingSink()
    bus = EventBus([hanging], batch_size=2, flush_interval=0.0, write_timeout=60, max_attempts=1)
    await bus.start()
    for i in range(5):
        bus.put_nowait(make_event(i))
    await wait_for(lambda: hanging.calls == 1)
    t0 = time.monotonic()
    await bus.stop(timeout=0.1)
    assert time.monotonic() - t0 < 1.0
    assert bus.stats()[0].dropped_shutdown == 5  # two in flight (cancelled with the worker), three queued
    assert hanging.closed


async def test_close_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A sink whose close raises does not break shutdown."""

    class BadClose(MemorySink):
        async def close(self) -> None:
            raise RuntimeError("nope")

    bus = EventBus([BadClose(), MemorySink()])
    await bus.start()
    await bus.stop(timeout=1)
    assert "close failed" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [{"max_queue": 0}, {"batch_size": 0}, {"max_attempts": 0}, {"flush_interval": -1}, {"write_timeout": 0}],
)
def test_bad_settings_rejected(kwargs: dict[str, float]) -> None:
    """Nonsense settings fail at construction."""
    with pytest.raises(ValueError):
        EventBus([], **kwargs)  # type: ignore[arg-type]


def test_duplicate_sink_names_made_unique() -> None:
    """Two sinks of one class get distinct stat labels."""
    bus = EventBus([MemorySink(), MemorySink()])
    assert [s.name for s in bus.stats()] == ["memory", "memory-2"]
    assert len(bus.sinks) == 2


async def test_restart_after_stop() -> None:
    """A stopped bus can be started again (an app whose lifespan runs twice)."""
    sink = MemorySink()
    bus = EventBus([sink], flush_interval=0.01)
    await bus.start()
    await bus.start()  # idempotent
    await bus.stop(timeout=1)
    await bus.start()
    bus.put_nowait(make_event(1))
    await wait_for(lambda: len(sink.events) == 1)
    await bus.stop(timeout=1)
