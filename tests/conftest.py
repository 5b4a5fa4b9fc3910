"""Shared fixtures: a real fake upstream on a socket, and a factory for real proxies in front of it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from orq_proxy.app import OrqProxy, build_app
from orq_proxy.config import ProxyConfig
from orq_proxy.testing.fake_upstream import FakeUpstream, build_fake_upstream
from orq_proxy.testing.servers import ServerThread, serve_in_thread

UPSTREAM_KEY = "sk-upstream-secret"


@pytest.fixture(scope="session")
def fake_server() -> Iterator[tuple[FakeUpstream, ServerThread]]:
    """One fake OpenAI upstream for the whole session (it requires the upstream credential)."""
    fake = build_fake_upstream(api_key=UPSTREAM_KEY)
    with serve_in_thread(fake) as server:
        yield fake, server


@pytest.fixture
def fake(fake_server: tuple[FakeUpstream, ServerThread]) -> FakeUpstream:
    """The session's fake upstream with its request log cleared."""
    fake_server[0].reset()
    return fake_server[0]


@pytest.fixture
def upstream_url(fake_server: tuple[FakeUpstream, ServerThread]) -> str:
    return fake_server[1].url + "/v1"


ProxyFactory = Callable[..., tuple[OrqProxy, ServerThread]]


@contextmanager
def _proxies(upstream_url: str) -> Iterator[ProxyFactory]:
    """A proxy factory whose servers all stop when the block ends."""
    servers: list[ServerThread] = []

    def make(config: dict[str, Any] | None = None, **kwargs: Any) -> tuple[OrqProxy, ServerThread]:
        data = dict(config or {})
        data.setdefault(
            "upstreams", {"openai": {"base_url": upstream_url, "api_key": UPSTREAM_KEY, "default": True}}
        )
        app = build_app(ProxyConfig.model_validate(data), **kwargs)
        server = ServerThread(app).start()
        servers.append(server)
        return app, server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def proxy_factory(upstream_url: str) -> Iterator[ProxyFactory]:
    """`make(config_dict=None, **build_app_kwargs) -> (app, server)`: a real proxy on a socket.

    The config gets an `openai` upstream (the fake, default) unless the dict names upstreams itself.
    """
    with _proxies(upstream_url) as make:
        yield make


@pytest.fixture(scope="module")
def module_proxy_factory(fake_server: tuple[FakeUpstream, ServerThread]) -> Iterator[ProxyFactory]:
    """`proxy_factory` for one test module: for proxies shared by tests that never change state."""
    with _proxies(fake_server[1].url + "/v1") as make:
        yield make


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The machine's PostgreSQL (127.0.0.1:5432, trust auth); if it does not answer, every test that needs
    it fails with this one message instead of a connection error each."""
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(
            f"no PostgreSQL at 127.0.0.1:5432 ({exc}): the PostgreSQL tests need one with trust auth for "
            "user postgres (.ci/run starts it)",
            pytrace=False,
        )
    return PG_ADMIN_URL


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server of `admin_url`, dropped (connections and all) afterwards."""
    import psycopg
    from ulid import ULID

    name = f"orq_test_{str(ULID()).lower()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # a generated name
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A database of its own for this test (created empty, dropped after)."""
    with fresh_database(pg_server) as url:
        yield url


class OwnPostgres:
    """A throwaway PostgreSQL server of the test's own on a free port (trust auth, no fsync), which the
    test may stop, start and restart; the machine's server on 5432 is never touched.

    As root, the server runs as the `postgres` OS user (initdb refuses root)."""

    def __init__(self) -> None:
        import glob
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            pytest.fail("PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin)")
        self.bin = Path(bins[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="orq-own-pg-", dir="/tmp"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def _ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.dir / "data"),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            options,
            action,
            *args,
        )

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A started `OwnPostgres`, removed after the test."""
    server = OwnPostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis (127.0.0.1:6379), which the Redis-backed budget tests need; if it does not
    answer, every one of them fails with this one message instead of a connection error each."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                raise OSError("it did not answer PING")
    except OSError as exc:
        pytest.fail(
            f"no Redis server at 127.0.0.1:6379 ({exc}): the Redis-backed tests need one; start it "
            "with `redis-server --port 6379 --save '' --daemonize yes` (.ci/run does)",
            pytrace=False,
        )
    return REDIS_URL
