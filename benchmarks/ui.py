"""Dashboard at scale: how long the identities page takes to show its first page with 100,000 identities.

A child process builds a proxy (`build_app`, in-memory stores as `orq-proxy serve` uses by default) whose
identity store holds `--n` identities (display name, email, tags), each with 30-day metrics (requests,
tokens, cost on one day of the ring), and serves it as `orq-proxy serve` does (`cli.run_server`: uvicorn,
httptools, the tuned garbage collector); this process drives Debian's Chromium with Playwright:

- sign in once (the key goes to the tab's sessionStorage), then `--repeat` times: navigate to
  `/ui#/identities` and wait until the first table row is in the DOM. Two figures per load: the wall time
  from the `goto` call, and the browser's own `performance.now()` at that moment (0 = navigation start).
  "cold" loads clear the browser cache first (every file and the API call go over the wire); "warm" loads
  revalidate the files (304s) as a returning user's browser does.
- the list API call alone (`GET /v2/identities?limit=25&include_metrics=true`, first page), and a
  search and a tag filter, as the page sends them, timed with httpx.

    python benchmarks/ui.py [--n 100000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from orq_proxy.app import build_app
from orq_proxy.cli import run_server
from orq_proxy.config import ProxyConfig
from orq_proxy.identities.metrics import IdentityMetrics
from orq_proxy.identities.models import normalize_fields
from orq_proxy.identities.store import InMemoryIdentityStore

WS = "ws"
ADMIN = "sk-bench-admin"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TAGS = ["beta", "vip", "eu", "us", "trial", "enterprise"]


async def load(store: InMemoryIdentityStore, metrics: IdentityMetrics, n: int) -> None:
    today = datetime.now(UTC)
    for i in range(n):
        external_id = f"user_{i:07d}"
        fields = normalize_fields(
            {
                "display_name": f"User {i:07d}",
                "email": f"user{i}@example.com",
                "tags": [TAGS[i % len(TAGS)], TAGS[(i // 7) % len(TAGS)]],
            }
        )
        await store.create(WS, external_id, fields)
        metrics.add_day(
            WS,
            external_id,
            today,
            requests=1 + i % 50,
            errors=i % 3,
            tokens=100 * (1 + i % 50),
            cost_nanos=10**6 * (i % 97),
        )


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"


def api_timings(url: str, repeat: int) -> dict[str, list[float]]:
    queries: dict[str, dict[str, Any]] = {
        "first page": {"limit": 25, "include_metrics": "true"},
        "search 'user 00123' (matches 100)": {"limit": 25, "include_metrics": "true", "search": "user 00123"},
        "tag filter vip+eu": {"limit": 25, "include_metrics": "true", "filter_by.tags": ["vip", "eu"]},
        "sorted by name": {
            "limit": 25,
            "include_metrics": "true",
            "sort_by": "IDENTITY_SORT_FIELD_DISPLAY_NAME",
        },
    }
    out: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        for name, params in queries.items():
            client.get("/v2/identities", params=params).raise_for_status()  # builds a sort index once
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                response = client.get("/v2/identities", params=params)
                times.append(time.perf_counter() - t0)
                response.raise_for_status()
            out[name] = times
    return out


_BREAKDOWN = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const out = {html_done: Math.round(nav.responseEnd), dom_content_loaded: Math.round(nav.domContentLoadedEventEnd)};
  for (const r of performance.getEntriesByType("resource")) {
    out[r.name.replace(/^.*\\/ui\\//, "").replace(/^.*\\/v2\\//, "v2/")] = [Math.round(r.startTime), Math.round(r.responseEnd)];
  }
  out.shown = Math.round(performance.getEntriesByName("identities-shown")[0].startTime);
  return out;
}"""


def browser_timings(url: str, repeat: int) -> dict[str, tuple[list[float], list[float]]]:
    from playwright.sync_api import sync_playwright

    results: dict[str, tuple[list[float], list[float]]] = {"cold": ([], []), "warm": ([], [])}
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
        )
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        page.goto(url + "/ui")
        page.get_by_label("Admin API key").fill(ADMIN)
        page.get_by_role("button", name="Sign in").click()
        page.locator("#identities-table tbody tr").first.wait_for()
        rows = page.locator("#identities-table tbody tr").count()
        assert rows == 25, rows
        for kind in ("cold", "warm") * repeat:
            if kind == "cold":
                cdp.send("Network.clearBrowserCache")
            page.goto("about:blank")
            t0 = time.perf_counter()
            page.goto(url + "/ui#/identities", wait_until="commit")
            page.locator("#identities-table tbody tr").first.wait_for()
            wall = time.perf_counter() - t0
            in_page: Any = page.evaluate(
                "() => performance.getEntriesByName('identities-shown')[0].startTime"
            )
            if kind == "cold" and not results["cold"][0]:
                print("first cold load:", page.evaluate(_BREAKDOWN))
            results[kind][0].append(wall)
            results[kind][1].append(float(in_page) / 1000)
        context.close()
    return results


def serve(n: int, port: int) -> None:
    """The child: load `n` identities, then serve until terminated."""
    config = ProxyConfig.model_validate(
        {
            "upstreams": {"openai": {"base_url": "http://127.0.0.1:9/v1", "default": True}},
            "api_keys": [{"key": ADMIN, "workspace": WS, "admin": True, "id": "admin"}],
            "server": {"host": "127.0.0.1", "port": port},
        }
    )
    store = InMemoryIdentityStore()
    app = build_app(config, identity_store=store)
    metrics = app.services.identity_metrics
    t0 = time.perf_counter()
    asyncio.run(load(store, metrics, n))
    print(
        f"loaded {n:,} identities with metrics in {time.perf_counter() - t0:.1f} s ({type(metrics).__name__})"
    )
    sys.stdout.flush()
    run_server(app, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.serve:
        serve(args.n, args.serve)
        return

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, __file__, "--n", str(args.n), "--serve", str(port)], env=os.environ
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the proxy did not start")
            time.sleep(0.1)
        for name, times in api_timings(url, args.repeat * 2).items():
            print(f"API {name}: {median_ms(times)}")
        for kind, (wall, in_page) in browser_timings(url, args.repeat).items():
            print(
                f"page, {kind}: first row shown {median_ms(wall)} after goto; "
                f"{median_ms(in_page)} after navigation start (performance mark)"
            )
    finally:
        child.terminate()
        child.wait(timeout=30)


if __name__ == "__main__":
    main()
