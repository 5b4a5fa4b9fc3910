"""Run an ASGI app on a real socket (uvicorn, ephemeral port) in a background thread, for tests and demos."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from orq_proxy.config import ProxyConfig, ServerConfig
from orq_proxy.proxy.server import uvicorn_options

__all__ = ["ServerThread", "serve_in_thread"]


class ServerThread:
    """A uvicorn server on 127.0.0.1 in its own thread and event loop.

    It runs the protocol `orq-proxy serve` does, with the header and read limits of the app's `[server]`
    section when the app is a built proxy (`app.config`), else the defaults; `uvicorn_kwargs` override.

    Example:
        with serve_in_thread(app) as server:
            httpx.get(server.url + "/healthz")
    """

    def __init__(
        self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, **uvicorn_kwargs: Any
    ) -> None:
        config = getattr(app, "config", None)
        server = config.server if isinstance(config, ProxyConfig) else ServerConfig()
        kwargs: dict[str, Any] = {"log_level": "warning", "lifespan": "on", "loop": "asyncio"}
        kwargs.update(uvicorn_options(server))
        kwargs.update(uvicorn_kwargs)
        self.config = uvicorn.Config(app, host=host, port=port, **kwargs)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = port

    def _run(self) -> None:
        # A Runner, as `asyncio.run` (and so `uvicorn.run`) uses: tasks still pending when the server stops
        # (an app that started its resources without a lifespan) are cancelled, not destroyed pending.
        with asyncio.Runner() as runner:
            self.loop = runner.get_loop()
            runner.run(self.server.serve())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.005)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, **kwargs: Any) -> Iterator[ServerThread]:
    """Serve `app` on an ephemeral loopback port for the duration of the block."""
    server = ServerThread(app, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
