"""The `orq-proxy` command as a real subprocess."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from orq_proxy.app import tune_gc, untune_gc

UPSTREAM_KEY = "sk-upstream-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(args: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[int, list[str]]]:
    """`python -m orq_proxy serve --port P *args` until the block ends (then Ctrl-C); yields the port and
    a list that holds the process's output once it has exited."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    environment.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "orq_proxy", "serve", "--port", str(port), "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=environment,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.1)
        yield port, output
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully and Python exits normally
        output.append(proc.communicate(timeout=20)[0].decode())
    # uvicorn re-raises the signal it stopped on after a graceful shutdown: -2 is its normal exit here.
    assert proc.returncode in (0, -2), output[0]
    assert "Traceback" not in output[0], output[0]


def chat(port: int) -> Any:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
        return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_serve_with_upstream_flag(fake_server: Any, tmp_path: Path) -> None:
    """`python -m orq_proxy serve --upstream URL` proxies in open mode until terminated."""
    fake, upstream = fake_server
    fake.reset()
    config = tmp_path / "c.toml"
    config.write_text('[upstreams.openai]\nbase_url = "http://unused/v1"\napi_key = "sk-upstream-secret"\n')
    with serving(["--config", str(config), "--upstream", upstream.url + "/v1"]) as (port, output):
        out = chat(port)
        assert out.usage is not None and out.usage.completion_tokens == 8
    assert "OPEN MODE" in output[0]
    # The GC was tuned after startup (objects frozen) and untuned at shutdown: nothing reported leaked.
    assert "leaked" not in output[0], output[0]


def test_upstream_flag_takes_the_credential_from_openai_api_key(fake_server: Any) -> None:
    """`--upstream URL` alone sends `OPENAI_API_KEY` upstream, as the openai SDK would (the fake upstream
    answers 401 without the right credential)."""
    fake, upstream = fake_server
    fake.reset()
    with serving(["--upstream", upstream.url + "/v1"], env={"OPENAI_API_KEY": UPSTREAM_KEY}) as (port, _):
        assert chat(port).usage is not None
    assert fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_upstream_key_env_names_the_variable(fake_server: Any) -> None:
    """`--upstream-key-env NAME` reads the credential from NAME instead."""
    fake, upstream = fake_server
    fake.reset()
    args = ["--upstream", upstream.url + "/v1", "--upstream-key-env", "MY_GATEWAY_KEY"]
    with serving(args, env={"MY_GATEWAY_KEY": UPSTREAM_KEY, "OPENAI_API_KEY": "sk-wrong"}) as (port, _):
        assert chat(port).usage is not None
    assert fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_an_unset_key_variable_is_a_startup_warning(fake_server: Any) -> None:
    """An `api_key_env` that is not set is said at startup, naming the variable and the upstream; the
    upstream's 401 then reaches the client as it is."""
    _, upstream = fake_server
    with (
        serving(["--upstream", upstream.url + "/v1"]) as (port, output),
        pytest.raises(openai.AuthenticationError),
    ):
        chat(port)
    assert "api_key_env OPENAI_API_KEY is not set" in output[0] and "'openai'" in output[0], output[0]


def test_tune_gc_freezes_startup_objects_and_untune_restores() -> None:
    """`tune_gc` freezes what exists and raises the young-generation threshold; `untune_gc` undoes it."""
    before = gc.get_threshold()
    try:
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 10_000
        untune_gc()
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == (700, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_serve_rejects_bad_config(tmp_path: Path) -> None:
    """A bad config exits with status 2 and a message naming the key."""
    config = tmp_path / "c.toml"
    config.write_text("[server]\nport = 'eighty'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "orq_proxy", "serve", "--config", str(config)], capture_output=True, timeout=30
    )
    assert proc.returncode == 2
    assert b"server.port" in proc.stderr


def test_serve_refuses_open_mode_on_public_address() -> None:
    """Open mode on 0.0.0.0 is refused before binding."""
    proc = subprocess.run(
        [sys.executable, "-m", "orq_proxy", "serve", "--upstream", "http://x/v1", "--host", "0.0.0.0"],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2 and b"loopback" in proc.stderr


def test_demo_without_its_clients_names_the_extra() -> None:
    """On a plain install (no openai SDK), `orq-proxy demo` says which extra to install, exit status 2."""
    code = "import sys; sys.modules['openai'] = None; from orq_proxy.cli import main; raise SystemExit(main(['demo']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'orq-proxy[demo]'" in proc.stdout and "openai" in proc.stdout


@pytest.mark.parametrize(
    ("storage", "named"),
    [
        ("", ['state = "memory"', 'events = "duckdb://:memory:"', 'counters = "memory"']),
        (
            'state = "postgresql://h/db"\nevents = "postgresql://h/db"\ncounters = "memory"\n',
            ['counters = "memory"'],
        ),
        (
            'state = "sqlite:///tmp/x.db"\nevents = "postgresql://h/db"\ncounters = "redis://h:6379/0"\n'
            'spool = "/var/spool/orq"\n',
            ['state = "sqlite:///tmp/x.db"', 'spool = "/var/spool/orq"'],
        ),
    ],
)
def test_workers_above_one_with_a_per_process_backend_is_refused(
    tmp_path: Path, storage: str, named: list[str]
) -> None:
    """`serve --workers 2` with state only one process holds: exit 2 before binding, naming each setting."""
    config = tmp_path / "proxy.toml"
    config.write_text(f'[upstreams.openai]\nbase_url = "http://127.0.0.1:9/v1"\n\n[storage]\n{storage}')
    result = subprocess.run(
        [sys.executable, "-m", "orq_proxy", "serve", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "--workers 2 needs state all workers share" in result.stderr
    for setting in named:
        assert setting in result.stderr
    mentioned = result.stderr.count(" = ")
    assert mentioned == len(named), result.stderr
