"""`orq-proxy serve | demo`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from orq_proxy.config import ConfigError, load_config

if TYPE_CHECKING:
    from orq_proxy.app import OrqProxy

__all__ = ["main", "run_server"]


def _serve(args: argparse.Namespace) -> int:
    from orq_proxy.app import build_app

    try:
        config = load_config(
            args.config,
            host=args.host,
            port=args.port,
            upstream=args.upstream,
            upstream_key_env=args.upstream_key_env,
        )
        config.check_bind()
        app = build_app(config)
    except (ConfigError, ValueError) as exc:
        print(f"orq-proxy: {exc}", file=sys.stderr)
        return 2
    run_server(app, log_level=args.log_level, access_log=args.access_log)
    return 0


def run_server(app: OrqProxy, *, log_level: str = "info", access_log: bool = False) -> None:
    """Serve a built proxy the way `orq-proxy serve` does: uvicorn (uvloop when installed, httptools with
    `[server]`'s header and read limits) on `[server] host/port`, and the garbage collector tuned after
    startup (`[server] gc_threshold`)."""
    import uvicorn

    from orq_proxy.app import tune_gc, untune_gc
    from orq_proxy.proxy.server import uvicorn_options

    config = app.config
    threshold = config.server.gc_threshold
    if threshold:

        async def gc_after_startup() -> None:
            tune_gc(threshold)

        async def gc_at_shutdown() -> None:
            untune_gc()

        app.on_startup(gc_after_startup)
        app.on_shutdown(gc_at_shutdown)
    # httptools with `[server]`'s header size and count caps and read deadline (orq_proxy/proxy/server.py)
    kwargs: dict[str, object] = uvicorn_options(config.server)
    try:
        import uvloop  # noqa: F401

        kwargs["loop"] = "uvloop"
    except ImportError:  # pragma: no cover
        pass
    uvicorn.run(
        app,
        host=config.server.host,
        port=config.server.port,
        lifespan="on",
        access_log=access_log,
        log_level=log_level,
        **kwargs,  # type: ignore[arg-type]
    )


def _demo(args: argparse.Namespace) -> int:
    from orq_proxy.demo import run_demo

    return run_demo()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `orq-proxy` command."""
    parser = argparse.ArgumentParser(prog="orq-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="TOML config file (default: $ORQ_PROXY_CONFIG)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument(
        "--upstream", help="base URL of the default OpenAI-compatible upstream, e.g. http://h/v1"
    )
    serve.add_argument(
        "--upstream-key-env",
        metavar="NAME",
        help="environment variable holding the --upstream credential (default OPENAI_API_KEY)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    serve.set_defaults(func=_serve)
    demo = sub.add_parser("demo", help="run a short scenario against the built-in fake upstream")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):  # one INFO line per HTTP call is too much for a proxy's log
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
