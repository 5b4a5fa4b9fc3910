"""`orq-proxy serve | demo`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from orq_proxy.config import ConfigError, ProxyConfig, load_config

if TYPE_CHECKING:
    from orq_proxy.app import OrqProxy

__all__ = ["main", "run_server"]

logger = logging.getLogger("orq_proxy.cli")

_RESPAWN_WINDOW = 10.0  # seconds: a worker that dies sooner than this after its start counts as a crash loop
_RESPAWN_LIMIT = 5  # crash-loop deaths in a row after which the supervisor gives up
_STOP_GRACE = 30.0  # seconds the workers get to finish in-flight requests at shutdown


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
        if args.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {args.workers}")
        config.check_workers(args.workers)
        if args.workers > 1 and args.worker_fd is None:
            return _supervise(config, args)
        app = build_app(config)
    except (ConfigError, ValueError) as exc:
        print(f"orq-proxy: {exc}", file=sys.stderr)
        return 2
    sock = None if args.worker_fd is None else socket.socket(fileno=args.worker_fd)
    run_server(app, log_level=args.log_level, access_log=args.access_log, sock=sock)
    return 0


def _listening_socket(config: ProxyConfig) -> socket.socket:
    """The one socket every worker accepts on (bound here, so a port in use is one clear error)."""
    host, port = config.server.host, config.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _supervise(config: ProxyConfig, args: argparse.Namespace) -> int:
    """`serve --workers N`: bind the port once, run N worker processes accepting on it (each a whole
    proxy: its own event loop, pools and in-process caches over the shared PostgreSQL and Redis), start a
    worker again when one dies, and stop them all on SIGTERM / SIGINT."""
    sock = _listening_socket(config)
    fd = sock.fileno()
    argv = [sys.executable, "-m", "orq_proxy", *_worker_argv(args), "--worker-fd", str(fd)]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def spawn() -> tuple[subprocess.Popen[bytes], float]:
        return subprocess.Popen(argv, pass_fds=[fd]), time.monotonic()

    workers = [spawn() for _ in range(args.workers)]
    logger.info(
        "orq-proxy supervisor %d: %d workers on http://%s:%d (pids %s)",
        os.getpid(),
        args.workers,
        config.server.host,
        config.server.port,
        ", ".join(str(proc.pid) for proc, _ in workers),
    )
    quick_deaths = 0
    status = 0
    while not stopping:
        time.sleep(0.2)
        for i, (proc, started) in enumerate(workers):
            code = proc.poll()
            if code is None or stopping:
                continue
            lived = time.monotonic() - started
            quick_deaths = quick_deaths + 1 if lived < _RESPAWN_WINDOW else 0
            if quick_deaths >= _RESPAWN_LIMIT:
                logger.error(
                    "worker %d exited with %d %d times in a row; stopping", proc.pid, code, quick_deaths
                )
                stopping, status = True, 1
                break
            logger.warning("worker %d exited with %d after %.0f s; starting another", proc.pid, code, lived)
            workers[i] = spawn()
    for proc, _ in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE
    for proc, _ in workers:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    sock.close()
    return status


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The `serve` arguments a worker gets: the supervisor's own, minus --workers."""
    argv = ["serve", "--log-level", args.log_level, "--workers", str(args.workers)]
    for flag, value in (
        ("--config", args.config),
        ("--host", args.host),
        ("--port", args.port),
        ("--upstream", args.upstream),
        ("--upstream-key-env", args.upstream_key_env),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.access_log:
        argv.append("--access-log")
    return argv


def run_server(
    app: OrqProxy, *, log_level: str = "info", access_log: bool = False, sock: socket.socket | None = None
) -> None:
    """Serve a built proxy the way `orq-proxy serve` does: uvicorn (uvloop when installed, httptools with
    `[server]`'s header and read limits) on `[server] host/port` (or on `sock`, a listening socket a
    supervisor shares between workers), and the garbage collector tuned after startup
    (`[server] gc_threshold`)."""
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
    options = uvicorn.Config(
        app,
        host=config.server.host,
        port=config.server.port,
        lifespan="on",
        access_log=access_log,
        log_level=log_level,
        **kwargs,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(options)
    # uvicorn re-raises the SIGINT it handled once the server has stopped (as uvicorn.run swallows it)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=None if sock is None else [sock])


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
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on the one port (default 1); above 1 needs PostgreSQL state and events "
        "and Redis counters",
    )
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    serve.set_defaults(func=_serve)
    demo = sub.add_parser("demo", help="run a short scenario against the built-in fake upstream")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):  # one INFO line per HTTP call is too much for a proxy's log
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # psycopg's pool warns on every failed reconnection attempt; the stores log an outage once with its
    # cause, then a summary (orq_proxy/logs.py), so only its errors are kept.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
