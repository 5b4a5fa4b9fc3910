"""`EventSpool`: segments, acknowledgment, replay (a torn last line skipped) and its wiring in the bus and
in `Services.running()`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from orq_proxy.config import ProxyConfig
from orq_proxy.eventstore.duckdb import DuckDBEventStore
from orq_proxy.services import build_services
from orq_proxy.sinks.base import EventBus
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.sinks.spool import EventSpool, IdempotentEventWriter
from orq_proxy.usage.events import UsageEvent
from tests.sinks.test_bus import FailingSink, make_event


def _segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_appended_events_are_recovered_in_order(tmp_path: Path) -> None:
    """What a process appended and never acknowledged is what the next one recovers, equal field by field."""
    spool = EventSpool(tmp_path, segment_events=3)
    spool.start()
    events = [make_event(i) for i in range(7)]
    for event in events:
        spool.append(event)
    assert _segments(tmp_path) == ["000000000000.jsonl", "000000000001.jsonl", "000000000002.jsonl"]
    assert EventSpool(tmp_path).recover() == events


def test_a_torn_last_line_and_a_garbled_line_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A partial write at the end (no newline) and a line that is not an event are left out, and logged."""
    spool = EventSpool(tmp_path)
    spool.start()
    for i in range(3):
        spool.append(make_event(i))
    segment = tmp_path / "000000000000.jsonl"
    whole = make_event(3).model_dump_json().encode()
    with segment.open("ab") as f:
        f.write(b'{"event_id": "not an event"}\n' + whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING):
        recovered = EventSpool(tmp_path).recover()
    assert [e.event_id for e in recovered] == ["ev000000", "ev000001", "ev000002"]
    assert "skipped 1 unreadable lines" in caplog.text


def test_nothing_to_recover(tmp_path: Path) -> None:
    """A missing directory, or one with only a torn line, recovers nothing."""
    assert EventSpool(tmp_path / "missing").recover() == []
    (tmp_path / "000000000000.jsonl").write_bytes(b'{"event_id"')
    (tmp_path / "notes.txt").write_text("not a segment\n")
    assert EventSpool(tmp_path).recover() == []


def test_acknowledged_segments_are_deleted_but_never_the_open_one(tmp_path: Path) -> None:
    """A segment goes once every event in it is acknowledged; the segment being written stays."""
    spool = EventSpool(tmp_path, segment_events=2)
    spool.start()
    for i in range(5):
        spool.append(make_event(i))
    spool.acknowledge(3)
    assert _segments(tmp_path) == ["000000000001.jsonl", "000000000002.jsonl"]
    spool.acknowledge(2)
    assert _segments(tmp_path) == ["000000000002.jsonl"]
    spool.append(make_event(5))
    spool.acknowledge(1)  # segment 2 is full and acknowledged, but still the open one
    assert _segments(tmp_path) == ["000000000002.jsonl"]
    spool.close()
    assert _segments(tmp_path) == []


def test_close_keeps_what_was_not_acknowledged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At shutdown, events the store did not acknowledge stay for the next start; start() clears them."""
    spool = EventSpool(tmp_path)
    spool.start()
    spool.append(make_event(1))
    spool.append(make_event(2))
    spool.acknowledge(1)
    spool.close()
    assert "1 events not acknowledged" in caplog.text
    again = EventSpool(tmp_path)
    assert len(again.recover()) == 2
    again.start()
    assert _segments(tmp_path) == ["000000000000.jsonl"]
    assert again.recover() == []


def test_append_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failing write is counted and logged; before start() nothing is written but the count moves."""
    spool = EventSpool(tmp_path / "spool", segment_events=1)
    spool.append(make_event(0))
    assert (spool.appended, spool.errors) == (1, 0)
    assert not (tmp_path / "spool").exists()
    spool.start()
    spool.append(make_event(1))
    for path in (tmp_path / "spool").iterdir():
        path.unlink()
    (tmp_path / "spool").rmdir()  # the next append rotates into a directory that is gone
    spool.append(make_event(2))
    assert (spool.appended, spool.errors) == (3, 1)
    assert "append failed" in caplog.text
    with pytest.raises(ValueError, match="segment_events"):
        EventSpool(tmp_path, segment_events=0)


async def test_bus_spools_and_the_first_sink_acknowledges(tmp_path: Path) -> None:
    """The bus appends each event before queueing it; only the first sink's writes acknowledge, and a
    graceful stop empties the spool."""
    spool = EventSpool(tmp_path, segment_events=2)
    spool.start()
    first, failing = MemorySink(), FailingSink(failures=100)
    bus = EventBus([first, failing], spool=spool, flush_interval=0, max_attempts=1, backoff_initial=0)
    await bus.start()
    for i in range(5):
        bus.put_nowait(make_event(i))
    assert len(EventSpool(tmp_path).recover()) == 5
    await bus.stop()
    assert spool.acknowledged == 5 and len(first.events) == 5
    assert _segments(tmp_path) == []


async def test_a_failed_store_batch_stays_in_the_spool(tmp_path: Path) -> None:
    """Events the bus dropped from the event store's queue are kept for the next start's replay."""
    spool = EventSpool(tmp_path)
    spool.start()
    bus = EventBus([FailingSink(failures=100)], spool=spool, max_attempts=1, backoff_initial=0)
    await bus.start()
    bus.put_nowait(make_event(1))
    await bus.stop()
    assert [e.event_id for e in EventSpool(tmp_path).recover()] == ["ev000001"]


def test_insert_new_skips_stored_and_repeated_ids() -> None:
    """The replay insert is idempotent on `event_id`."""
    store = DuckDBEventStore()
    assert isinstance(store, IdempotentEventWriter)
    store.insert([make_event(1)])
    assert store.insert_new([make_event(1), make_event(2), make_event(2), make_event(3)]) == 2
    assert store.insert_new([]) == 0
    assert store.count() == 3
    store.close()


class _Recorder:
    def __init__(self) -> None:
        self.events: list[UsageEvent] = []

    async def write(self, events: Sequence[UsageEvent]) -> None:
        self.events.extend(events)

    async def close(self) -> None:
        return None


def _config(events: str, spool: str = "auto") -> ProxyConfig:
    return ProxyConfig.model_validate(
        {
            "upstreams": {"openai": {"base_url": "http://127.0.0.1:9/v1", "default": True}},
            "storage": {"events": f"duckdb://{events}", "spool": spool},
        }
    )


async def test_running_replays_the_spool_into_the_event_store_once(tmp_path: Path) -> None:
    """`Services.running()` inserts what a killed process spooled (skipping what the store has) before
    the rebuilds read the store, and stops with an empty spool."""
    events_file = tmp_path / "events.duckdb"
    store = DuckDBEventStore(str(events_file))
    store.insert([make_event(1)])  # committed, but the process died before its acknowledgment
    store.close()
    left = EventSpool(str(events_file) + ".spool")
    left.start()
    for i in (1, 2, 3):
        left.append(make_event(i))
    services = build_services(_config(str(events_file)))
    assert services.bus.spool is not None
    async with services.running():
        assert services.event_store.count() == 3
    store = DuckDBEventStore(str(events_file))
    assert store.count() == 3
    store.close()
    assert _segments(tmp_path / "events.duckdb.spool") == []


def test_spool_setting(tmp_path: Path) -> None:
    """auto: next to a file store, off in memory; "off"; or a directory."""
    events = str(tmp_path / "ev.duckdb")
    assert build_services(_config(":memory:")).bus.spool is None
    assert build_services(_config(events, "off")).bus.spool is None
    auto = build_services(_config(events)).bus.spool
    assert auto is not None and auto.directory == Path(events + ".spool")
    named = build_services(_config(":memory:", str(tmp_path / "spool"))).bus.spool
    assert named is not None and named.directory == tmp_path / "spool"
