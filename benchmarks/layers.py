"""What each orq-proxy layer costs per request, in process: no sockets, no server, no upstream.

The app is `build_app`'s, with the upstream's network call replaced by a replay of the fake upstream's
answer (recorded once, in process), so what is timed is orq-proxy's code: request, auth, routing, and the
identity, budget and metering layers (DuckDB sink included: each round ends after the sink's flush).
Variants as in `compare.py`: `orq-full` (identity from `orq.identity`, a matching identity budget,
metering into in-memory DuckDB) and each layer replaced by a pass-through, down to `orq-bare`.

Figures: CPU microseconds per request (process time, the sink's thread included), best of `--rounds`,
each round `--requests` sequential requests after a warm-up, and the difference to `orq-bare` measured in
the same run. Far less noisy than a socket benchmark on a shared machine, so it is the one to A/B a change
of a layer with; `compare.py` gives the figures users see.

    python benchmarks/layers.py                        # every variant, JSON
    python benchmarks/layers.py --stream --variants orq-full,orq-bare
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load
import compare

from orq_proxy.sinks.base import DEFAULT_FLUSH_INTERVAL
from orq_proxy.testing.fake_upstream import build_fake_upstream

PATH = "/v1/chat/completions"


async def canned_answer(body: bytes) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """The fake upstream's answer to `body` (headers and body chunks), recorded once and replayed."""
    fake = build_fake_upstream(record=False)
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    scope = {
        "type": "http",
        "method": "POST",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers.extend(message.get("headers", ()))
        elif message.get("body"):
            chunks.append(message["body"])

    await fake(scope, receive, send)
    return headers, chunks


async def measure(
    variant: str,
    stream: bool,
    rounds: int,
    requests: int,
    work: Path,
    verbose: bool = False,
    concurrency: int = 1,
) -> float:
    """Best CPU microseconds per request of one variant."""
    import orq_proxy.app as app_module

    app_module = importlib.reload(app_module)  # undo the pass-throughs of the variant before
    for layer in compare.ORQ_VARIANTS[variant]:
        setattr(app_module, compare.ORQ_LAYERS[layer], compare._Passthrough)
    from orq_proxy.config import load_config

    config = work / f"{variant}.toml"
    compare.orq_config(config, _load.free_port(), "http://127.0.0.1:9/v1")  # never connected to
    app = app_module.build_app(load_config(str(config)))
    body = compare.bodies(variant, stream)
    upstream_body = json.loads(body)
    upstream_body.pop("orq", None)
    if stream:  # what metering asks the upstream for
        upstream_body["stream_options"] = {"include_usage": True}
    headers, chunks = await canned_answer(json.dumps(upstream_body).encode())

    async def forward(ctx: Any, scope: Any, provider: str, send: Any, finishing: list[bool]) -> None:
        from orq_proxy.proxy.upstream import _serialize

        if ctx.body_changed and ctx.body is not None:
            _serialize(ctx.body)  # what the real upstream call does with a changed body
        if concurrency > 1:
            await asyncio.sleep(0)  # let the other requests in flight run, as a real upstream call does
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks[:-1]:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finishing[0] = True
        await send({"type": "http.response.body", "body": chunks[-1], "more_body": False})

    app.services.upstream._forward = forward  # type: ignore[method-assign]
    request_headers = [
        (b"host", b"127.0.0.1"),
        (b"authorization", f"Bearer {compare.API_KEY}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    statuses: dict[int, int] = {}

    async def one() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": PATH,
            "raw_path": PATH.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": request_headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # pragma: no cover - the canned upstream never waits for it
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        await app(scope, receive, send)

    async with app.lifespan():
        if variant == "orq-full":
            import httpx

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                response = await client.post(
                    "/v2/budgets",
                    json={
                        "scope": {"identity": {"identity_external_id": compare.IDENTITY}},
                        "limits": {"period": "BUDGET_PERIOD_MONTHLY", "amount": 1e6, "token_limit": 1e12},
                    },
                    headers={"Authorization": f"Bearer {compare.API_KEY}"},
                )
                response.raise_for_status()
        for _ in range(min(requests, 2000)):
            await one()
        flush = DEFAULT_FLUSH_INTERVAL + 0.05
        gc.collect()
        gc.freeze()  # as `orq-proxy serve` does after startup
        gc.set_threshold(10_000)
        best = float("inf")
        try:
            for _ in range(rounds):
                statuses.clear()
                started = time.process_time()
                if concurrency > 1:
                    for _ in range(requests // concurrency):  # (`main` makes requests a multiple)
                        await asyncio.gather(*(one() for _ in range(concurrency)))
                else:
                    for _ in range(requests):
                        await one()
                await asyncio.sleep(flush)  # the sink writes this round's events inside the round
                spent = time.process_time() - started
                best = min(best, spent)
                if verbose:
                    print(f"  {variant} round: {spent / requests * 1e6:.1f} us per request", flush=True)
                if statuses != {200: requests}:
                    raise RuntimeError(f"{variant}: unexpected statuses {statuses}")
        finally:
            gc.unfreeze()
            gc.set_threshold(700)
    return best / requests * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(compare.ORQ_VARIANTS))
    parser.add_argument("--stream", action="store_true", help="a streamed answer instead of JSON")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="requests in flight at once (each yields once mid-way)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every round, not only the best")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1")
    args.requests -= args.requests % args.concurrency
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in compare.ORQ_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(compare.ORQ_VARIANTS)}")
    if "orq-bare" not in variants:
        variants.append("orq-bare")  # the baseline every figure is compared with
    results: dict[str, float] = {}
    with _load.temp_dir("orq-layers-") as work:
        for variant in variants:
            results[variant] = asyncio.run(
                measure(
                    variant, args.stream, args.rounds, args.requests, work, args.verbose, args.concurrency
                )
            )
    bare = results["orq-bare"]
    kind = "stream" if args.stream else "JSON"
    print(f"{kind}, best of {args.rounds} rounds x {args.requests} requests, CPU us per request:")
    for variant, us in results.items():
        print(f"  {variant:<16} {us:7.1f} us   {us - bare:+7.1f} us vs orq-bare   {us / bare:5.2f}x")


if __name__ == "__main__":
    main()
