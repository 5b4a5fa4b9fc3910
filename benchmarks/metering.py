"""Metering benchmark: metering's per-request cost over plain forwarding, and DuckDB sink throughput.

Part 1 drives ASGI in process (no sockets): a scripted `receive`/`send` around a trivial inner app that
answers like OpenAI (a JSON chat completion, or an SSE stream of `--chunks` content chunks). "plain" calls
the inner app directly; "metered" calls it through `MeteringMiddleware` (usage tap, event build, pricing,
Prometheus counters, `EventBus.put_nowait` with a started bus draining into a discarding sink). Both run
in the same process, interleaved in rounds, and the report gives microseconds per request and the ratio.

Part 2 pushes `--events` usage events through an `EventBus` into a `DuckDBSink` and reports events/s
until all are in the table; it also times the insert strategies that were considered (executemany, a
multi-row VALUES statement, column lists + unnest, DuckDB's appender) on a smaller batch.

    python benchmarks/metering.py [--requests 20000] [--chunks 50] [--events 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from orq_proxy.auth import Principal
from orq_proxy.clock import SystemClock
from orq_proxy.context import SCOPE_KEY, RequestContext, ResolvedIdentity
from orq_proxy.eventstore.duckdb import EVENT_COLUMNS, EVENTS_TABLE, DuckDBEventStore, event_row
from orq_proxy.metering.middleware import MeteringMiddleware
from orq_proxy.metering.prometheus import PrometheusMetrics
from orq_proxy.sinks.base import EventBus
from orq_proxy.sinks.duckdb import DuckDBSink
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.pricing import Pricer, TokenUsage

USAGE = {"prompt_tokens": 12, "completion_tokens": 50, "total_tokens": 62}


class _Discard:
    name = "discard"

    async def write(self, events: Sequence[UsageEvent]) -> None:
        return None

    async def close(self) -> None:
        return None


def _chunk(i: int, usage: bool) -> bytes:
    tail = ',"usage":null' if usage else ""
    return (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o",'
        b'"system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" word'
        + str(i).encode()
        + b'"},"logprobs":null,"finish_reason":null}]'
        + tail.encode()
        + b"}\n\n"
    )


def _inner_app(kind: str, chunks: int) -> Callable[[Scope, Receive, Send], Any]:
    json_body = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * chunks}}],
            "usage": USAGE,
        }
    ).encode()
    with_usage = [_chunk(i, True) for i in range(chunks)]
    usage_chunk = b'data: {"id":"chatcmpl-1","choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n"
    sse_with_usage = [*with_usage, usage_chunk, b"data: [DONE]\n\n"]
    sse_headers = [(b"content-type", b"text/event-stream")]
    json_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(json_body)).encode())]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if kind == "json":
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": json_body, "more_body": False})
            return
        await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
        for piece in sse_with_usage:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def _context(kind: str, client_usage: bool) -> RequestContext:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}
    if kind == "sse":
        body["stream"] = True
        if client_usage:
            body["stream_options"] = {"include_usage": True}
    return RequestContext(
        request_id="01JBENCH000000000000000000",
        received_at=datetime.now(UTC),
        started=time.monotonic(),
        method="POST",
        path="/chat/completions",
        surface="/v1",
        raw_body=b"",
        body=body,
        principal=Principal(workspace="ws", project="pr", key_id="k"),
        provider="openai",
        model="gpt-4o",
        model_ref="gpt-4o",
        product="chat.completions",
        stream=kind == "sse",
        identity=ResolvedIdentity(external_id="user_1", source="header"),
    )


async def _loop(app: Any, kind: str, client_usage: bool, n: int) -> float:
    """Seconds for `n` requests through `app`."""

    async def receive() -> Message:  # never called by the inner app
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        return None

    gc.collect()
    t0 = time.perf_counter()
    for _ in range(n):
        ctx = _context(kind, client_usage)
        await app({"type": "http", SCOPE_KEY: ctx}, receive, send)
    return time.perf_counter() - t0


async def bench_overhead(requests: int, chunks: int, rounds: int) -> list[dict[str, Any]]:
    bus = EventBus([_Discard()], flush_interval=0.01)
    await bus.start()
    prom = PrometheusMetrics()
    pricer = Pricer()
    pricer.cost("openai", "gpt-4o", TokenUsage())  # load the price table outside the timing
    clock = SystemClock()
    results = []
    cases = [("json", False, "JSON chat"), ("sse", True, "SSE, client asked for usage (observe)")]
    cases.append(("sse", False, "SSE, usage injected + hidden (rewrite)"))
    for kind, client_usage, label in cases:
        inner = _inner_app(kind, chunks)
        metered = MeteringMiddleware(inner, bus=bus, pricer=pricer, clock=clock, prom=prom)
        await _loop(inner, kind, client_usage, 200)  # warm up
        await _loop(metered, kind, client_usage, 200)
        plain_t, metered_t = [], []
        for _ in range(rounds):
            plain_t.append(await _loop(inner, kind, client_usage, requests))
            metered_t.append(await _loop(metered, kind, client_usage, requests))
            await asyncio.sleep(0.05)  # let the bus drain
        plain_us = statistics.median(plain_t) / requests * 1e6
        metered_us = statistics.median(metered_t) / requests * 1e6
        results.append(
            {
                "case": label,
                "plain_us": plain_us,
                "metered_us": metered_us,
                "overhead_us": metered_us - plain_us,
                "ratio": metered_us / plain_us,
            }
        )
    await bus.stop(timeout=5)
    return results


def _events(n: int) -> list[UsageEvent]:
    now = datetime.now(UTC)
    return [
        UsageEvent(
            event_id=f"{i:026d}",
            timestamp=now,
            workspace="ws",
            project="pr",
            api_key_id="k",
            identity=f"user_{i % 100}",
            identity_source="header",
            identity_tags=["beta"],
            provider="openai",
            model="openai/gpt-4o",
            product="chat.completions",
            input_tokens=12,
            output_tokens=50,
            total_tokens=62,
            total_cost_nanos=530_000,
            latency_ms=123.4,
            ttft_ms=45.6,
            metadata={"team": "a"},
        )
        for i in range(n)
    ]


async def bench_duckdb_sink(n: int) -> dict[str, Any]:
    events = _events(n)
    store = DuckDBEventStore()
    bus = EventBus([DuckDBSink(store)], max_queue=n + 1)
    await bus.start()
    t0 = time.perf_counter()
    for event in events:
        bus.put_nowait(event)
    put_s = time.perf_counter() - t0
    while bus.depth:  # noqa: ASYNC110 - polling the bus from outside is what is being timed
        await asyncio.sleep(0.005)
    total_s = time.perf_counter() - t0
    await bus.stop(timeout=30)
    assert store.count() == n, store.count()
    store.close()
    return {"events": n, "put_nowait_us": put_s / n * 1e6, "seconds": total_s, "events_per_s": n / total_s}


def bench_insert_strategies(n: int) -> dict[str, float]:
    """rows/s of each insert strategy (event -> row conversion included)."""
    events = _events(n)
    out: dict[str, float] = {}
    placeholders = "(" + ",".join("?" * len(EVENT_COLUMNS)) + ")"

    def executemany(store: DuckDBEventStore) -> None:
        cur = store.cursor()
        cur.executemany(f"INSERT INTO {EVENTS_TABLE} VALUES {placeholders}", [event_row(e) for e in events])

    def values_batch(store: DuckDBEventStore) -> None:
        cur = store.cursor()
        rows = [event_row(e) for e in events]
        for i in range(0, len(rows), 200):
            part = rows[i : i + 200]
            sql = f"INSERT INTO {EVENTS_TABLE} VALUES " + ",".join([placeholders] * len(part))
            cur.execute(sql, [v for row in part for v in row])

    def unnest_lists(store: DuckDBEventStore) -> None:
        cur = store.cursor()
        columns = [list(col) for col in zip(*(event_row(e) for e in events), strict=True)]
        select = ", ".join(f"unnest(${i + 1}::{kind}[])" for i, kind in enumerate(EVENT_COLUMNS.values()))
        cur.execute(f"INSERT INTO {EVENTS_TABLE} SELECT {select}", columns)

    def appender(store: DuckDBEventStore) -> None:
        store.insert(events)

    for name, fn in (
        ("executemany", executemany),
        ("VALUES x200", values_batch),
        ("unnest(column lists)", unnest_lists),
        ("appender (used)", appender),
    ):
        store = DuckDBEventStore()
        t0 = time.perf_counter()
        fn(store)
        dt = time.perf_counter() - t0
        assert store.count() == n
        store.close()
        out[name] = n / dt
    return out


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round and case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per SSE response")
    parser.add_argument("--events", type=int, default=200_000, help="events pushed into the DuckDB sink")
    parser.add_argument("--strategy-events", type=int, default=5_000)
    args = parser.parse_args(argv)

    print(
        f"## Metering overhead ({args.requests} requests x {args.rounds} rounds, SSE = {args.chunks} chunks)"
    )
    print("| case | plain us/req | metered us/req | overhead us/req | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in await bench_overhead(args.requests, args.chunks, args.rounds):
        print(
            f"| {r['case']} | {r['plain_us']:.1f} | {r['metered_us']:.1f} | {r['overhead_us']:.1f} "
            f"| {r['ratio']:.2f}x |"
        )
    print()
    sink = await bench_duckdb_sink(args.events)
    print(
        f"## DuckDB sink: {sink['events']} events through EventBus -> DuckDBSink in {sink['seconds']:.2f} s "
        f"= {sink['events_per_s']:,.0f} events/s (put_nowait {sink['put_nowait_us']:.2f} us/event)"
    )
    print()
    print(f"## Insert strategies ({args.strategy_events} events, rows/s)")
    for name, rate in bench_insert_strategies(args.strategy_events).items():
        print(f"- {name}: {rate:,.0f}")


if __name__ == "__main__":
    asyncio.run(main())
