"""Shared fixtures: a real fake upstream on a socket, and a factory for real proxies in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
