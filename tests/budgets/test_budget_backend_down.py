"""A Redis that stops answering: the management API says 503 in orq's shape (not a 500), `/readyz` names
the backend, and both recover when Redis is back. The test runs its own `redis-server` on a free port (the
machine's Redis on 6379 is never stopped).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from orq_ai_sdk import Orq


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
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path)
    redis.start()
    yield redis
    redis.stop()


def test_redis_down_is_503_and_readyz_says_so(own_redis: OwnRedis, proxy_factory: Any) -> None:
    """GET /v2/budgets with Redis gone: 503 orq-shaped, naming the backend; /readyz 503 naming it too; a
    proxied call 503 `budget_unavailable`; all back to normal once Redis answers again."""
    _, server = proxy_factory({"storage": {"counters": own_redis.url}})
    with Orq(server_url=server.url, timeout_ms=10_000) as orq:
        orq.budgets.create(scope={"workspace": {}}, limits={"amount": 5.0})
        assert len(orq.budgets.list().data) == 1
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}

    own_redis.stop()
    listed = httpx.get(server.url + "/v2/budgets", timeout=30)
    assert listed.status_code == 503, listed.text
    body = listed.json()
    assert body["code"] == 14 and body["message"].startswith("budget counters (Redis) is unavailable")
    ready = httpx.get(server.url + "/readyz", timeout=30)
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable" and "budget counters (Redis)" in ready.json()["failing"]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "budget_unavailable"

        own_redis.start()  # same port, empty dataset
        assert httpx.get(server.url + "/readyz", timeout=30).json() == {"status": "ready"}
        assert httpx.get(server.url + "/v2/budgets", timeout=30).status_code == 200
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
