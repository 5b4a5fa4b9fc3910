"""Shared helpers for the benchmarks: processes, CPU pinning, /proc accounting and load generation.

Load comes from `wrk` (a C load generator, light enough to share a core) with a Lua script for the POST
body, or, when `wrk` is missing or a figure needs it (time to first byte), from a Python load generator
that runs in its own process: `python benchmarks/_load.py pyload --url ... --body-file ... -c 64 -d 10`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PYTHON = sys.executable
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- results -----------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What one load run measured (latencies in milliseconds)."""

    tool: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    ttfb_p50_ms: float | None = None
    cpu_ms_per_req: float | None = None
    peak_rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


# --- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    """Prefix `cmd` with `taskset -c CPUS` (so every thread it starts inherits the mask)."""
    if cpus is None or shutil.which("taskset") is None:
        return list(cmd)
    return ["taskset", "-c", cpus, *cmd]


def start(
    cmd: Sequence[str], *, cpus: str | None = None, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a server process in its own session (so it can be stopped with its children)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        pinned(cmd, cpus),
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def set_affinity(pid: int, cpus: set[int] | None) -> None:
    """Move every thread of `pid` and its descendants onto `cpus` (None: leave as is)."""
    if cpus is None:
        return
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    """Wait until `url` answers anything over HTTP (any status), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process for {url} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up within {timeout:.0f}s") from None
            time.sleep(0.1)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (e.g. a `taskset` wrapper's exec'd server, or worker processes)."""
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants (live ones), from /proc/<pid>/stat."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def busy_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine (all CPUs, everything but idle and iowait), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal_guest = sum(fields[7:]) if len(fields) > 7 else 0  # steal, guest, guest_nice: not ours to count
    return (sum(fields) - idle - steal_guest) / CLK_TCK


def background_cores(seconds: float = 0.5) -> float:
    """How many cores the machine is busy with over `seconds` (call it while our own servers are idle)."""
    before = busy_cpu_seconds()
    time.sleep(seconds)
    return (busy_cpu_seconds() - before) / seconds


def wait_for_quiet(max_cores: float, timeout: float, log: Any = print) -> float:
    """Wait (up to `timeout` s) until other processes use less than `max_cores`; returns the last reading.

    On a shared machine another job's load makes a point meaningless, so each point waits for a quiet
    moment; if none comes, it is measured anyway and its background load is reported next to it.
    """
    deadline = time.monotonic() + timeout
    busy = background_cores()
    warned = False
    while busy > max_cores and time.monotonic() < deadline:
        if not warned:
            log(f"    (waiting for the machine to be quiet: {busy:.2f} cores busy elsewhere)")
            warned = True
        busy = background_cores(1.0)
    return busy


def children_cpu_seconds() -> float:
    """CPU seconds of this process's waited-for children (the load generator runs)."""
    t = os.times()
    return t.children_user + t.children_system


def peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over `pid` and its descendants, in MiB."""
    total_kb = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


# --- wrk ---------------------------------------------------------------------------------------------

_WRK_LUA = """
wrk.method = "POST"
wrk.body = %(body)s
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,' ..
    '"p50":%%d,"p95":%%d,"p99":%%d,"mean":%%f}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean))
end
"""


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    concurrency: int,
    duration: float,
    cpus: str | None = None,
    threads: int = 1,
) -> LoadResult:
    """Drive `url` with wrk for `duration` seconds at `concurrency` open connections."""
    header_lines = "\n".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
    script = _WRK_LUA % {"body": _lua_string(body.decode()), "headers": header_lines}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        cmd = [
            "wrk",
            f"-t{min(threads, concurrency)}",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            path,
            url,
        ]
        out = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data = json.loads(line[len("WRKJSON ") :])
    seconds = data["duration_us"] / 1e6
    ok = data["requests"] - data["non2xx"]
    return LoadResult(
        tool="wrk",
        concurrency=concurrency,
        duration_s=seconds,
        requests=data["requests"],
        errors=data["errors"] + data["non2xx"],
        rps=ok / seconds if seconds else 0.0,
        p50_ms=data["p50"] / 1000,
        p95_ms=data["p95"] / 1000,
        p99_ms=data["p99"] / 1000,
    )


# --- Python load generator (own process) -------------------------------------------------------------


def run_pyload(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    concurrency: int,
    duration: float,
    cpus: str | None = None,
) -> LoadResult:
    """Drive `url` from a separate Python process (aiohttp client, uvloop); also measures TTFB."""
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(body)
        body_path = f.name
    try:
        cmd = [PYTHON, str(Path(__file__)), "pyload", "--url", url, "--body-file", body_path]
        cmd += ["-c", str(concurrency), "-d", str(duration), "--headers", json.dumps(headers)]
        out = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(body_path)
    return LoadResult(**json.loads(out.strip().splitlines()[-1]))


def run_load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    concurrency: int,
    duration: float,
    cpus: str | None = None,
    tool: str = "auto",
) -> LoadResult:
    """wrk when available (or asked for), else the Python generator."""
    if tool == "wrk" or (tool == "auto" and have_wrk()):
        return run_wrk(url, body, headers, concurrency=concurrency, duration=duration, cpus=cpus)
    return run_pyload(url, body, headers, concurrency=concurrency, duration=duration, cpus=cpus)


async def _pyload(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float
) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    ttfbs: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        started = time.perf_counter()
        deadline = started + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body) as response:
                        first = True
                        async for _chunk in response.content.iter_any():
                            if first:
                                ttfbs.append(time.perf_counter() - t0)
                                first = False
                        if response.status >= 400:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    ttfbs.sort()
    return LoadResult(
        tool="python",
        concurrency=concurrency,
        duration_s=elapsed,
        requests=len(latencies) + errors,
        errors=errors,
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p95_ms=percentile(latencies, 95) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        ttfb_p50_ms=percentile(ttfbs, 50) * 1000 if ttfbs else None,
    )


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("pyload", help="run the Python load generator and print one JSON line")
    load.add_argument("--url", required=True)
    load.add_argument("--body-file", required=True)
    load.add_argument("--headers", default="{}")
    load.add_argument("-c", "--concurrency", type=int, default=1)
    load.add_argument("-d", "--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    headers = {"content-type": "application/json", **json.loads(args.headers)}
    body = Path(args.body_file).read_bytes()
    work = _pyload(args.url, body, headers, args.concurrency, args.duration)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(work)
    else:
        result = uvloop.run(work)
    print(json.dumps(result.as_dict()))


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    _main()
