"""Budget test fixtures: `make_budget(...)` builds internal `Budget` records; `counters` is each `Counters`
backend in turn (in memory, and Redis at 127.0.0.1:6379 under a random key prefix, cleaned up); `own_redis`
is a throwaway `redis-server` on a free port for fault tests (the machine's Redis on 6379 is never stopped)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from orq_proxy.budgets.counters import Counters, InMemoryCounters
from orq_proxy.budgets.models import Alert, Budget, Period, ScopeKind, derived_cel
from orq_proxy.budgets.redis_counters import redis_counters_from_url
from orq_proxy.testing.servers import ServerThread

MakeBudget = Callable[..., Budget]

T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def new_budget(
    *,
    kind: ScopeKind | None = ScopeKind.WORKSPACE,
    target: str = "",
    cel: str | None = None,
    period: Period | None = Period.MONTHLY,
    amount_nanos: int | None = None,
    token_limit: int | None = None,
    rpm: int | None = None,
    alerts: tuple[Alert, ...] = (),
    workspace: str = "default",
    is_active: bool = True,
    expires_at: datetime | None = None,
    time_zone: str | None = None,
    created_at: datetime = T0,
    **extra: Any,
) -> Budget:
    if cel is None:
        cel = derived_cel(kind, target) if kind is not None else ""
    return Budget(
        budget_id=extra.pop("budget_id", str(ULID())),
        workspace=workspace,
        scope_kind=kind,
        scope_target=target,
        cel=cel,
        period=period,
        amount_nanos=amount_nanos,
        token_limit=token_limit,
        requests_per_minute=rpm,
        alerts=alerts,
        is_active=is_active,
        expires_at=expires_at,
        created_at=created_at,
        updated_at=extra.pop("updated_at", created_at),
        time_zone=time_zone,
    )


@pytest.fixture
def make_budget() -> MakeBudget:
    """`make_budget(kind=..., target=..., amount_nanos=..., ...)` -> a `Budget` (defaults: workspace, monthly)."""
    return new_budget


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "redis"])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[Counters]:
    """Each counters backend; the Redis one under a fresh key prefix, deleted afterwards."""
    if request.param == "memory":
        yield InMemoryCounters()
        return
    request.getfixturevalue("redis_url")
    prefix = f"test-orq:{ULID()}:"
    backend = redis_counters_from_url(REDIS_URL, prefix=prefix)
    client = backend.client
    try:
        yield backend
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


class OwnRedis:
    """A throwaway `redis-server` on a fixed free port, which the test can stop and start again."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server): fault tests need it")
        self.binary = binary
        self.workdir = workdir
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # (a paused server cannot act on SIGTERM)
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a stalled Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path)
    redis.start()
    yield redis
    redis.stop()


def budget_usage(server: ServerThread, budget_id: str) -> tuple[float, float, int]:
    """A budget's live `usage` (USD, tokens, requests in the last 60 s), read with the orq-ai-sdk."""
    from orq_ai_sdk import Orq

    with Orq(server_url=server.url, timeout_ms=30_000) as orq:
        got = orq.budgets.get(budget_id=budget_id).budget
    assert got is not None and got.usage is not None
    return got.usage.amount, got.usage.tokens, int(got.usage.requests)
