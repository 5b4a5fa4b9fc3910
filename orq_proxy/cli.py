"""`orq-proxy serve | demo`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from orq_proxy.config import ConfigError, load_config

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - uvicorn is a dependency; this guards stripped installs
        print("orq-proxy serve needs uvicorn: pip install 'uvicorn[standard]'", file=sys.stderr)
        return 2
    from orq_proxy.app import build_app

    try:
        config = load_config(args.config, host=args.host, port=args.port, upstream=args.upstream)
        config.check_bind()
        app = build_app(config)
    except (ConfigError, ValueError) as exc:
        print(f"orq-proxy: {exc}", file=sys.stderr)
        return 2
    kwargs: dict[str, object] = {}
    try:
        import uvloop  # noqa: F401

        kwargs["loop"] = "uvloop"
    except ImportError:  # pragma: no cover
        pass
    try:
        import httptools  # noqa: F401

        kwargs["http"] = "httptools"
    except ImportError:  # pragma: no cover
        pass
    uvicorn.run(
        app,
        host=config.server.host,
        port=config.server.port,
        lifespan="on",
        access_log=args.access_log,
        log_level=args.log_level,
        **kwargs,  # type: ignore[arg-type]
    )
    return 0


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
