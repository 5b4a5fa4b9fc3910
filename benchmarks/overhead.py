"""What does orq-proxy cost? The same load straight to the fake upstream, through a minimal pass-through
proxy, and through orq-proxy, in one run.

Targets (each a separate uvicorn process with uvloop + httptools):
- `direct`: the fake upstream itself (`python -m orq_proxy.testing.fake_upstream`), the physical limit;
- `minimal`: the cheapest Python proxy we can write (Starlette + one aiohttp ClientSession, no features),
  defined below and started by this script with `--serve-minimal`;
- `orq-proxy`: `orq-proxy serve` with a temporary TOML config (one upstream, one API key).

Cases: JSON and streaming chat completions, at each `--concurrency` (default 1 and 64). Load comes from
`wrk` with a Lua script for the POST body (`--tool python` for the Python generator, also used when wrk is
missing). With two or more CPUs the target under test is pinned to CPU 0 and everything else (the load
generator and, when it is not the target, the fake upstream) to CPU 1, so the figures are per core.

    python benchmarks/overhead.py                   # full run, 10 s per point
    python benchmarks/overhead.py --duration 3      # quicker
    python benchmarks/overhead.py --profile 15      # then py-spy orq-proxy under c=64 JSON load

Prints req/s, p50/p99 latency, the proxy's CPU ms per request, and the ratios to `minimal` and `direct`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load
from _load import LoadResult

API_KEY = "sk-bench-0123456789abcdef"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say something short about proxies and latency."},
]
BODIES = {
    "json": {"model": "gpt-4o-mini", "messages": MESSAGES},
    "stream": {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
}
PATH = "/v1/chat/completions"
# The minimal proxy runs on Python's GC defaults (0); compare.py's `minimal-gc` passes orq-proxy's tuning.
MINIMAL_GC_THRESHOLD = 0


# --- the minimal pass-through proxy (the baseline) ---------------------------------------------------


def minimal_app(upstream: str, gc_threshold: int = 0) -> Any:
    """Starlette + one pooled aiohttp ClientSession; forwards `/v1/*` and streams event streams back.

    No features at all: it drops hop-by-hop headers, copies the rest, reads JSON answers whole (cheaper
    than streaming them) and streams `text/event-stream` answers chunk by chunk. With `gc_threshold` it
    tunes the garbage collector after startup as `orq-proxy serve` does (compare.py's `minimal-gc`); by
    default it runs on Python's defaults, like any plain proxy.
    """
    import contextlib
    import gc

    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    drop = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}
    drop_response = {"content-length", "connection", "keep-alive", "transfer-encoding", "date", "server"}
    state: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        if gc_threshold:  # what orq_proxy.app.tune_gc does, written out so this file stays standalone
            gc.collect()
            gc.freeze()
            _, second, third = gc.get_threshold()
            gc.set_threshold(gc_threshold, second, third)
        yield
        await state["session"].close()

    async def forward(request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k not in drop}
        url = f"{upstream}/{request.path_params['path']}"
        upstream_response = await state["session"].request(request.method, url, data=body, headers=headers)
        response_headers = {
            k: v for k, v in upstream_response.headers.items() if k.lower() not in drop_response
        }
        if not upstream_response.content_type.startswith("text/event-stream"):
            data = await upstream_response.read()
            upstream_response.release()
            return Response(data, status_code=upstream_response.status, headers=response_headers)

        async def relay() -> Any:
            try:
                async for chunk in upstream_response.content.iter_any():
                    yield chunk
            finally:
                upstream_response.release()

        return StreamingResponse(relay(), status_code=upstream_response.status, headers=response_headers)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/v1/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve_minimal(port: int, upstream: str, gc_threshold: int = MINIMAL_GC_THRESHOLD) -> None:
    import uvicorn

    uvicorn.run(
        minimal_app(upstream.rstrip("/"), gc_threshold),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


# --- targets -----------------------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test: its name, base URL (ending before `/v1`) and process."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    headers: dict[str, str]


def orq_proxy_command() -> list[str]:
    script = Path(sys.executable).parent / "orq-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orq_proxy"]


def write_orq_config(path: Path, port: int, upstream: str, extra: str = "") -> None:
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}

[upstreams.openai]
base_url = "{upstream}"
api_key = "sk-upstream"
default = true

[[api_keys]]
key = "{API_KEY}"
owner = "bench_user"

[storage]
events = "duckdb://:memory:"
{extra}"""
    )


@dataclass
class Layout:
    """Which CPUs the target under test and everything else run on (None: no pinning)."""

    sut: str | None
    other: str | None

    @property
    def sut_set(self) -> set[int] | None:
        return None if self.sut is None else {int(c) for c in self.sut.split(",")}

    @property
    def other_set(self) -> set[int] | None:
        return None if self.other is None else {int(c) for c in self.other.split(",")}


def choose_layout(pin: bool) -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return Layout(None, None)
    return Layout(str(cpus[0]), ",".join(str(c) for c in cpus[1:]))


# --- measuring ---------------------------------------------------------------------------------------


def measure(
    target: Target,
    body: bytes,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    layout: Layout,
    tool: str,
    helpers: Sequence[subprocess.Popen[bytes]] = (),
    quiet_cores: float = 0.25,
    quiet_timeout: float = 0.0,
) -> LoadResult:
    """One measured point (after a warm-up), with the target's CPU per request and the background load."""
    url = target.url + PATH
    headers = {"Content-Type": "application/json", **target.headers}
    if quiet_timeout > 0:
        _load.wait_for_quiet(quiet_cores, quiet_timeout)
    if warmup > 0:
        _load.run_load(
            url, body, headers, concurrency=concurrency, duration=warmup, cpus=layout.other, tool=tool
        )
    ours = {target.proc.pid, *(p.pid for p in helpers)}
    cpu_before = _load.cpu_seconds(target.proc.pid)
    ours_before = sum(_load.cpu_seconds(pid) for pid in ours)
    busy_before, children_before = _load.busy_cpu_seconds(), _load.children_cpu_seconds()
    result = _load.run_load(
        url, body, headers, concurrency=concurrency, duration=duration, cpus=layout.other, tool=tool
    )
    cpu = _load.cpu_seconds(target.proc.pid) - cpu_before
    ours_cpu = sum(_load.cpu_seconds(pid) for pid in ours) - ours_before
    loadgen_cpu = _load.children_cpu_seconds() - children_before
    busy = _load.busy_cpu_seconds() - busy_before
    ok = result.requests - result.errors
    result.cpu_ms_per_req = cpu * 1000 / ok if ok else None
    result.peak_rss_mb = _load.peak_rss_mb(target.proc.pid)
    # CPU used by processes that are not part of this benchmark, in cores: other people's work on a shared
    # machine. A point measured with a busy background is not comparable; `--repeat` keeps the best.
    result.extra["background_cores"] = max(0.0, busy - ours_cpu - loadgen_cpu) / result.duration_s
    result.extra["loadgen_cpu_ms_per_req"] = loadgen_cpu * 1000 / ok if ok else None
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table.

    `CPU req/s` is 1000 / (the target's CPU ms per request): the throughput one core would reach if the
    target were the only thing running. Unlike req/s it barely moves when other jobs share the machine,
    so `CPU req/s x minimal` is the steadier ratio on a busy host.
    """
    lines = [
        "| case | conc | target | req/s | x minimal | x direct | p50 ms | p99 ms | +p50 ms vs direct "
        "| CPU ms/req | CPU req/s | CPU req/s x minimal | errors | bg cores |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['concurrency']} | {r['target']} | {r['rps']:.0f} | {r['x_minimal']:.2f} "
            f"| {r['x_direct']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['added_p50_ms']:.2f} "
            f"| {r['cpu_ms_per_req'] or 0:.3f} | {r['cpu_rps']:.0f} | {r['cpu_x_minimal']:.2f} "
            f"| {r['errors']} | {r['background_cores']:.2f} |"
        )
    return "\n".join(lines)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Throughput as a ratio to `minimal` and `direct` of the same case; p50 added over `direct`;
    CPU-bound throughput (1000 / CPU ms per request) and its ratio to `minimal`."""
    nan = float("nan")
    for r in rows:
        r["cpu_rps"] = 1000 / r["cpu_ms_per_req"] if r.get("cpu_ms_per_req") else nan
    by_key = {(r["case"], r["concurrency"], r["target"]): r for r in rows}
    for r in rows:
        minimal = by_key.get((r["case"], r["concurrency"], "minimal"))
        direct = by_key.get((r["case"], r["concurrency"], "direct"))
        r["x_minimal"] = r["rps"] / minimal["rps"] if minimal and minimal["rps"] else nan
        r["x_direct"] = r["rps"] / direct["rps"] if direct and direct["rps"] else nan
        r["added_p50_ms"] = r["p50_ms"] - direct["p50_ms"] if direct else nan
        r["cpu_x_minimal"] = r["cpu_rps"] / minimal["cpu_rps"] if minimal else nan


# --- profiling ---------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")

_BUCKETS: list[tuple[str, str]] = [
    ("orq_proxy/proxy/request.py", "orq_proxy RequestMiddleware"),
    ("orq_proxy/proxy/routing.py", "orq_proxy RoutingMiddleware"),
    ("orq_proxy/proxy/upstream.py", "orq_proxy UpstreamApp"),
    ("orq_proxy/auth.py", "orq_proxy AuthMiddleware"),
    ("orq_proxy/metering/", "orq_proxy metering"),
    ("orq_proxy/budgets/", "orq_proxy budgets"),
    ("orq_proxy/identities/", "orq_proxy identities"),
    ("orq_proxy/sinks/", "orq_proxy sinks"),
    ("orq_proxy/app.py", "orq_proxy app dispatch"),
    ("orq_proxy/errors.py", "orq_proxy (other)"),
    ("orq_proxy/context.py", "orq_proxy (other)"),
    ("httpx/", "httpx"),
    ("httpcore/", "httpcore"),
    ("aiohttp/", "aiohttp client"),
    ("uvicorn/", "uvicorn server"),
    ("starlette/", "starlette"),
    ("json/", "json"),
]


def _bucket(file: str) -> str | None:
    for needle, name in _BUCKETS:
        if needle in file:
            return name
    return None


def analyse_profile(raw: Path, top: int = 25) -> str:
    """Summarise py-spy's collapsed stacks: time by layer (inclusive) and the hottest functions."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    self_layers: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        seen: set[str] = set()
        seen_layers: set[str] = set()
        leaf_layer = "other (event loop, C)"
        for frame in frames:
            m = _FRAME.match(frame)
            file = m.group("file") if m else frame
            func = m.group("func") if m else frame
            name = f"{func} ({_short(file)})"
            if name not in seen:
                inclusive[name] += count
                seen.add(name)
            layer = _bucket(file)
            if layer:
                leaf_layer = layer
                if layer not in seen_layers:
                    layers[layer] += count
                    seen_layers.add(layer)
        last = _FRAME.match(frames[-1])
        self_time[f"{last.group('func')} ({_short(last.group('file'))})" if last else frames[-1]] += count
        self_layers[leaf_layer] += count
    if not total:
        return "py-spy recorded no samples"
    out = [f"{total} samples"]
    out.append("\nself time by layer (the innermost known layer on the stack):")
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in self_layers.most_common()]
    out.append("\ninclusive time by layer (on the stack at all):")
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in layers.most_common()]
    out.append(f"\ntop {top} functions by inclusive time:")
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    out.append(f"\ntop {top} functions by self time:")
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in self_time.most_common(top)]
    return "\n".join(out)


def _short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def profile_target(
    target: Target, body: bytes, *, seconds: float, concurrency: int, layout: Layout, out: Path, tool: str
) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return "py-spy not installed: pip install py-spy (the `bench` extra)"
    recorder = subprocess.Popen(
        _load.pinned(
            [
                py_spy,
                "record",
                "--format",
                "raw",
                "-o",
                str(out),
                "-r",
                "250",
                "-d",
                str(round(seconds)),
                "--nonblocking",
                "-p",
                str(target.proc.pid),
            ],
            layout.other,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    _load.run_load(
        target.url + PATH,
        body,
        {"Content-Type": "application/json", **target.headers},
        concurrency=concurrency,
        duration=seconds,
        cpus=layout.other,
        tool=tool,
    )
    _, err = recorder.communicate(timeout=seconds + 60)
    if not out.exists():
        return f"py-spy failed: {err.decode(errors='replace')[-500:]}"
    return analyse_profile(out)


# --- main --------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": sys.version.split()[0]}
    for dist in (
        "orq-proxy",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "aiohttp",
    ):
        try:
            found[dist] = version(dist)
        except Exception:
            found[dist] = "-"
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "log", "-1", "--format=%h %cI"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    found["orq-proxy commit"] = commit or "?"
    if shutil.which("wrk"):
        first = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
        found["wrk"] = first[0].split()[1] if first else "?"
    return found


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} CPUs, Linux {os.uname().release}"


def start_targets(
    work: Path, layout: Layout, upstream_latency_ms: float, which: Sequence[str]
) -> tuple[subprocess.Popen[bytes], list[Target]]:
    fake_port, minimal_port, orq_port = _load.free_port(), _load.free_port(), _load.free_port()
    fake_cmd = [sys.executable, "-m", "orq_proxy.testing.fake_upstream", "--port", str(fake_port)]
    if upstream_latency_ms:
        fake_cmd += ["--latency-ms", str(upstream_latency_ms)]
    fake = _load.start(fake_cmd, cpus=layout.other, log=work / "fake.log")
    upstream = f"http://127.0.0.1:{fake_port}/v1"
    targets = [Target("direct", f"http://127.0.0.1:{fake_port}", fake, {})]
    if "minimal" in which:
        proc = _load.start(
            [
                sys.executable,
                __file__,
                "--serve-minimal",
                "--port",
                str(minimal_port),
                "--upstream",
                upstream,
            ],
            cpus=layout.sut,
            log=work / "minimal.log",
        )
        targets.append(Target("minimal", f"http://127.0.0.1:{minimal_port}", proc, {}))
    if "orq-proxy" in which:
        config = work / "orq-proxy.toml"
        write_orq_config(config, orq_port, upstream)
        proc = _load.start(
            [*orq_proxy_command(), "serve", "--config", str(config), "--log-level", "warning"],
            cpus=layout.sut,
            log=work / "orq-proxy.log",
        )
        targets.append(
            Target("orq-proxy", f"http://127.0.0.1:{orq_port}", proc, {"Authorization": f"Bearer {API_KEY}"})
        )
    for t in targets:
        _load.wait_http(t.url + "/v1/models", t.proc)
    return fake, targets


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    layout = choose_layout(not args.no_pin)
    tool = args.tool
    if tool == "wrk" and not _load.have_wrk():
        raise SystemExit("wrk not found: apt-get install -y wrk (or use --tool python)")
    if tool == "auto" and not _load.have_wrk():
        log("wrk not found (apt-get install -y wrk): using the Python load generator")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    cases = args.cases.split(",")
    rows: list[dict[str, Any]] = []
    with _load.temp_dir("orq-bench-") as work:
        fake, targets = start_targets(work, layout, args.upstream_latency_ms, ["minimal", "orq-proxy"])
        try:
            log(f"machine: {machine()}")
            log(f"versions: {json.dumps(versions())}")
            log(
                f"layout: target under test on CPU {layout.sut}, load generator + other servers on {layout.other}"
            )
            for case in cases:
                body = json.dumps(BODIES[case]).encode()
                for concurrency in concurrencies:
                    best: dict[str, LoadResult] = {}
                    for attempt in range(args.repeat):
                        # Targets interleaved within each round, so a noisy moment hits one round, not one target.
                        for target in targets:
                            is_direct = target.name == "direct"
                            _load.set_affinity(fake.pid, layout.sut_set if is_direct else layout.other_set)
                            result = measure(
                                target,
                                body,
                                concurrency=concurrency,
                                duration=args.duration,
                                warmup=args.warmup if attempt == 0 else min(args.warmup, 1.0),
                                layout=layout,
                                tool=tool,
                                helpers=() if is_direct else (fake,),
                                quiet_cores=args.quiet_cores,
                                quiet_timeout=args.quiet_timeout,
                            )
                            log(
                                f"  {case:<6} c={concurrency:<3} {target.name:<10} {result.rps:8.0f} req/s  "
                                f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                                f"cpu {result.cpu_ms_per_req or 0:.3f} ms/req  errors {result.errors}  "
                                f"background {result.extra['background_cores']:.2f} cores"
                            )
                            if target.name not in best or result.rps > best[target.name].rps:
                                best[target.name] = result
                    for target in targets:
                        result = best[target.name]
                        rows.append(
                            {
                                "case": case,
                                "target": target.name,
                                **result.as_dict(),
                                "background_cores": result.extra["background_cores"],
                            }
                        )
            _load.set_affinity(fake.pid, layout.other_set)
            add_ratios(rows)
            log("")
            log(format_table(rows))
            if args.profile:
                orq = next(t for t in targets if t.name == "orq-proxy")
                for case in args.profile_cases.split(","):
                    log(
                        f"\n=== py-spy: orq-proxy, {case}, c={args.profile_concurrency}, {args.profile:.0f}s ==="
                    )
                    out = work / f"profile-{case}.txt"
                    log(
                        profile_target(
                            orq,
                            json.dumps(BODIES[case]).encode(),
                            seconds=args.profile,
                            concurrency=args.profile_concurrency,
                            layout=layout,
                            out=out,
                            tool=tool,
                        )
                    )
                    if args.keep_profiles:
                        dest = Path(args.keep_profiles)
                        dest.mkdir(parents=True, exist_ok=True)
                        shutil.copy(out, dest / out.name)
        finally:
            for target in targets:
                _load.stop(target.proc)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per measured point (default 10)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each point")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated (default 1,64)")
    parser.add_argument("--cases", default="json,stream", help="json,stream")
    parser.add_argument("--repeat", type=int, default=1, help="rounds per point; the best round is kept")
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=60.0,
        help="max seconds to wait for a quiet machine before a point",
    )
    parser.add_argument(
        "--quiet-cores", type=float, default=0.25, help="'quiet' = other processes below this"
    )
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--upstream-latency-ms", type=float, default=0.0)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--profile", type=float, default=0.0, metavar="SECONDS", help="py-spy orq-proxy after"
    )
    parser.add_argument("--profile-cases", default="json,stream")
    parser.add_argument("--profile-concurrency", type=int, default=64)
    parser.add_argument("--keep-profiles", metavar="DIR", help="copy py-spy's raw stacks here")
    parser.add_argument("--json-out", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--serve-minimal", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--gc-threshold", type=int, default=MINIMAL_GC_THRESHOLD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_minimal:
        serve_minimal(args.port, args.upstream, args.gc_threshold)
        return
    # SIGTERM unwinds like Ctrl-C, so the servers this script started are stopped by `run`'s finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(args)


if __name__ == "__main__":
    main()
