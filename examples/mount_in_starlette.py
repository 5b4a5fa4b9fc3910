"""Mount orq-proxy inside an existing Starlette (or FastAPI) app, next to the app's own routes.

Run it: `python examples/mount_in_starlette.py --upstream http://127.0.0.1:9000/v1` and point an OpenAI
client at `http://127.0.0.1:8000/llm/v1`. With FastAPI it is the same: `app.mount("/llm", proxy)` and
`FastAPI(lifespan=proxy.lifespan)`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from orq_proxy.app import OrqProxy, build_app
from orq_proxy.config import ProxyConfig


async def hello(request: Request) -> JSONResponse:
    """One of the host app's own routes."""
    return JSONResponse({"hello": request.app.state.greeting})


def create_app(upstream_url: str, upstream_key: str | None = None) -> tuple[Starlette, OrqProxy]:
    """The host app with the proxy mounted at `/llm`; the proxy's lifespan runs inside the host's.

    Starlette does not run a mounted app's lifespan, so the host's own lifespan enters the proxy's (with no
    lifespan of its own, `lifespan=proxy.lifespan` does the same).
    """
    upstream = {"base_url": upstream_url, "api_key": upstream_key, "default": True}
    config = ProxyConfig.model_validate({"upstreams": {"openai": upstream}})
    proxy = build_app(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with proxy.lifespan(app):
            app.state.greeting = "from the host app"  # the host's own startup goes here
            yield

    app = Starlette(routes=[Route("/hello", hello), Mount("/llm", app=proxy)], lifespan=lifespan)
    return app, proxy


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream)[0], host="127.0.0.1", port=8000)
