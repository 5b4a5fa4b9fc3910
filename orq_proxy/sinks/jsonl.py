"""`JsonlSink`: appends events to a JSON Lines file, one event per line, written in a worker thread."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from orq_proxy.usage.events import UsageEvent

__all__ = ["JsonlSink"]


class JsonlSink:
    """A `UsageSink` appending `UsageEvent.model_dump_json()` lines to `path`.

    The file is opened in append mode for each batch (so an external log rotation is picked up) and each
    batch is written with one `write` call, from a worker thread so the event loop never waits on disk.
    The parent directory is created if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"jsonl:{self.path}"

    async def write(self, events: Sequence[UsageEvent]) -> None:
        if not events:
            return
        data = "".join(event.model_dump_json() + "\n" for event in events).encode()
        await asyncio.to_thread(self._append, data)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()

    async def close(self) -> None:
        return None
