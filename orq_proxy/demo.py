"""`orq-proxy demo`: the fake upstream and the proxy on free loopback ports, a short scenario driven
through the real `openai` SDK, and what happened, printed.

Each capability adds a step: a function `(DemoRun) -> None` appended to `STEPS`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orq_proxy.app import OrqProxy, build_app
from orq_proxy.config import ProxyConfig
from orq_proxy.eventstore.duckdb import DuckDBEventStore
from orq_proxy.testing.fake_upstream import FakeUpstream, build_fake_upstream
from orq_proxy.testing.servers import ServerThread, serve_in_thread
from orq_proxy.usage.money import nanos_to_usd

__all__ = [
    "ADMIN_KEY",
    "DEMO_CLIENTS",
    "STEPS",
    "UPSTREAM_KEY",
    "USER_KEY",
    "DemoRun",
    "demo_config",
    "missing_clients",
    "run_demo",
    "step_budget",
    "step_chat",
    "step_identities",
    "step_metering",
    "step_report",
    "step_stream",
    "step_unknown_provider",
]

ADMIN_KEY = "sk-demo-admin"
USER_KEY = "sk-demo-user"
UPSTREAM_KEY = "sk-demo-upstream"


@dataclass
class DemoRun:
    """What a demo step can use: the running proxy, its base URL, the fake upstream, and `say`."""

    proxy: OrqProxy
    url: str
    fake: FakeUpstream
    out: Callable[[str], None] = print
    notes: dict[str, Any] = field(default_factory=dict)

    def say(self, text: str) -> None:
        self.out(text)

    def openai(self, key: str = USER_KEY, prefix: str = "/v1") -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + prefix, api_key=key, max_retries=0)


def demo_config(upstream_url: str) -> ProxyConfig:
    """The demo's configuration: one upstream (the fake), an admin key and the app backend's key.

    The backend's key names its users (`ada`, `bob`), so it says `identities = "any"`; its `owner` only
    attributes the calls that name nobody (with an owner, the default would be `"owner"`: only `alice`).
    """
    return ProxyConfig.model_validate(
        {
            "upstreams": {"openai": {"base_url": upstream_url, "api_key": UPSTREAM_KEY, "default": True}},
            "api_keys": [
                {"key": ADMIN_KEY, "id": "admin", "admin": True},
                {"key": USER_KEY, "id": "app-backend", "owner": "alice", "identities": "any"},
            ],
        }
    )


def step_chat(run: DemoRun) -> None:
    """A JSON chat completion with a provider prefix."""
    client = run.openai()
    out = client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "Say hello to the demo"}]
    )
    usage = out.usage
    run.say(f"chat      -> {out.choices[0].message.content!r}")
    if usage is not None:
        run.say(f"             tokens: prompt={usage.prompt_tokens} completion={usage.completion_tokens}")


def step_stream(run: DemoRun) -> None:
    """A streamed chat completion, printed as it arrives."""
    client = run.openai()
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream something"}], stream=True
    )
    start = time.monotonic()
    first: float | None = None
    words: list[str] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.monotonic() - start
            words.append(chunk.choices[0].delta.content)
    run.say(f"stream    -> {''.join(words)!r} (first token after {1000 * (first or 0):.1f} ms)")


def step_unknown_provider(run: DemoRun) -> None:
    """An unknown provider prefix is refused with a 400 that says what is configured."""
    import openai

    try:
        run.openai().chat.completions.create(
            model="acme/model-x", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.BadRequestError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        run.say(f"routing   -> 400 {body.get('message', exc)}")


def step_metering(run: DemoRun) -> None:
    """What metering recorded: the usage events in the event store (flushed within ~0.1 s), summed."""
    store = run.proxy.services.event_store
    assert isinstance(store, DuckDBEventStore)  # the demo's config keeps events in DuckDB, read here with SQL
    deadline = time.monotonic() + 2.0
    while store.count() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    cur = store.cursor()
    try:
        row = cur.execute(
            "SELECT count(*), sum(total_tokens), sum(total_cost_nanos), count(*) FILTER (usage_source = 'exact')"
            " FROM usage_events"
        ).fetchone()
    finally:
        cur.close()
    n, tokens, nanos, exact = row if row else (0, 0, 0, 0)
    run.say(
        f"metering  -> {n} usage events ({exact} exact), {tokens or 0} tokens, "
        f"${nanos_to_usd(nanos or 0):.8f} (genai-prices); /metrics has the counters"
    )


def step_identities(run: DemoRun) -> None:
    """A call that carries `orq.identity` upserts the identity; the orq SDK lists it with its metrics."""
    from orq_ai_sdk import Orq

    identity = {
        "id": "ada",
        "display_name": "Ada Lovelace",
        "email": "ada@example.com",
        "metadata": [{"plan": "pro"}],
        "tags": ["beta"],
    }
    run.openai().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Who am I?"}],
        extra_body={"orq": {"identity": identity}},
    )
    run.say("identity  -> chat with extra_body orq.identity {id: ada, ...}: attributed, record upserted")
    with Orq(api_key=ADMIN_KEY, server_url=run.url, timeout_ms=10_000) as orq:
        deadline = time.monotonic() + 1.0
        while True:  # the metrics are fed when the request settles, just after the response
            page = orq.identities.list(include_metrics=True)
            ada = next(i for i in page.data if i.external_id == "ada")
            if (ada.metrics and ada.metrics.total_requests) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    run.say("             GET /v2/identities?include_metrics=true (30-day figures):")
    for ident in page.data:
        m = ident.metrics
        run.say(
            f"             {ident.external_id} ({ident.display_name}, tags {ident.tags}, _id {ident.id}): "
            f"{m.total_requests if m else 0:.0f} requests, {m.total_tokens if m else 0:.0f} tokens, "
            f"${m.total_cost if m else 0:.8f}, error rate {m.error_rate if m else 0:.2f}"
        )


def step_budget(run: DemoRun) -> None:
    """A daily token budget for identity `bob`: requests pass while their estimate fits, then 429."""
    import httpx
    import openai

    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(
        run.url + "/v2/budgets",
        headers=admin,
        json={
            "scope": {"identity": {"identity_external_id": "bob"}},
            "limits": {"period": "BUDGET_PERIOD_DAILY", "token_limit": 120},
        },
    )
    created.raise_for_status()
    budget_id = created.json()["budget"]["budgetId"]
    run.say(f"budget    -> POST /v2/budgets {budget_id}: identity bob, 120 tokens per day")
    client = run.openai()
    for i in range(1, 11):
        try:
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Tell me a story"}],
                max_tokens=40,  # reserved up front: input estimate + 40, settled to the actual usage
                extra_headers={"X-ORQ-IDENTITY-ID": "bob"},
            )
        except openai.RateLimitError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            run.say(f"             request {i}: 429 {body.get('code')}: {body.get('message')}")
            run.say(
                f"             Retry-After: {exc.response.headers.get('retry-after')} s (next UTC midnight)"
            )
            break
        run.say(f"             request {i}: 200")
    else:
        raise RuntimeError("the budget never refused a request")
    usage = httpx.get(f"{run.url}/v2/budgets/{budget_id}", headers=admin).json()["budget"]["usage"]
    run.say(f"             usage: {usage['tokens']} tokens, {usage['requests']} requests in the last minute")


def step_report(run: DemoRun) -> None:
    """A report through the orq SDK: usage per identity over the last hour, top spenders first."""
    from datetime import UTC, datetime, timedelta

    from orq_ai_sdk import Orq

    now = datetime.now(UTC)
    with Orq(api_key=ADMIN_KEY, server_url=run.url, timeout_ms=10_000) as orq:
        seen = -1
        deadline = time.monotonic() + 1.0
        while True:  # the last events reach the store within the sink bus's flush interval (~0.1 s)
            report = orq.reporting.query(
                metric="genai.usage",
                from_=now - timedelta(hours=1),
                to=now + timedelta(minutes=1),
                group_by=["identity"],
                mode="scalar",
                include_totals=True,
            )
            total = (report.totals.metrics or {}).get("request_count", 0) if report.totals else 0
            if total == seen or time.monotonic() > deadline:
                break
            seen = int(total)
            time.sleep(0.15)
    request_id = report.meta.request_id if report.meta else "?"
    run.say(f"report    -> genai.usage by identity, last hour ({request_id}):")
    run.say(f"             {'identity':<12}{'requests':>9}{'tokens':>8}{'cost USD':>13}{'errors':>7}")
    for row in report.data or []:
        m = row.metrics or {}
        who = (row.dimensions or {}).get("identity", "(none)")
        run.say(
            f"             {who:<12}{m.get('request_count', 0):>9.0f}{m.get('total_tokens', 0):>8.0f}"
            f"{m.get('total_cost', 0):>13.8f}{m.get('error_count', 0):>7.0f}"
        )


STEPS: list[Callable[[DemoRun], None]] = [
    step_chat,
    step_stream,
    step_unknown_provider,
    step_metering,
    step_identities,
    step_budget,
    step_report,
]


# The demo drives the proxy through the official clients, which a plain install does not include.
DEMO_CLIENTS = ("openai", "orq_ai_sdk")


def missing_clients() -> list[str]:
    """The demo's client packages that cannot be imported."""
    import importlib

    missing = []
    for name in DEMO_CLIENTS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def run_demo(out: Callable[[str], None] = print) -> int:
    """Run every step of the demo; 0 when all of them ran, 2 when its clients are not installed."""
    missing = missing_clients()
    if missing:
        out(
            f"orq-proxy demo drives the proxy with the official clients ({', '.join(missing)} not installed): "
            "pip install 'orq-proxy[demo]'"
        )
        return 2
    fake = build_fake_upstream(api_key=UPSTREAM_KEY)
    with contextlib.ExitStack() as stack:
        upstream: ServerThread = stack.enter_context(serve_in_thread(fake))
        proxy = build_app(demo_config(upstream.url + "/v1"))
        server: ServerThread = stack.enter_context(serve_in_thread(proxy))
        out(f"fake upstream on {upstream.url}/v1, orq-proxy on {server.url}")
        run = DemoRun(proxy=proxy, url=server.url, fake=fake, out=out)
        failed = 0
        for step in STEPS:
            try:
                step(run)
            except Exception as exc:  # a demo reports every step, even after one fails
                failed += 1
                out(f"step {step.__name__} FAILED: {type(exc).__name__}: {exc}")
        out("demo finished" + (f" with {failed} failed step(s)" if failed else ": all steps ran"))
        return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
