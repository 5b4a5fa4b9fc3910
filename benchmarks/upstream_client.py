"""The forwarding client alone: orq-proxy's `ConnectionPool` (`proxy/_http1.py`) against aiohttp.

Both clients send the same chat completion to the fake upstream (a separate process, on the other CPU when
there are two) with `--concurrency` requests in flight, on uvloop, in this process (pinned to CPU 0): no
proxy, no ASGI server, only what a forwarding client costs. Rounds alternate between the two clients, so
a noisy neighbour hits both alike.

Figures per client: CPU microseconds per request (this process's time: the client's own work, the event
loop included) and requests per second, best of `--rounds`, and each as a ratio to aiohttp measured in
the same run (aiohttp is what orq-proxy used before, and what the `minimal` proxy of `compare.py` uses).

    python benchmarks/upstream_client.py
    python benchmarks/upstream_client.py --concurrency 1 --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load
import aiohttp
import compare
import uvloop

from orq_proxy.proxy._http1 import ConnectionPool, origin_of

PATH = "/v1/chat/completions"
TIMEOUTS = {"connect_timeout": 10.0, "headers_timeout": 60.0, "read_timeout": 60.0}


async def _drive(one: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for `requests` calls of `one`, `concurrency` at a time."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    share, extra = divmod(requests, concurrency)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))
    return time.process_time() - cpu, time.perf_counter() - wall


async def measure(kind: str, port: int, requests: int, concurrency: int, body: bytes) -> tuple[float, float]:
    """(CPU us per request, req/s) of one client, after a warm-up."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {compare.UPSTREAM_KEY}"}
    if kind == "aiohttp":
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        url = f"http://127.0.0.1:{port}{PATH}"

        async def one() -> None:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"aiohttp: status {response.status}")

        close: Callable[[], Awaitable[None]] = session.close
    else:
        pool = ConnectionPool()
        origin = origin_of(f"http://127.0.0.1:{port}")
        raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]

        async def one() -> None:
            response = await pool.request(origin, "POST", PATH.encode(), raw_headers, body, **TIMEOUTS)
            while await response.read():
                pass
            response.release()
            if response.status != 200:
                raise RuntimeError(f"orq-pool: status {response.status}")

        close = pool.aclose
    try:
        await _drive(one, min(requests, 2000), concurrency)  # warm-up: connections, caches
        cpu, wall = await _drive(one, requests, concurrency)
    finally:
        await close()
    return cpu / requests * 1e6, requests / wall


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round and client")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.rounds < 1:
        raise SystemExit("--requests, --concurrency and --rounds must be at least 1")
    two_cpus = _load.cpu_count() >= 2
    port = _load.free_port()
    with _load.temp_dir("orq-client-") as work:
        cmd = [sys.executable, "-m", "orq_proxy.testing.fake_upstream", "--port", str(port)]
        fake = _load.start(cmd, cpus="1" if two_cpus else None, log=work / "fake.log")
        try:
            _load.wait_http(f"http://127.0.0.1:{port}/v1/models", fake)
            if two_cpus:
                os.sched_setaffinity(0, {0})
            body = compare.bodies("minimal", False)
            best: dict[str, tuple[float, float]] = {}
            for _ in range(args.rounds):
                for kind in ("aiohttp", "orq-pool"):
                    cpu_us, rps = uvloop.run(measure(kind, port, args.requests, args.concurrency, body))
                    old = best.get(kind)
                    best[kind] = (min(cpu_us, old[0]), max(rps, old[1])) if old else (cpu_us, rps)
        finally:
            _load.stop(fake)
    base_cpu, base_rps = best["aiohttp"]
    print(
        f"client alone, concurrency {args.concurrency}, best of {args.rounds} rounds x {args.requests} "
        f"requests{'' if two_cpus else ' (one CPU: the fake upstream shares it)'}:"
    )
    for kind, (cpu_us, rps) in best.items():
        print(
            f"  {kind:<9} {cpu_us:6.1f} us CPU/request  {cpu_us / base_cpu:5.2f}x aiohttp   "
            f"{rps:8.0f} req/s  {rps / base_rps:5.2f}x aiohttp"
        )


if __name__ == "__main__":
    main()
