"""asyncpg against psycopg 3 on the queries orq-proxy sends to PostgreSQL (issue 16's driver choice).

Measures, in one run against the same server (so the ratio holds on a noisy machine):
- a primary-key read and a one-row upsert, sequential (round-trip latency) and 16 at a time over a pool;
- a batch of 5,000 usage-event-like rows written with COPY.

    python benchmarks/pg_driver.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import asyncpg
import psycopg
import psycopg_pool

N_SEQ = 2000
N_PAR = 4000
N_COPY = 5000

SCHEMA = """
DROP TABLE IF EXISTS bench_kv; DROP TABLE IF EXISTS bench_ev;
CREATE TABLE bench_kv (id text PRIMARY KEY, doc jsonb NOT NULL, n bigint NOT NULL);
CREATE TABLE bench_ev (id text, ts timestamptz, identity text, model text, cost bigint, tokens bigint);
INSERT INTO bench_kv SELECT 'id' || g, '{"a": 1}', g FROM generate_series(1, 1000) g;
"""
ROWS = [(uuid.uuid4().hex, None, f"user-{i % 100}", "gpt-4o-mini", i * 1000, i) for i in range(N_COPY)]


async def run_asyncpg(dsn: str) -> dict[str, float]:
    out: dict[str, float] = {}
    conn = await asyncpg.connect(dsn)
    t = time.perf_counter()
    for i in range(N_SEQ):
        await conn.fetchrow("SELECT doc, n FROM bench_kv WHERE id = $1", f"id{i % 1000 + 1}")
    out["read_seq_us"] = (time.perf_counter() - t) / N_SEQ * 1e6
    t = time.perf_counter()
    for i in range(N_SEQ):
        await conn.execute(
            "INSERT INTO bench_kv (id, doc, n) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n",
            f"id{i % 1000 + 1}",
            '{"a": 2}',
            i,
        )
    out["upsert_seq_us"] = (time.perf_counter() - t) / N_SEQ * 1e6
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    rows = [(r[0], now, r[2], r[3], r[4], r[5]) for r in ROWS]
    t = time.perf_counter()
    await conn.copy_records_to_table("bench_ev", records=rows)
    out["copy_us_per_row"] = (time.perf_counter() - t) / N_COPY * 1e6
    await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=16, max_size=16)

    async def one(i: int) -> None:
        async with pool.acquire() as c:
            await c.fetchrow("SELECT doc, n FROM bench_kv WHERE id = $1", f"id{i % 1000 + 1}")

    t = time.perf_counter()
    for chunk in range(0, N_PAR, 16):
        await asyncio.gather(*(one(i) for i in range(chunk, chunk + 16)))
    out["read_c16_us"] = (time.perf_counter() - t) / N_PAR * 1e6
    await pool.close()
    return out


async def run_psycopg(dsn: str) -> dict[str, float]:
    out: dict[str, float] = {}
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    t = time.perf_counter()
    for i in range(N_SEQ):
        cur = await conn.execute("SELECT doc, n FROM bench_kv WHERE id = %s", (f"id{i % 1000 + 1}",))
        await cur.fetchone()
    out["read_seq_us"] = (time.perf_counter() - t) / N_SEQ * 1e6
    t = time.perf_counter()
    for i in range(N_SEQ):
        await conn.execute(
            "INSERT INTO bench_kv (id, doc, n) VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n",
            (f"id{i % 1000 + 1}", '{"a": 2}', i),
        )
    out["upsert_seq_us"] = (time.perf_counter() - t) / N_SEQ * 1e6
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    t = time.perf_counter()
    async with conn.cursor() as cur, cur.copy("COPY bench_ev FROM STDIN") as copy:
        for r in ROWS:
            await copy.write_row((r[0], now, r[2], r[3], r[4], r[5]))
    out["copy_us_per_row"] = (time.perf_counter() - t) / N_COPY * 1e6
    # the sync driver in a thread is how a blocking event store would write
    with psycopg.connect(dsn, autocommit=True) as sconn:
        t = time.perf_counter()
        with sconn.cursor() as cur, cur.copy("COPY bench_ev FROM STDIN") as copy:
            for r in ROWS:
                copy.write_row((r[0], now, r[2], r[3], r[4], r[5]))
        out["copy_sync_us_per_row"] = (time.perf_counter() - t) / N_COPY * 1e6
    await conn.close()
    pool = psycopg_pool.AsyncConnectionPool(
        dsn, min_size=16, max_size=16, open=False, kwargs={"autocommit": True}
    )
    await pool.open(wait=True)

    async def one(i: int) -> None:
        async with pool.connection() as c:
            cur = await c.execute("SELECT doc, n FROM bench_kv WHERE id = %s", (f"id{i % 1000 + 1}",))
            await cur.fetchone()

    t = time.perf_counter()
    for chunk in range(0, N_PAR, 16):
        await asyncio.gather(*(one(i) for i in range(chunk, chunk + 16)))
    out["read_c16_us"] = (time.perf_counter() - t) / N_PAR * 1e6
    await pool.close()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as c:
        c.execute(SCHEMA)
    results: dict[str, dict[str, list[float]]] = {"asyncpg": {}, "psycopg": {}}
    for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both
        for name, fn in (("asyncpg", run_asyncpg), ("psycopg", run_psycopg)):
            for k, v in (await fn(args.dsn)).items():
                results[name].setdefault(k, []).append(v)
    with psycopg.connect(args.dsn, autocommit=True) as c:
        c.execute("DROP TABLE bench_kv; DROP TABLE bench_ev")
    print(
        f"{'metric':24} {'asyncpg':>10} {'psycopg':>10} {'psycopg/asyncpg':>16}   (median of {args.rounds})"
    )
    for k in results["psycopg"]:
        p = statistics.median(results["psycopg"][k])
        a = statistics.median(results["asyncpg"].get(k, [float("nan")]))
        print(f"{k:24} {a:10.1f} {p:10.1f} {p / a:16.2f}")


if __name__ == "__main__":
    asyncio.run(main())
