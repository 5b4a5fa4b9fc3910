"""`EventSpool`: a local append-only file of settled events, so a crashed process loses none of them.

The bus holds events in memory for up to a flush interval; a SIGKILL (or an OOM kill) in that time used to
lose them. With a spool, `EventBus.put_nowait` first appends the event to the current segment file: one
`os.write` of one JSON line on an `O_APPEND` descriptor, no fsync (the page cache outlives the process, not
the machine). The first sink (the event store) acknowledges what it committed, by count, and a segment
whose events are all acknowledged is deleted. At startup, the events of the segments left behind are read
back (a torn or garbled line is skipped) and inserted into the event store, skipping those it already has
(by `event_id`), before the new segments start.

Failure policy: fail open, like the sinks. A failed append is counted and logged, never raised: the event
still goes on the bus.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import ValidationError

from orq_proxy.usage.events import UsageEvent

__all__ = ["DEFAULT_SEGMENT_EVENTS", "EventSpool", "IdempotentEventWriter"]

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_EVENTS = 4_096  # ~2.5 MB of ~650 B lines: a startup reads back about one or two of them
_SUFFIX = ".jsonl"
_LOG_EVERY_ERRORS = 1_000
# pydantic-core's serializer, built once with the model: cheaper than `model_dump_json()` (whose wrapper
# resolves the options on each call) and than the stdlib encoder over the field values (benchmarks/spool.py).
_TO_JSON = UsageEvent.__pydantic_serializer__.to_json


@runtime_checkable
class IdempotentEventWriter(Protocol):
    """An event store that can insert the events it does not already have (`DuckDBEventStore`)."""

    def insert_new(self, events: list[UsageEvent]) -> int:
        """Insert those of `events` whose `event_id` is not stored yet; how many (blocking)."""
        ...


class EventSpool:
    """Append-only segments of JSON lines in `directory`, one line per settled event.

    Segment `<n>.jsonl` holds the events of sequence numbers `n * segment_events` to
    `(n + 1) * segment_events - 1` of this process. Use: `recover()` (the events a previous process left),
    commit them to the event store, `start()` (deletes the old segments), then `append` per event and
    `acknowledge(count)` per committed batch, and `close()` at shutdown.

    Args:
        directory: where the segments go (created if missing).
        segment_events: events per segment.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, segment_events: int = DEFAULT_SEGMENT_EVENTS
    ) -> None:
        if segment_events < 1:
            raise ValueError("segment_events must be at least 1")
        self.directory = Path(directory)
        self.segment_events = segment_events
        self.appended = 0  # sequence number of the next event (a failed append takes one too)
        self.acknowledged = 0  # events the first sink committed, in order
        self.errors = 0
        self._fd = -1
        self._segment_end = 0  # first sequence number past the open segment
        self._oldest = 0  # index of the oldest segment of this process not yet deleted
        self._started = False

    # -- startup -------------------------------------------------------------------------------------
    def _segments(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(
            (p for p in self.directory.iterdir() if p.suffix == _SUFFIX and p.stem.isdigit()),
            key=lambda p: int(p.stem),
        )

    def recover(self) -> list[UsageEvent]:
        """The events in the segments a previous process left, in order (blocking file reads).

        A line that does not parse (a write torn by a full disk or a power loss; a process kill does not
        tear one `write`) is skipped and logged. Some of the events may already be in the event store:
        the caller inserts them with `IdempotentEventWriter.insert_new`.
        """
        events: list[UsageEvent] = []
        skipped = 0
        for path in self._segments():
            for line in _lines(path.read_bytes()):
                try:
                    events.append(UsageEvent.model_validate_json(line))
                except ValidationError:
                    skipped += 1
        if skipped:
            logger.warning("event spool %s: skipped %d unreadable lines", self.directory, skipped)
        return events

    def start(self) -> None:
        """Delete the segments of a previous process (call once their events are committed) and open the
        first segment of this one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self._segments():
            path.unlink()
        self._started = True
        self._open_segment(0)

    def _open_segment(self, index: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        path = self.directory / f"{index:012d}{_SUFFIX}"
        self._segment_end = (index + 1) * self.segment_events
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    # -- request side --------------------------------------------------------------------------------
    def append(self, event: UsageEvent) -> None:
        """Write `event` as one line of the current segment: one `os.write`. Never raises.

        Before `start()` and after `close()` nothing is written, but the event still takes a sequence
        number, so the count the event store acknowledges never runs ahead of the lines.
        """
        if not self._started:
            self.appended += 1
            return
        try:
            if self.appended >= self._segment_end:
                self._open_segment(self.appended // self.segment_events)
            os.write(self._fd, _TO_JSON(event) + b"\n")
        except Exception as exc:
            self.errors += 1
            if self.errors % _LOG_EVERY_ERRORS == 1:
                logger.error(
                    "event spool %s: append failed (%s), %d so far", self.directory, exc, self.errors
                )
        self.appended += 1

    # -- sink side -----------------------------------------------------------------------------------
    def acknowledge(self, count: int) -> None:
        """`count` more events, in order, are committed to the event store: delete the segments now fully
        acknowledged (never the open one)."""
        self.acknowledged += count
        done = min(self.acknowledged, self.appended) // self.segment_events
        open_index = max(self.appended - 1, 0) // self.segment_events
        while self._oldest < done and self._oldest < open_index:
            self._unlink(self._oldest)
            self._oldest += 1

    def _unlink(self, index: int) -> None:
        try:
            (self.directory / f"{index:012d}{_SUFFIX}").unlink(missing_ok=True)
        except OSError as exc:
            logger.error("event spool %s: could not delete segment %d (%s)", self.directory, index, exc)

    def close(self) -> None:
        """At shutdown, after the bus flushed: delete every segment when all events were acknowledged, else
        keep them, so the next start inserts what the event store missed."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._started:
            return
        self._started = False
        if self.acknowledged >= self.appended:
            for path in self._segments():
                path.unlink(missing_ok=True)
        else:
            logger.warning(
                "event spool %s: %d events not acknowledged by the event store; kept for the next start",
                self.directory,
                self.appended - self.acknowledged,
            )


def _lines(data: bytes) -> Iterator[bytes]:
    """The complete lines of `data`: a last line without its newline is a torn write, left out."""
    end = data.rfind(b"\n")
    if end < 0:
        return
    for line in data[:end].split(b"\n"):
        if line:
            yield line
