"""Budget gate benchmark: per-request cost of `BudgetMiddleware` with 100,000 budgets over 1,000,000
identities, against the same gate with no budgets, and against no gate, in one run; each gate also with
calibrated reservations off (`calibrate=False`), to show what calibration costs per request.

Everything runs in process (scripted ASGI `receive`/`send`, no sockets), on one event loop. The inner app
answers like the upstream and, like metering, calls the settle hooks with a final `UsageEvent`, so each
gated request does the whole cycle: match (scope index + CEL), estimate, reserve, settle.

The budgets (workspace `ws`, limits large enough that nothing is refused):
- scoped: 1 workspace, 80,000 identity, 5,000 project, 4,000 API key, 10 provider, 990 model budgets;
- CEL: 8,000 guarded by identity (`identity == "u…" && metadata.tier == "pro"`), 1,990 guarded by metadata
  (`metadata.team == "team-…" && provider == "openai"`), and 10 unguarded expressions evaluated on every
  request (`model.startsWith("gpt-4") && has(metadata.team)`, ...). A second store holds the same budgets
  except that those 10 are guarded too (`identity == "nobody-…" && (...)`), to show what unguarded
  expressions cost.
Requests come from identities drawn uniformly from 1,000,000 (u0 … u999999), 1,000 projects, 800 API keys,
100 teams, 200 models; so each request matches the workspace, provider and usually project/key/model
budgets, an identity budget ~9% of the time, and evaluates the 10 open CEL budgets plus its guarded ones.

    python benchmarks/budgets.py [--requests 20000] [--rounds 3] [--budgets 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import resource
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.types import Message, Receive, Scope, Send
from ulid import ULID

from orq_proxy.auth import Principal
from orq_proxy.budgets.counters import InMemoryCounters
from orq_proxy.budgets.matching import RequestFacts, model_keys
from orq_proxy.budgets.middleware import BudgetMiddleware
from orq_proxy.budgets.models import Budget, Period, ScopeKind, derived_cel
from orq_proxy.budgets.store import InMemoryBudgetStore
from orq_proxy.clock import SystemClock
from orq_proxy.context import SCOPE_KEY, RequestContext, ResolvedIdentity
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.pricing import Pricer

IDENTITIES = 1_000_000
PROJECTS = 1_000
KEYS = 800
TEAMS = 100
MODELS = 200
NOW = datetime.now(UTC)
BIG = 10**18
OPEN_CEL = [
    'model.startsWith("gpt-4") && has(metadata.team)',
    'size(metadata) > 3 && provider == "openai" || model == "none"',
    '"x-debug" in headers || identity.endsWith("999999")',
    'model_id.contains("mini") && project != "p0" || api_key == "nobody"',
    'has(metadata.tier) ? metadata.tier == "free" : false',
    'headers["user-agent"].startsWith("bench") || has(metadata.canary)',
    'project.size() > 40 || identity == "" || model == "o1"',
    'metadata.exists(k, k == "experiment") || api_key.startsWith("zz")',
    '!(provider in ["openai", "azure"]) || model == "gpt-x"',
    'model_id == "openai/gpt-4o-mini" && metadata.team == "team-7" || false',
]


def make_budgets(n: int, rng: random.Random, open_cel: int = len(OPEN_CEL)) -> list[Budget]:
    """`n` budgets in the mix described in the module docstring (scaled if n != 100,000); the last
    `len(OPEN_CEL) - open_cel` unguarded expressions are replaced by guarded ones."""
    scale = n / 100_000
    budgets: list[Budget] = []

    def add(kind: ScopeKind | None, target: str = "", cel: str | None = None) -> None:
        budgets.append(
            Budget(
                budget_id=str(ULID()),
                workspace="ws",
                scope_kind=kind,
                scope_target=target,
                cel=cel if cel is not None else derived_cel(kind, target) if kind else "",
                period=rng.choice([Period.DAILY, Period.MONTHLY, Period.WEEKLY]),
                amount_nanos=BIG,
                token_limit=BIG if rng.random() < 0.5 else None,
                requests_per_minute=10**9 if rng.random() < 0.2 else None,
                alerts=(),
                is_active=True,
                expires_at=None,
                created_at=NOW,
                updated_at=NOW,
            )
        )

    add(ScopeKind.WORKSPACE)
    for i in rng.sample(range(IDENTITIES), int(80_000 * scale)):
        add(ScopeKind.IDENTITY, f"u{i}")
    for i in range(int(5_000 * scale)):
        add(ScopeKind.PROJECT, f"p{i}")
    for i in range(int(4_000 * scale)):
        add(ScopeKind.API_KEY, f"k{i}")
    for i in range(10):
        add(ScopeKind.PROVIDER, "openai" if i == 0 else f"provider-{i}")
    for i in range(int(990 * scale)):
        add(ScopeKind.MODEL, f"openai/model-{i}")
    for i in rng.sample(range(IDENTITIES), int(8_000 * scale)):
        add(None, cel=f'identity == "u{i}" && metadata.tier == "pro"')
    for i in range(int(1_990 * scale)):
        add(None, cel=f'metadata.team == "team-{i}" && provider == "openai"')
    for i, expr in enumerate(OPEN_CEL):
        add(None, cel=expr if i < open_cel else f'identity == "nobody-{i}" && ({expr})')
    return budgets


class Requests:
    """Pre-drawn request parameters; `scope(i)` builds a fresh context like the outer layers would."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.params = [
            (
                f"u{rng.randrange(IDENTITIES)}",
                f"p{rng.randrange(PROJECTS)}",
                f"k{rng.randrange(KEYS)}",
                f"model-{rng.randrange(MODELS)}" if rng.random() < 0.5 else "gpt-4o-mini",
                {"team": f"team-{rng.randrange(TEAMS)}", "tier": rng.choice(["pro", "free"])},
            )
            for _ in range(n)
        ]
        self.body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hello " * 40}],
            "max_tokens": 256,
        }
        self.raw = b"x" * 400
        self.headers = [(b"user-agent", b"bench/1.0"), (b"content-type", b"application/json")]

    def facts(self, i: int) -> RequestFacts:
        """What the gate's matching sees of request `i` (as `BudgetMiddleware` builds it)."""
        identity, project, key, model, metadata = self.params[i % len(self.params)]
        return RequestFacts(
            workspace="ws",
            project=project,
            api_key=key,
            identity=identity,
            provider="openai",
            model=model,
            model_id=f"openai/{model}",
            model_keys=model_keys("openai", model, model),
            metadata=metadata,
            raw_headers=self.headers,
        )

    def scope(self, i: int) -> dict[str, Any]:
        identity, project, key, model, metadata = self.params[i % len(self.params)]
        ctx = RequestContext(
            request_id="r",
            received_at=NOW,
            started=0.0,
            method="POST",
            path="/chat/completions",
            surface="/v1",
            raw_body=self.raw,
            body=self.body,
            principal=Principal(workspace="ws", project=project, key_id=key),
            provider="openai",
            model=model,
            model_ref=model,
            product="chat.completions",
            identity=ResolvedIdentity(identity, "header"),
            metadata=metadata,
        )
        return {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": self.headers,
            SCOPE_KEY: ctx,
        }


EVENT = UsageEvent(
    event_id="r",
    timestamp=NOW,
    workspace="ws",
    project="p",
    api_key_id="k",
    input_tokens=60,  # reported usage: with calibration on, every settlement teaches the gate
    output_tokens=39,
    total_cost_nanos=1234,
    total_tokens=99,
)
START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json")],
}
BODY: Message = {"type": "http.response.body", "body": b'{"ok":true}'}


async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers at once, then settles like metering does."""
    await send(START)
    await send(BODY)
    for hook in scope[SCOPE_KEY].settle_hooks:
        hook(EVENT)


async def receive() -> Message:
    return {"type": "http.disconnect"}


async def send(message: Message) -> None:
    return None


async def timed(app: Callable[..., Any], requests: Requests, n: int, offset: int) -> float:
    scopes = [requests.scope(offset + i) for i in range(n)]  # context building is not what we measure
    gc.collect()
    start = time.perf_counter()
    for scope in scopes:
        await app(scope, receive, send)
    return (time.perf_counter() - start) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per case per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budgets", type=int, default=100_000)
    args = parser.parse_args()
    rng = random.Random(42)
    # Every model priced (the 200 `model-N` names too), so no request takes the unpriced-model refusal.
    pricer = Pricer({f"openai/model-{i}": (0.15, 0.6, None) for i in range(MODELS)})
    clock = SystemClock()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0 = time.perf_counter()
    budgets = make_budgets(args.budgets, rng)
    store = InMemoryBudgetStore()
    for budget in budgets:
        await store.create(budget)
    build_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    guarded_store = InMemoryBudgetStore(make_budgets(args.budgets, random.Random(42), open_cel=0))
    requests = Requests(200_000, rng)
    counters = InMemoryCounters()
    gated = BudgetMiddleware(upstream, store=store, counters=counters, pricer=pricer, clock=clock)
    uncalibrated = BudgetMiddleware(
        upstream, store=store, counters=InMemoryCounters(), pricer=pricer, clock=clock, calibrate=False
    )
    guarded = BudgetMiddleware(
        upstream, store=guarded_store, counters=InMemoryCounters(), pricer=pricer, clock=clock
    )
    ungated = BudgetMiddleware(
        upstream, store=InMemoryBudgetStore(), counters=InMemoryCounters(), pricer=pricer, clock=clock
    )
    ungated_uncalibrated = BudgetMiddleware(
        upstream,
        store=InMemoryBudgetStore(),
        counters=InMemoryCounters(),
        pricer=pricer,
        clock=clock,
        calibrate=False,
    )
    cases: dict[str, Callable[..., Any]] = {
        "no gate": upstream,
        "gate, no budgets": ungated,
        "gate, no budgets, calibration off": ungated_uncalibrated,
        "gate, budgets": gated,
        "gate, budgets, calibration off": uncalibrated,
        "gate, budgets, all CEL guarded": guarded,
    }

    # Warm up (price table, CEL programs, counter states), and count what a request matches.
    matched = []
    for i in range(2_000):
        matched.append(len(await store.matching(requests.facts(i), NOW)))
    for app in cases.values():
        await timed(app, requests, 2_000, 0)

    results: dict[str, list[float]] = {name: [] for name in cases}
    offset = 2_000
    for _ in range(args.rounds):
        for name, app in cases.items():
            results[name].append(await timed(app, requests, args.requests, offset))
            offset += args.requests
    t_match = time.perf_counter()
    for i in range(args.requests):
        await store.matching(requests.facts(i), NOW)
    match_us = (time.perf_counter() - t_match) / args.requests * 1e6

    med = {name: statistics.median(v) for name, v in results.items()}
    print(
        f"budgets: {len(budgets):,} ({sum(b.scope_kind is None for b in budgets):,} CEL) in workspace 'ws', "
        f"identities drawn from {IDENTITIES:,}; built and indexed in {build_s:.2f} s, "
        f"+{(rss1 - rss0) / 1024:.0f} MB RSS"
    )
    print(
        f"budgets matched per request: mean {statistics.mean(matched):.2f}, max {max(matched)}; "
        f"counter states after the run: {len(counters):,}; CEL errors: {store.index.cel_errors}"
    )
    print(f"median of {args.rounds} rounds x {args.requests:,} requests, us/request:")
    for name in cases:
        print(f"  {name:<32} {med[name]:8.2f}   rounds: {', '.join(f'{v:.2f}' for v in results[name])}")
    print(f"  matching alone (store.matching + facts)  {match_us:.2f}")
    for name in ("gate, no budgets", "gate, budgets"):
        on, off = med[name] - med["no gate"], med[name + ", calibration off"] - med["no gate"]
        print(f"{name}: gate cost {on:.2f} us with calibration, {off:.2f} us without ({on - off:+.2f} us)")
    gate_empty = med["gate, no budgets"] - med["no gate"]
    for name in ("gate, budgets", "gate, budgets, all CEL guarded"):
        gate_full = med[name] - med["no gate"]
        print(
            f"{name}: gate cost {gate_full:.2f} us vs {gate_empty:.2f} us with no budgets "
            f"(ratio {gate_full / gate_empty:.1f}x); whole request vs no budgets: "
            f"{med[name] / med['gate, no budgets']:.2f}x"
        )


if __name__ == "__main__":
    asyncio.run(main())
