"""orq-proxy against the gateways users would pick instead, side by side on one machine (issue 7).

Targets, each started on loopback and driven with the same load:
- `direct`: the fake upstream itself (the physical limit here);
- `minimal`: the minimal Starlette + aiohttp pass-through proxy from `overhead.py` (the floor for a proxy),
  on Python's default GC settings, like any plain proxy; `minimal-gc`: the same with the GC tuning that
  `orq-proxy serve` applies after startup (`[server] gc_threshold`), to show what that tuning alone is worth;
- `orq-full`: orq-proxy with everything on: identity from the body (`orq.identity`, upserted), a matching
  identity budget (reserve + settle on every request), metering into the in-memory DuckDB event store;
- `orq-pg`: `orq-full` on the replica backends: PostgreSQL state and events (a fresh database on
  `--pg`, dropped afterwards) and Redis counters (`--redis`), as `serve --workers 1` would run them;
- `orq-no-<layer>`: the same with one layer replaced by a pass-through (identity, budget, metering), and
  `orq-bare` with all three off (request + auth + routing + upstream), so each layer's cost shows;
- `litellm`: LiteLLM proxy (`pip install 'litellm[proxy]'` into a throwaway venv under /tmp), the fake
  upstream as an OpenAI-compatible model, `user` sent in the body (end-user spend tracking needs a database,
  so it is not recorded here);
- `portkey`: Portkey's open-source gateway (`npm install @portkey-ai/gateway` under /tmp), pointed at the
  fake upstream with `x-portkey-custom-host`.
Peers are installed on demand under `--peers-dir` (default /tmp/orq-bench-peers) and skipped, with the
reason, when they cannot be installed or started. Nothing of theirs lives in this repository.

Cases: JSON and streaming chat completions; concurrency 1 (added latency, time to first byte) and 64
(throughput); upstream latency 0 ms and 50 ms. Load: `wrk` (Python generator as fallback; time to first
byte always from the Python generator at concurrency 1). The target under test is pinned to CPU 0, the
load generator and the fake upstream to the other CPUs.

    python benchmarks/compare.py --quick            # ~5 min: 0 ms upstream, 3 s per point
    python benchmarks/compare.py                    # full: both latencies, 10 s per point, 2 rounds
    python benchmarks/compare.py --targets direct,minimal,orq-full,orq-bare
    python benchmarks/compare.py --quick --targets minimal,orq-full,orq-pg --cases json --concurrency 64 \
        --repeat 3 --pin-servers   # orq-pg with this machine's PostgreSQL and Redis off the target's CPU

`--pin-servers` moves the machine's PostgreSQL and Redis onto the load generator's CPUs for the run (and back
afterwards): in a deployment they run on machines of their own, and left to float here the kernel wakes them
on the target's CPU each time the proxy writes to them, so orq-pg's figure then also counts their CPU.

Figures per target and case: req/s, p50/p95/p99, TTFB p50 (streams, c=1), the target's CPU ms per request
and peak RSS, each as a ratio to `minimal` from the same run. Writes a Markdown table, JSON rows and a PNG
(default `benchmarks/results/compare.{md,json,png}`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load
import overhead
from _load import LoadResult
from overhead import Layout, Target

from orq_proxy.config import ServerConfig

HERE = Path(__file__).resolve().parent
API_KEY = "sk-bench-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream"
LITELLM_KEY = "sk-litellm-master-0123456789"
IDENTITY = "bench_user"
MODEL = "gpt-4o-mini"
MESSAGES = overhead.MESSAGES
ORQ_LAYERS = {
    "identity": "IdentityMiddleware",
    "budget": "BudgetMiddleware",
    "metering": "MeteringMiddleware",
}
ORQ_VARIANTS = {
    "orq-full": (),
    "orq-no-identity": ("identity",),
    "orq-no-budget": ("budget",),
    "orq-no-metering": ("metering",),
    "orq-bare": ("identity", "budget", "metering"),
}
# `minimal-gc`: the minimal proxy with the GC tuning `orq-proxy serve` applies (`[server] gc_threshold`).
GC_THRESHOLD = ServerConfig().gc_threshold
ALL_TARGETS = ["direct", "minimal", "minimal-gc", *ORQ_VARIANTS, "orq-pg", "litellm", "portkey"]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/14"


def bodies(target: str, stream: bool) -> bytes:
    """The request body each target gets: orq targets carry the identity in `orq`, peers in `user`."""
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "user": IDENTITY}
    if stream:
        body["stream"] = True
    if target.startswith("orq-"):
        del body["user"]
        body["orq"] = {
            "identity": {"id": IDENTITY, "display_name": "Bench User", "metadata": [{"plan": "pro"}]}
        }
    return json.dumps(body).encode()


# --- orq-proxy variants ------------------------------------------------------------------------------


class _Passthrough:
    """Stands in for a middleware that is turned off: calls the next app, and answers any other attribute
    `build_app` uses on the layer (e.g. an async `drain` hook) with an async no-op."""

    def __init__(self, app: Any, **_: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        async def noop(*_: Any, **__: Any) -> None:
            return None

        return noop


def serve_orq(config_path: str, without: Sequence[str]) -> None:
    """Run orq-proxy as `orq-proxy serve` does (`run_server`), with the named layers replaced by pass-throughs.

    `build_app` looks the middleware classes up in `orq_proxy.app` when it runs, so swapping the names
    there removes a layer without touching the package.
    """
    import orq_proxy.app as app_module
    from orq_proxy.cli import run_server
    from orq_proxy.config import load_config

    for layer in without:
        name = ORQ_LAYERS[layer]
        if not hasattr(app_module, name):
            raise SystemExit(f"orq_proxy.app has no {name}: cannot turn the {layer} layer off")
        setattr(app_module, name, _Passthrough)
    config = load_config(config_path)
    run_server(app_module.build_app(config), log_level="warning")


def orq_config(
    path: Path,
    port: int,
    upstream: str,
    *,
    state: str = "memory",
    events: str = "duckdb://:memory:",
    counters: str = "memory",
) -> None:
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}

[upstreams.openai]
base_url = "{upstream}"
api_key = "{UPSTREAM_KEY}"
default = true

[[api_keys]]
key = "{API_KEY}"
admin = true

[storage]
state = "{state}"
events = "{events}"
counters = "{counters}"
counters_prefix = "{COUNTERS_PREFIX}"
"""
    )


# This run's Redis keys (orq-pg's counters), deleted at the end with `drop_counters`.
COUNTERS_PREFIX = f"orq-bench:{os.getpid()}:"


def drop_counters(url: str) -> None:
    """Delete this run's counters from the Redis at `url` (a bench leaves nothing in the machine's Redis)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=COUNTERS_PREFIX + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def create_database(admin_url: str) -> str:
    """A new, empty PostgreSQL database for `orq-pg`; its URL."""
    import psycopg

    name = f"orq_bench_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'.encode())


def create_budget(base_url: str) -> str:
    """A monthly identity budget for the bench identity, far above what the run spends (so it never
    rejects, but is matched, reserved against and settled on every request)."""
    body = {
        "scope": {"identity": {"identity_external_id": IDENTITY}},
        "limits": {"period": "BUDGET_PERIOD_MONTHLY", "amount": 1_000_000.0, "token_limit": 1e12},
    }
    request = urllib.request.Request(
        base_url + "/v2/budgets",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["budget"]["budgetId"])


def budget_usage(base_url: str, budget_id: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base_url}/v2/budgets/{budget_id}", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.loads(response.read())["budget"].get("usage") or {})


# --- peers -------------------------------------------------------------------------------------------


def install_litellm(root: Path, log: Any) -> Path | None:
    venv = root / "litellm-venv"
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    log(f"installing litellm[proxy] into {venv} (a few minutes) ...")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300
        )
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
            check=True,
            capture_output=True,
            timeout=1800,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log(f"SKIP litellm: install failed: {exc} {detail.decode(errors='replace')[-400:]}")
        return None
    return exe if exe.exists() else None


def install_portkey(root: Path, log: Any) -> list[str] | None:
    folder = root / "portkey"
    package = folder / "node_modules" / "@portkey-ai" / "gateway"
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        log("SKIP portkey: node/npm not found")
        return None
    if not package.exists():
        log(f"installing @portkey-ai/gateway into {folder} ...")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(folder), "@portkey-ai/gateway"],
                check=True,
                capture_output=True,
                timeout=900,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            log(f"SKIP portkey: npm install failed: {exc}")
            return None
    manifest = json.loads((package / "package.json").read_text())
    bin_field = manifest.get("bin")
    entry = next(iter(bin_field.values())) if isinstance(bin_field, dict) else bin_field
    if not entry:
        log("SKIP portkey: the package has no start script")
        return None
    return [node, str(package / entry)]


def litellm_config(path: Path, upstream: str) -> None:
    path.write_text(
        f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}
      api_key: {UPSTREAM_KEY}
general_settings:
  master_key: {LITELLM_KEY}
litellm_settings:
  telemetry: false
  drop_params: true
"""
    )


# --- running -----------------------------------------------------------------------------------------


@dataclass
class Running:
    target: Target
    body_json: bytes
    body_stream: bytes
    note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def start_fake(port: int, latency_ms: float, layout: Layout, work: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "orq_proxy.testing.fake_upstream", "--port", str(port)]
    if latency_ms:
        cmd += ["--latency-ms", str(latency_ms)]
    proc = _load.start(cmd, cpus=layout.other, log=work / f"fake-{latency_ms:g}.log")
    _load.wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
    return proc


def start_targets(
    names: Sequence[str],
    fake: subprocess.Popen[bytes],
    fake_port: int,
    layout: Layout,
    work: Path,
    peers_dir: Path,
    log: Any,
    databases: list[str],
) -> list[Running]:
    upstream = f"http://127.0.0.1:{fake_port}/v1"
    running: list[Running] = []
    for name in names:
        port = _load.free_port()
        url = f"http://127.0.0.1:{port}"
        headers: dict[str, str] = {}
        note = ""
        if name == "direct":
            running.append(
                Running(
                    Target("direct", f"http://127.0.0.1:{fake_port}", fake, {}),
                    bodies(name, False),
                    bodies(name, True),
                )
            )
            continue
        if name in ("minimal", "minimal-gc"):
            cmd = [
                sys.executable,
                str(HERE / "overhead.py"),
                "--serve-minimal",
                "--port",
                str(port),
                "--upstream",
                upstream,
                "--gc-threshold",
                str(GC_THRESHOLD if name == "minimal-gc" else 0),
            ]
            probe = "/v1/models"
        elif name in ORQ_VARIANTS or name == "orq-pg":
            config = work / f"{name}.toml"
            if name == "orq-pg":
                database = create_database(PG_ADMIN)
                databases.append(database)
                orq_config(config, port, upstream, state=database, events=database, counters=REDIS)
                note = "all layers on; PostgreSQL state + events, Redis counters"
            else:
                orq_config(config, port, upstream)
            cmd = [sys.executable, str(Path(__file__)), "--serve-orq", str(config)]
            if ORQ_VARIANTS.get(name):
                cmd += ["--without", ",".join(ORQ_VARIANTS[name])]
            headers = {"Authorization": f"Bearer {API_KEY}"}
            probe = "/readyz"
            if name != "orq-pg":
                note = "off: " + ", ".join(ORQ_VARIANTS[name]) if ORQ_VARIANTS[name] else "all layers on"
        elif name == "litellm":
            exe = install_litellm(peers_dir, log)
            if exe is None:
                continue
            config = work / "litellm.yaml"
            litellm_config(config, upstream)
            cmd = [
                str(exe),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ]
            headers = {"Authorization": f"Bearer {LITELLM_KEY}"}
            probe = "/health/liveliness"
            note = "1 worker, master key, no database"
        elif name == "portkey":
            start_cmd = install_portkey(peers_dir, log)
            if start_cmd is None:
                continue
            cmd = [*start_cmd, f"--port={port}", "--headless"]
            headers = {
                "Authorization": f"Bearer {UPSTREAM_KEY}",
                "x-portkey-provider": "openai",
                "x-portkey-custom-host": upstream,
            }
            probe = "/"
            note = "node, default settings"
        else:
            raise SystemExit(f"unknown target {name!r}; known: {', '.join(ALL_TARGETS)}")
        env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NODE_ENV": "production"}
        proc = _load.start(cmd, cpus=layout.sut, log=work / f"{name}.log", env=env)
        try:
            _load.wait_http(url + probe, proc, timeout=180)
        except (RuntimeError, TimeoutError) as exc:
            tail = (work / f"{name}.log").read_text(errors="replace")[-600:]
            log(f"SKIP {name}: did not start: {exc}\n{tail}")
            _load.stop(proc)
            continue
        r = Running(Target(name, url, proc, headers), bodies(name, False), bodies(name, True), note)
        if name in ("orq-full", "orq-pg"):
            r.meta["budget_id"] = create_budget(url)
        if not smoke(r, log):
            _load.stop(proc)
            continue
        running.append(r)
    return running


def smoke(r: Running, log: Any) -> bool:
    """One request per shape. A shape the target cannot answer is left out of its cases (with what it
    said); a target that answers neither is skipped."""
    for case, body in (("json", r.body_json), ("stream", r.body_stream)):
        request = urllib.request.Request(
            r.target.url + overhead.PATH,
            data=body,
            headers={"Content-Type": "application/json", **r.target.headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read()
        except OSError as exc:
            detail = exc.read()[:300] if hasattr(exc, "read") else b""
            log(f"NOTE {r.target.name}: no {case} cases: a smoke request failed: {exc} {detail!r}")
            r.meta.setdefault("unsupported", {})[case] = f"{exc} {detail.decode(errors='replace')}"
            continue
        if b"quick" not in data:
            log(f"NOTE {r.target.name}: no {case} cases: unexpected answer {data[:200]!r}")
            r.meta.setdefault("unsupported", {})[case] = f"unexpected answer {data[:100]!r}"
    if len(r.meta.get("unsupported", {})) == 2:
        log(f"SKIP {r.target.name}: answers neither JSON nor streams")
        return False
    return True


_SERVER_NAMES = ("redis-server", "postgres")


def pin_local_servers(cpus: set[int], log: Any) -> Callable[[], None]:
    """Move this machine's Redis and PostgreSQL (every thread of each `redis-server` and `postgres` process;
    backends forked later inherit the postmaster's mask) onto `cpus`, the load generator's and upstream's
    side, as a deployment has them on machines of their own. Returns the undo, which restores each mask.
    Without the right to (not root, not their owner) it logs a NOTE and changes nothing."""
    saved: list[tuple[int, set[int]]] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() not in _SERVER_NAMES:
                continue
            tasks = [int(t.name) for t in (proc / "task").iterdir()]
        except OSError:
            continue
        for tid in tasks:
            try:
                before = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                continue
            except PermissionError:
                log(f"NOTE: cannot pin {proc.name} (no permission): PostgreSQL and Redis float")
                undo_pins(saved)
                return lambda: None
            saved.append((tid, before))
    return lambda: undo_pins(saved)


def undo_pins(saved: list[tuple[int, set[int]]]) -> None:
    for tid, mask in saved:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, mask)


def measure_ttfb(r: Running, layout: Layout, seconds: float) -> float | None:
    """Median time to the first body byte of a stream at concurrency 1 (Python generator)."""
    result = _load.run_pyload(
        r.target.url + overhead.PATH,
        r.body_stream,
        r.target.headers,
        concurrency=1,
        duration=seconds,
        cpus=layout.other,
    )
    return result.ttfb_p50_ms


def run(args: argparse.Namespace, print_line: Any = print) -> list[dict[str, Any]]:
    notes: list[str] = []

    def log(line: str) -> None:
        if line.startswith(("SKIP", "NOTE")):
            notes.append(line.splitlines()[0])
        print_line(line)

    layout = overhead.choose_layout(not args.no_pin)
    names = args.targets.split(",")
    latencies = [float(v) for v in args.latencies.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    cases = args.cases.split(",")
    peers_dir = Path(args.peers_dir)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    unpin: Callable[[], None] = lambda: None  # noqa: E731
    servers = "float"
    if args.pin_servers and layout.other_set:
        unpin = pin_local_servers(layout.other_set, log)
        atexit.register(unpin)  # (also if the run stops before its `finally`; undoing twice is harmless)
        servers = f"on {layout.other}"
    with _load.temp_dir("orq-compare-") as work:
        fake_port = _load.free_port()
        fake = start_fake(fake_port, latencies[0], layout, work)
        running: list[Running] = []
        databases: list[str] = []  # orq-pg's, dropped at the end
        try:
            running = start_targets(names, fake, fake_port, layout, work, peers_dir, log, databases)
            skipped = [n for n in names if n not in {r.target.name for r in running}]
            log(f"machine: {overhead.machine()}")
            log(f"versions: {json.dumps(versions(running, peers_dir))}")
            log(
                f"layout: target under test on CPU {layout.sut}, load generator + fake upstream on {layout.other}"
                f"; PostgreSQL and Redis {servers}"
            )
            log(
                f"targets: {', '.join(r.target.name for r in running)}"
                + (f"; skipped: {', '.join(skipped)}" if skipped else "")
            )
            for latency in latencies:
                if latency != latencies[0] or fake.poll() is not None:
                    _load.stop(fake)
                    fake = start_fake(fake_port, latency, layout, work)
                    for r in running:
                        if r.target.name == "direct":
                            r.target.proc = fake
                for case in cases:
                    for concurrency in concurrencies:
                        best: dict[str, LoadResult] = {}
                        for attempt in range(args.repeat):
                            for r in running:
                                if case in r.meta.get("unsupported", {}):
                                    continue
                                is_direct = r.target.name == "direct"
                                _load.set_affinity(
                                    fake.pid, layout.sut_set if is_direct else layout.other_set
                                )
                                result = overhead.measure(
                                    r.target,
                                    r.body_stream if case == "stream" else r.body_json,
                                    concurrency=concurrency,
                                    duration=args.duration,
                                    warmup=args.warmup if attempt == 0 else min(args.warmup, 1.0),
                                    layout=layout,
                                    tool=args.tool,
                                    helpers=() if is_direct else (fake,),
                                    quiet_cores=args.quiet_cores,
                                    quiet_timeout=args.quiet_timeout,
                                )
                                log(
                                    f"  {latency:g}ms {case:<6} c={concurrency:<3} {r.target.name:<16} "
                                    f"{result.rps:8.0f} req/s  p50 {result.p50_ms:7.2f}  p99 {result.p99_ms:7.2f} ms"
                                    f"  cpu {result.cpu_ms_per_req or 0:.3f} ms/req  err {result.errors}"
                                    f"  bg {result.extra['background_cores']:.2f}"
                                )
                                if r.target.name not in best or result.rps > best[r.target.name].rps:
                                    best[r.target.name] = result
                        for r in running:
                            if r.target.name not in best:
                                continue
                            result = best[r.target.name]
                            if case == "stream" and concurrency == 1 and args.ttfb > 0:
                                _load.set_affinity(
                                    fake.pid,
                                    layout.sut_set if r.target.name == "direct" else layout.other_set,
                                )
                                result.ttfb_p50_ms = measure_ttfb(r, layout, args.ttfb)
                            rows.append(
                                {
                                    "upstream_ms": latency,
                                    "case": case,
                                    "target": r.target.name,
                                    "note": r.note,
                                    **result.as_dict(),
                                    "background_cores": result.extra["background_cores"],
                                }
                            )
            _load.set_affinity(fake.pid, layout.other_set)
            for r in running:
                rss = _load.peak_rss_mb(r.target.proc.pid)
                for row in rows:
                    if row["target"] == r.target.name:
                        row["peak_rss_mb"] = rss
                if "budget_id" in r.meta:
                    log(
                        f"{r.target.name} budget usage after the run: {budget_usage(r.target.url, r.meta['budget_id'])}"
                    )
        finally:
            for r in running:
                if r.target.name != "direct":
                    _load.stop(r.target.proc)
            _load.stop(fake)
            for database in databases:
                drop_database(PG_ADMIN, database)
            if databases:  # orq-pg ran: its counters are in Redis
                drop_counters(REDIS)
            unpin()
    add_ratios(rows)
    table = markdown(rows)
    if notes:
        table += "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
    log("")
    log(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "skipped": skipped, "notes": notes}, indent=2)
    )
    out.with_suffix(".md").write_text(table + "\n")
    png = plot(rows, out.with_suffix(".png"), log) if rows else None
    if png:
        log(f"plot: {png}")
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    index = {(r["upstream_ms"], r["case"], r["concurrency"], r["target"]): r for r in rows}
    for r in rows:
        key = (r["upstream_ms"], r["case"], r["concurrency"])
        minimal = index.get((*key, "minimal"))
        direct = index.get((*key, "direct"))
        r["x_minimal_rps"] = r["rps"] / minimal["rps"] if minimal and minimal["rps"] else math.nan
        r["x_minimal_cpu"] = (
            r["cpu_ms_per_req"] / minimal["cpu_ms_per_req"]
            if minimal and minimal.get("cpu_ms_per_req") and r.get("cpu_ms_per_req")
            else math.nan
        )
        r["x_minimal_rss"] = (
            r["peak_rss_mb"] / minimal["peak_rss_mb"] if minimal and minimal.get("peak_rss_mb") else math.nan
        )
        r["added_p50_ms"] = r["p50_ms"] - direct["p50_ms"] if direct else math.nan


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def markdown(rows: list[dict[str, Any]]) -> str:
    out = []
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["upstream_ms"], r["case"], r["concurrency"]), []).append(r)
    for (latency, case, concurrency), group in groups.items():
        out.append(f"\n**{case}, concurrency {concurrency}, upstream {latency:g} ms**\n")
        out.append(
            "| target | req/s | x minimal | p50 ms | p95 ms | p99 ms | +p50 vs direct | TTFB p50 ms "
            "| CPU ms/req | CPU x minimal | peak RSS MB | bg cores |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in group:
            out.append(
                f"| {r['target']} | {_f(r['rps'], '.0f')} | {_f(r['x_minimal_rps'], '.2f')} "
                f"| {_f(r['p50_ms'], '.2f')} | {_f(r['p95_ms'], '.2f')} | {_f(r['p99_ms'], '.2f')} "
                f"| {_f(r['added_p50_ms'], '.2f')} | {_f(r.get('ttfb_p50_ms'), '.2f')} "
                f"| {_f(r['cpu_ms_per_req'], '.3f')} | {_f(r['x_minimal_cpu'], '.2f')} "
                f"| {_f(r['peak_rss_mb'], '.0f')} | {_f(r['background_cores'], '.2f')} |"
            )
    return "\n".join(out).strip()


def plot(rows: list[dict[str, Any]], path: Path, log: Any) -> Path | None:
    """Three panels: throughput vs minimal (high concurrency), added p50 (c=1), CPU per request."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("no plot: matplotlib is not installed (pip install 'orq-proxy[bench]')")
        return None
    targets = list(dict.fromkeys(r["target"] for r in rows))
    high = max(r["concurrency"] for r in rows)
    low = min(r["concurrency"] for r in rows)
    series = sorted({(r["upstream_ms"], r["case"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.55 * len(targets) * max(1, len(series)) / 2 + 3))
    height = 0.8 / max(1, len(series))
    panels = [
        (axes[0], high, "rps", f"req/s at concurrency {high} (log)", True),
        (axes[1], low, "added_p50_ms", f"added p50 latency vs direct at concurrency {low}, ms (log)", True),
        (axes[2], high, "cpu_ms_per_req", f"target CPU ms per request at concurrency {high} (log)", True),
    ]
    for ax, concurrency, metric, title, log_scale in panels:
        for i, (latency, case) in enumerate(series):
            values = []
            for t in targets:
                row = next(
                    (
                        r
                        for r in rows
                        if r["target"] == t
                        and r["concurrency"] == concurrency
                        and r["case"] == case
                        and r["upstream_ms"] == latency
                    ),
                    None,
                )
                value = row.get(metric) if row else None
                values.append(value if isinstance(value, int | float) and value and value > 0 else 0.0)
            positions = [j + i * height for j in range(len(targets))]
            bars = ax.barh(positions, values, height=height, label=f"{case}, upstream {latency:g} ms")
            if metric == "rps":
                for bar, t in zip(bars, targets, strict=True):
                    row = next(
                        (
                            r
                            for r in rows
                            if r["target"] == t
                            and r["concurrency"] == concurrency
                            and r["case"] == case
                            and r["upstream_ms"] == latency
                        ),
                        None,
                    )
                    if row and not math.isnan(row["x_minimal_rps"]):
                        ax.text(
                            bar.get_width(),
                            bar.get_y() + bar.get_height() / 2,
                            f" {row['x_minimal_rps']:.2f}x",
                            va="center",
                            fontsize=7,
                        )
        ax.set_yticks([j + height * (len(series) - 1) / 2 for j in range(len(targets))])
        ax.set_yticklabels(targets)
        ax.invert_yaxis()
        if log_scale and any(p.get_width() > 0 for p in ax.patches):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        if metric != "rps":
            for bar in ax.patches:
                if bar.get_width() > 0:
                    ax.text(
                        bar.get_width(),
                        bar.get_y() + bar.get_height() / 2,
                        f" {bar.get_width():.2f}",
                        va="center",
                        fontsize=7,
                    )
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("orq-proxy vs a minimal proxy and peer gateways (labels: throughput as a ratio to minimal)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def versions(running: Sequence[Running], peers_dir: Path) -> dict[str, str]:
    found = overhead.versions()
    names = {r.target.name for r in running}
    if "litellm" in names:
        pip = peers_dir / "litellm-venv" / "bin" / "pip"
        out = subprocess.run([str(pip), "show", "litellm"], capture_output=True, text=True).stdout
        found["litellm"] = next((ln.split()[1] for ln in out.splitlines() if ln.startswith("Version:")), "?")
    if "portkey" in names:
        manifest = peers_dir / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
        found["portkey-gateway"] = json.loads(manifest.read_text()).get("version", "?")
        found["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return found


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="0 ms upstream only, 3 s per point, 1 round")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS))
    parser.add_argument("--latencies", default=None, help="upstream latencies in ms (default 0,50; quick: 0)")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--cases", default="json,stream")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per point (default 10; quick 3)"
    )
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds (default 2; quick 1)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="rounds per point, best kept (default 2; quick 1)"
    )
    parser.add_argument(
        "--ttfb", type=float, default=None, help="seconds of c=1 stream TTFB sampling (0: off)"
    )
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--quiet-timeout", type=float, default=10.0)
    parser.add_argument("--quiet-cores", type=float, default=0.25)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--pin-servers",
        action="store_true",
        help="for the run, move this machine's PostgreSQL and Redis onto the load generator's CPUs (as if on "
        "machines of their own), restoring them afterwards; needs root or their owner",
    )
    parser.add_argument("--peers-dir", default="/tmp/orq-bench-peers")
    parser.add_argument(
        "--out", default=str(HERE / "results" / "compare"), help="writes OUT.md, OUT.json, OUT.png"
    )
    parser.add_argument("--serve-orq", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--without", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_orq:
        serve_orq(args.serve_orq, [w for w in args.without.split(",") if w])
        return
    quick = args.quick
    args.latencies = args.latencies or ("0" if quick else "0,50")
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    args.repeat = args.repeat or (1 if quick else 2)
    args.ttfb = args.ttfb if args.ttfb is not None else (2.0 if quick else 4.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run(args)


if __name__ == "__main__":
    main()
