"""Identity store at scale: 1,000,000 identities in one workspace of the in-memory store.

Loads `--n` identities (external id `user_0000001`, a display name, an email, 0-3 tags from a pool of 100
with a skewed distribution, one tag `rare` on 0.1% of them, and a two-key metadata object), then times,
as the median of `--repeat` runs each:

- list pages: unfiltered (first page, a page deep in the list, a page backwards), with a search (one that
  matches many, one that matches a single identity, one that matches none), with a tag filter (a common
  tag, the rare tag, two tags), and in the two sort orders (the first call builds that order's index);
- lookups by external id and by `_id`; upserts on the hot path (unchanged and changed payloads);
- `IdentityMetrics.record` / `snapshot`;
- memory per identity: the RSS growth while loading divided by `--n`, and tracemalloc over a smaller
  sample (`--traced`), which counts Python allocations exactly.

`--sqlite N` adds the same page and lookup timings for `SqliteIdentityStore` holding N identities.

    python benchmarks/identities_scale.py [--n 1000000] [--repeat 20] [--traced 100000] [--sqlite 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from orq_proxy.clock import SystemClock
from orq_proxy.identities.metrics import IdentityMetrics
from orq_proxy.identities.models import (
    SORT_DISPLAY_NAME,
    SORT_UPDATED,
    IdentityFields,
    IdentityQuery,
    normalize_fields,
)
from orq_proxy.identities.sqlite import SqliteIdentityStore
from orq_proxy.identities.store import IdentityStore, InMemoryIdentityStore
from orq_proxy.usage.events import UsageEvent

WS = "ws"
FIRST_NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Linus", "Guido", "Zoe"]
TAGS = [f"tag{i:02d}" for i in range(100)]
TAG_WEIGHTS = [1 / (i + 1) for i in range(100)]  # tag00 is the most common


def fields_for(i: int, rnd: random.Random) -> IdentityFields:
    tags = set(rnd.choices(TAGS, weights=TAG_WEIGHTS, k=rnd.randint(0, 3)))
    if i % 1000 == 7:
        tags.add("rare")
    return normalize_fields(
        {
            "display_name": f"{FIRST_NAMES[i % len(FIRST_NAMES)]} {i}",
            "email": f"user{i}@example{i % 1000}.com",
            "tags": sorted(tags),
            "metadata": {"plan": ("free", "pro", "ent")[i % 3], "seats": i % 50},
        }
    )


async def load(store: IdentityStore, n: int, seed: int = 1) -> None:
    rnd = random.Random(seed)
    for i in range(n):
        await store.create(WS, f"user_{i:07d}", fields_for(i, rnd))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def timed(fn: Callable[[], Awaitable[Any]], repeat: int) -> tuple[float, Any]:
    """Median microseconds per call, and the last result."""
    samples = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = await fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples), result


def fmt(us: float) -> str:
    return f"{us / 1000:9.2f} ms" if us >= 1000 else f"{us:9.1f} µs"


async def page_figures(store: IdentityStore, n: int, repeat: int) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []

    async def page(label: str, query: IdentityQuery, reps: int = repeat) -> Any:
        us, result = await timed(lambda: store.list(WS, query), reps)
        rows.append((label, us, f"{len(result.data)} rows, has_more={result.has_more}"))
        return result

    first = await page("unfiltered, first page (limit 10)", IdentityQuery())
    await page("unfiltered, first page (limit 50)", IdentityQuery(limit=50))
    middle = await store.get_by_external_id(WS, f"user_{n // 2:07d}")
    assert middle is not None
    await page("unfiltered, page after a cursor mid-list", IdentityQuery(starting_after=middle.id))
    await page("unfiltered, page before a cursor (backward)", IdentityQuery(ending_before=first.data[-1].id))
    t0 = time.perf_counter()
    await store.list(WS, IdentityQuery(search="zz-warm-up"))
    rows.append(("search: first call (in memory: builds summaries)", (time.perf_counter() - t0) * 1e6, ""))
    await page("search '@example7' (~11% match)", IdentityQuery(search="@example7"))
    await page(f"search 'donald {n - 5}' (one match)", IdentityQuery(search=f"donald {n - 5}"), 3)
    await page("search 'nobody-here' (no match: full scan)", IdentityQuery(search="nobody-here"), 3)
    await page("tag 'tag00' (common, ~19%)", IdentityQuery(tags=("tag00",)))
    await page("tag 'rare' (0.1%)", IdentityQuery(tags=("rare",)))
    await page("tags 'tag00' + 'tag01' (both)", IdentityQuery(tags=("tag00", "tag01")))
    await page("tag 'tag00' + search 'example1'", IdentityQuery(tags=("tag00",), search="example1"))
    for sort_by, name in ((SORT_UPDATED, "updated"), (SORT_DISPLAY_NAME, "display name")):
        t0 = time.perf_counter()
        built = await store.list(WS, IdentityQuery(sort_by=sort_by))
        rows.append((f"sort by {name}: first call (builds index)", (time.perf_counter() - t0) * 1e6, ""))
        await page(f"sort by {name}: first page", IdentityQuery(sort_by=sort_by))
        await page(
            f"sort by {name}: next page",
            IdentityQuery(sort_by=sort_by, starting_after=built.data[-1].id),
        )
    return rows


async def lookup_figures(store: IdentityStore, n: int, repeat: int) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    rnd = random.Random(2)
    ext_ids = [f"user_{rnd.randrange(n):07d}" for _ in range(1000)]
    records = [await store.get_by_external_id(WS, e) for e in ext_ids]
    ids = [r.id for r in records if r is not None]

    async def per_call(label: str, fn: Callable[[int], Awaitable[Any]], count: int) -> None:
        t0 = time.perf_counter()
        for i in range(count):
            await fn(i)
        rows.append((label, (time.perf_counter() - t0) * 1e6 / count, f"mean of {count}"))

    await per_call(
        "get_by_external_id", lambda i: store.get_by_external_id(WS, ext_ids[i % 1000]), 20 * repeat
    )
    await per_call("get by _id", lambda i: store.get(WS, ids[i % len(ids)]), 20 * repeat)
    await per_call("resolve(external_id)", lambda i: store.resolve(WS, ext_ids[i % 1000]), 20 * repeat)
    unchanged = {
        e: normalize_fields({"display_name": r.display_name})
        for e, r in zip(ext_ids, records, strict=True)
        if r
    }
    keys = list(unchanged)
    await per_call(
        "upsert, payload unchanged (hot path)",
        lambda i: store.upsert(WS, keys[i % len(keys)], unchanged[keys[i % len(keys)]]),
        20 * repeat,
    )
    await per_call(
        "upsert, one field changed",
        lambda i: store.upsert(WS, keys[i % len(keys)], normalize_fields({"email": f"changed{i}@x.io"})),
        5 * repeat,
    )
    return rows


def metrics_figures(n: int) -> list[tuple[str, float, str]]:
    metrics = IdentityMetrics(clock=SystemClock())
    now = datetime.now(UTC)
    events = [
        UsageEvent(
            event_id=str(i),
            timestamp=now,
            workspace=WS,
            project="p",
            api_key_id="k",
            identity=f"user_{i % n:07d}",
            total_tokens=100,
            total_cost_nanos=12_345,
        )
        for i in range(100_000)
    ]
    t0 = time.perf_counter()
    for e in events:
        metrics.record(e)
    record_us = (time.perf_counter() - t0) * 1e6 / len(events)
    t0 = time.perf_counter()
    for i in range(10_000):
        metrics.snapshot(WS, f"user_{i:07d}")
    snapshot_us = (time.perf_counter() - t0) * 1e6 / 10_000
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rings = IdentityMetrics(clock=SystemClock())
    for e in events[:10_000]:
        rings.record(e)
    ring_bytes = (tracemalloc.get_traced_memory()[0] - before) / 10_000
    tracemalloc.stop()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    busy = IdentityMetrics(clock=SystemClock())
    for day in range(30):
        for e in events[:1000]:
            busy.record(e.model_copy(update={"timestamp": now - timedelta(days=29 - day)}))
    busy_bytes = (tracemalloc.get_traced_memory()[0] - before) / 1000
    tracemalloc.stop()
    print(
        f"\nidentity metrics memory (tracemalloc): {ring_bytes:,.0f} bytes per identity active on one day, "
        f"{busy_bytes:,.0f} bytes per identity active on all 30 days"
    )
    return [
        ("IdentityMetrics.record", record_us, "mean of 100,000"),
        ("IdentityMetrics.snapshot", snapshot_us, "mean of 10,000"),
    ]


async def traced_bytes_per_identity(n: int) -> float:
    gc.collect()
    tracemalloc.start()
    store = InMemoryIdentityStore()
    before = tracemalloc.get_traced_memory()[0]
    await load(store, n, seed=3)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n


def show(title: str, rows: list[tuple[str, float, str]]) -> None:
    print(f"\n{title}")
    for label, us, note in rows:
        print(f"  {label:<48} {fmt(us)}  {note}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--traced", type=int, default=100_000, help="sample size for tracemalloc (0: skip)")
    parser.add_argument(
        "--sqlite", type=int, default=0, help="also time SqliteIdentityStore with N identities"
    )
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, n={args.n:,}")

    if args.traced:
        per = await traced_bytes_per_identity(args.traced)
        print(f"tracemalloc: {per:,.0f} bytes per identity (sample of {args.traced:,})")

    gc.collect()
    rss0 = rss_bytes()
    store = InMemoryIdentityStore()
    t0 = time.perf_counter()
    await load(store, args.n)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss1 = rss_bytes()
    print(
        f"loaded {await store.count(WS):,} identities in {load_s:.1f} s ({load_s / args.n * 1e6:.1f} µs each); "
        f"RSS +{(rss1 - rss0) / 2**20:,.0f} MiB = {(rss1 - rss0) / args.n:,.0f} bytes per identity"
    )
    show("in-memory list pages (median)", await page_figures(store, args.n, args.repeat))
    rss2 = rss_bytes()
    print(f"  (RSS after building both sort indexes: +{(rss2 - rss1) / args.n:,.0f} bytes per identity)")
    show("in-memory lookups and upserts", await lookup_figures(store, args.n, args.repeat))
    show("identity metrics", metrics_figures(args.n))

    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            sqlite_store = SqliteIdentityStore(os.path.join(tmp, "state.db"))
            t0 = time.perf_counter()
            rnd = random.Random(1)
            # Bulk load straight through the worker-thread function, one transaction per 10,000.
            conn = sqlite_store._conn
            for start in range(0, args.sqlite, 10_000):
                conn.execute("BEGIN")
                for i in range(start, min(start + 10_000, args.sqlite)):
                    sqlite_store._insert(WS, f"user_{i:07d}", fields_for(i, rnd))
                conn.execute("COMMIT")
            print(f"\nsqlite: loaded {args.sqlite:,} identities in {time.perf_counter() - t0:.1f} s")
            show("sqlite list pages (median)", await page_figures(sqlite_store, args.sqlite, args.repeat))
            show("sqlite lookups and upserts", await lookup_figures(sqlite_store, args.sqlite, args.repeat))
            await sqlite_store.close()


if __name__ == "__main__":
    asyncio.run(main())
