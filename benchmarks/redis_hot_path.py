"""CPU per request of the Redis counters' hot path: `RedisCounters.reserve` + `settle` against the machine's Redis.

What the budget gate adds per request with `[storage] counters = "redis://..."`, measured without HTTP:
`concurrency` tasks each reserve and settle against one monthly budget (like `compare.py`'s identity budget),
under uvloop, and the process's CPU time is divided by the pairs done. `memory` is `InMemoryCounters` doing the
same, so `redis - memory` is what Redis costs over the embedded stack. Redis's own CPU per pair (from `INFO cpu`)
is shown too: on a small machine it shares the cores with the proxy.

Variants run interleaved, round after round, in one process (the machine is shared: compare within a run).
`--baseline REV` adds the hot path as it was at a git revision (`git show`, read-only), for A/B runs.

    python benchmarks/redis_hot_path.py                          # 7 rounds x 4,000 pairs, c=64
    python benchmarks/redis_hot_path.py --baseline HEAD --rounds 9
    python benchmarks/redis_hot_path.py --concurrency 1 --pairs 2000

Keys go under a fresh prefix in db 14 and are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import resource
import statistics
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ulid import ULID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orq_proxy.budgets.counters import InMemoryCounters, Reservation  # noqa: E402
from orq_proxy.budgets.models import Budget, Period, ScopeKind  # noqa: E402
from orq_proxy.budgets.redis_counters import redis_counters_from_url  # noqa: E402

URL = "redis://127.0.0.1:6379/14"
USD = 1_000_000_000


def _budget() -> Budget:
    """A monthly identity budget far above what the run spends, as `compare.py` creates."""
    now = datetime.now(UTC)
    return Budget(
        budget_id=str(ULID()),
        workspace="default",
        scope_kind=ScopeKind.IDENTITY,
        scope_target=str(ULID()),
        cel="",
        period=Period.MONTHLY,
        amount_nanos=1_000_000 * USD,
        token_limit=10**12,
        requests_per_minute=None,
        alerts=(),
        is_active=True,
        expires_at=None,
        created_at=now,
        updated_at=now,
    )


def _baseline_module(rev: str) -> types.ModuleType:
    """`redis_counters.py` and `_resp.py` as they were at `rev`, loaded under private names."""

    def load(name: str, path: str, replace: tuple[str, str] | None = None) -> types.ModuleType:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        if replace is not None:
            source = source.replace(*replace)
        spec = importlib.util.spec_from_loader(name, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
        return module

    load("_baseline_resp", "orq_proxy/budgets/_resp.py")
    return load(
        "_baseline_redis_counters",
        "orq_proxy/budgets/redis_counters.py",
        ("from orq_proxy.budgets._resp import", "from _baseline_resp import"),
    )


async def _round(counters: Any, budget: Budget, pairs: int, concurrency: int) -> tuple[float, float, float]:
    """(CPU, of which system, wall) us per pair for `pairs` reserve + settle pairs, `concurrency` at a time."""
    per_task = pairs // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            now = datetime.now(UTC)
            reservation = await counters.reserve("default", [budget], 1000, 10, now)
            assert isinstance(reservation, Reservation), reservation
            await counters.settle(reservation, 900, 9, now)

    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    done = per_task * concurrency
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return (user + system) / done * 1e6, system / done * 1e6, wall / done * 1e6


def _redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--pairs", type=int, default=4000, help="reserve + settle pairs per round and variant"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--baseline", metavar="REV", help="also run the hot path as it was at this git revision"
    )
    args = parser.parse_args()

    import redis

    admin = redis.Redis.from_url(URL)
    prefix = f"bench-orq:{ULID()}:"
    variants: dict[str, Any] = {"memory": InMemoryCounters()}
    if args.baseline:
        variants[f"redis@{args.baseline}"] = _baseline_module(args.baseline).redis_counters_from_url(
            URL, prefix=prefix + "base:"
        )
    variants["redis"] = redis_counters_from_url(URL, prefix=prefix)
    budget = _budget()
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    system: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    server: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for counters in variants.values():  # warm up: scripts loaded, connections open, windows cached
            await _round(counters, budget, args.concurrency * 10, args.concurrency)
        for _ in range(args.rounds):
            for name, counters in variants.items():
                before = _redis_cpu(admin)
                c, s, w = await _round(counters, budget, args.pairs, args.concurrency)
                cpu[name].append(c)
                system[name].append(s)
                wall[name].append(w)
                server[name].append((_redis_cpu(admin) - before) / args.pairs * 1e6)
    finally:
        for name, counters in variants.items():
            if name != "memory":
                await counters.aclose()
        keys = list(admin.scan_iter(match=prefix + "*", count=1000))
        if keys:
            admin.delete(*keys)
        admin.close()

    memory = statistics.median(cpu["memory"])
    print(f"c={args.concurrency}, {args.rounds} rounds x {args.pairs} pairs; us per reserve + settle pair")
    print(
        f"{'variant':<22}{'CPU med':>9}{'CPU min':>9}{'over memory':>13}{'of it sys':>11}{'wall med':>10}{'Redis CPU':>11}"
    )
    for name in variants:
        med = statistics.median(cpu[name])
        print(
            f"{name:<22}{med:9.1f}{min(cpu[name]):9.1f}{med - memory:13.1f}"
            f"{statistics.median(system[name]) - statistics.median(system['memory']):11.1f}"
            f"{statistics.median(wall[name]):10.1f}{statistics.median(server[name]):11.1f}"
        )
    if args.baseline:
        base, new = cpu[f"redis@{args.baseline}"], cpu["redis"]
        paired = [(b - memory) - (n - memory) for b, n in zip(base, new, strict=True)]
        print(f"paired saving per round (baseline - redis, CPU): median {statistics.median(paired):.1f} us")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
