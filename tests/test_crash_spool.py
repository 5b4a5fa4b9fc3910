"""A real `orq-proxy serve` killed with SIGKILL right after its last response loses no usage event: the
event spool is replayed into the DuckDB event store at the next start, without duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import httpx

from tests.test_cli import UPSTREAM_KEY, free_port

REQUESTS = 300


def _start(config: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orq_proxy", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=environment,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "proxy did not start"
        time.sleep(0.05)


def _drive(port: int, n: int) -> None:
    """`n` chat completions over 16 connections, all answered 200."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=30) as client:

        def one(_: int) -> int:
            return client.post("/chat/completions", json=body).status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(n)))
    assert statuses == [200] * n


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=20)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, -2), output
    assert "Traceback" not in output, output
    return output


def _stored(path: Path) -> tuple[int, int]:
    with duckdb.connect(str(path), read_only=True) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM usage_events").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _kill_twice_then_stop(tmp_path: Path, upstream_url: str, storage: str) -> str:
    """Serve `REQUESTS` and SIGKILL right after the last response, twice, each time starting again; then
    start once more and stop gracefully. The last run's output."""
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[upstreams.openai]\nbase_url = "{upstream_url}/v1"\napi_key = "{UPSTREAM_KEY}"\ndefault = true\n\n'
        f"[storage]\n{storage}"
    )
    for _ in range(2):
        proc, port = _start(config)
        _drive(port, REQUESTS)
        _kill(proc)
    proc, _ = _start(config)
    return _stop(proc)


def test_sigkill_after_the_last_response_loses_no_event(fake_server: Any, tmp_path: Path) -> None:
    """Two SIGKILLs right after the last response, each followed by a restart: every event is stored once."""
    events = tmp_path / "events.duckdb"
    output = _kill_twice_then_stop(tmp_path, fake_server[1].url, f'events = "duckdb://{events}"\n')
    assert _stored(events) == (2 * REQUESTS, 2 * REQUESTS), output
    # A graceful stop leaves the spool empty: the next start has nothing to replay.
    assert list((tmp_path / "events.duckdb.spool").iterdir()) == []


def test_a_spool_directory_keeps_a_postgresql_replica_s_events_across_sigkill(
    fake_server: Any, tmp_path: Path, pg_url: str
) -> None:
    """With events in PostgreSQL the spool is off unless a directory is set (README, "Running several
    replicas"); with one, a SIGKILLed replica's unwritten events reach the shared table at its next start."""
    import psycopg

    storage = f'events = "{pg_url}"\nspool = "{tmp_path / "spool"}"\n'
    output = _kill_twice_then_stop(tmp_path, fake_server[1].url, storage)
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM usage_events").fetchone()
    assert row == (2 * REQUESTS, 2 * REQUESTS), output
    assert list((tmp_path / "spool").iterdir()) == []
