"""Event spool benchmark: what appending each settled event to the crash spool adds per request.

Part 1 runs metering's in-process harness (`benchmarks/metering.py`: a JSON chat completion through
`MeteringMiddleware`, no sockets) with two buses in the same process, interleaved in rounds: one without a
spool and one with an `EventSpool` in `--dir`, both draining into a discarding sink (which acknowledges the
spool, as the event store does). It reports CPU microseconds per request (user + system), the difference and the ratio.

Part 2 times `EventBus.put_nowait` alone with and without a spool, then the parts of one append: encoding an event (the serializer used, `model_dump_json()`, the
stdlib encoder over the field values) and the `os.write` of its line, per event.

    python benchmarks/spool.py [--requests 2000] [--rounds 41] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from metering import _context, _Discard, _events, _inner_app, _loop
from starlette.types import Message

from orq_proxy.clock import SystemClock
from orq_proxy.context import SCOPE_KEY
from orq_proxy.metering.middleware import MeteringMiddleware
from orq_proxy.metering.prometheus import PrometheusMetrics
from orq_proxy.sinks.base import EventBus
from orq_proxy.sinks.spool import EventSpool
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.pricing import Pricer, TokenUsage


async def _cpu_loop(app: Any, n: int) -> float:
    """CPU seconds of this process (user + system, so the `write` calls count) for `n` JSON requests: on
    a shared machine wall time mostly measures the neighbours."""

    async def receive() -> Message:  # never called by the inner app
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        return None

    gc.collect()
    t0 = time.process_time()
    for _ in range(n):
        await app({"type": "http", SCOPE_KEY: _context("json", False)}, receive, send)
    return time.process_time() - t0


async def bench_requests(requests: int, rounds: int, directory: str) -> dict[str, Any]:
    spool = EventSpool(directory)
    spool.start()
    plain_bus = EventBus([_Discard()], flush_interval=0.01)
    spool_bus = EventBus([_Discard()], flush_interval=0.01, spool=spool)
    await plain_bus.start()
    await spool_bus.start()
    prom, pricer, clock = PrometheusMetrics(), Pricer(), SystemClock()
    pricer.cost("openai", "gpt-4o", TokenUsage())  # load the price table outside the timing
    inner = _inner_app("json", 50)
    apps = {
        name: MeteringMiddleware(inner, bus=bus, pricer=pricer, clock=clock, prom=prom)
        for name, bus in (("no spool", plain_bus), ("spool", spool_bus))
    }
    times: dict[str, list[float]] = {name: [] for name in apps}
    for app in apps.values():
        await _loop(app, "json", False, 500)  # warm up
    order = list(apps)
    for _ in range(rounds):
        for name in order:
            times[name].append(await _cpu_loop(apps[name], requests))
            await asyncio.sleep(0.02)  # let the buses drain
        order.reverse()  # neither case always runs first (a shared machine drifts)
    await plain_bus.stop(timeout=5)
    await spool_bus.stop(timeout=5)
    assert not os.listdir(directory), "the spool was not emptied"
    without, with_spool = (statistics.median(times[n]) / requests * 1e6 for n in ("no spool", "spool"))
    # Each round's pair ran back to back: the median of their differences is steadier than the difference
    # of the medians on a loaded machine.
    paired = statistics.median(s - p for p, s in zip(times["no spool"], times["spool"], strict=True))
    return {
        "requests": requests * rounds,
        "no_spool_us": without,
        "spool_us": with_spool,
        "added_us": paired / requests * 1e6,
        "ratio": with_spool / without,
        "spool_errors": spool.errors,
    }


async def bench_put(directory: str, rounds: int = 20, n: int = 2_000) -> dict[str, float]:
    """CPU microseconds of `EventBus.put_nowait` with a started bus, without and with a spool."""
    event = _events(1)[0]
    out = {}
    for name, spool in (("put_nowait, no spool", None), ("put_nowait, spool", EventSpool(directory))):
        if spool is not None:
            spool.start()
        bus = EventBus([_Discard()], flush_interval=0.01, spool=spool)
        await bus.start()
        total = 0.0
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(n):
                bus.put_nowait(event)
            total += time.process_time() - t0
            await asyncio.sleep(0.02)  # let the bus drain
        await bus.stop(timeout=5)
        out[name] = total / (rounds * n) * 1e6
    return out


def bench_append(directory: str, n: int = 50_000) -> dict[str, float]:
    event = _events(1)[0]
    to_json = UsageEvent.__pydantic_serializer__.to_json
    encoder = json.JSONEncoder(separators=(",", ":")).encode

    def stdlib() -> bytes:
        values = list(event.__dict__.values())
        values[1] = values[1].isoformat()
        return encoder(values).encode()

    line = to_json(event) + b"\n"
    fd = os.open(os.path.join(directory, "append.bench"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    spool = EventSpool(os.path.join(directory, "spool"), segment_events=n * 10)
    spool.start()
    cases: dict[str, Callable[[], object]] = {
        "serializer.to_json (used)": lambda: to_json(event),
        "model_dump_json()": event.model_dump_json,
        "stdlib encoder over values": stdlib,
        "os.write of one line": lambda: os.write(fd, line),
        "EventSpool.append (all)": lambda: spool.append(event),
    }
    out = {name: min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6 for name, fn in cases.items()}
    os.close(fd)
    spool.acknowledge(spool.appended)
    spool.close()
    out["line bytes"] = float(len(line))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2_000, help="requests per round and case")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--dir", default=None, help="where the spool goes (default: a new temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, spool in {tmp}")
        spool_dir = os.path.join(tmp, "requests")
        r = await bench_requests(args.requests, args.rounds, spool_dir)
        print(
            f"JSON chat through MeteringMiddleware, {r['requests']} requests per case: "
            f"no spool {r['no_spool_us']:.2f} us, spool {r['spool_us']:.2f} us, "
            f"+{r['added_us']:.2f} us per request (paired median; ratio of medians {r['ratio']:.3f}x), append errors {r['spool_errors']}"
        )
        parts = {**await bench_put(os.path.join(tmp, "put")), **bench_append(tmp)}
        for name, value in parts.items():
            print(f"  {name:30s} {value:8.2f}" + ("" if name == "line bytes" else " us"))


if __name__ == "__main__":
    asyncio.run(main())
