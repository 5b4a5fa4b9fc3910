"""The `orq-proxy` command as a real subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_with_upstream_flag(fake_server: Any, tmp_path: Path) -> None:
    """`python -m orq_proxy serve --upstream URL` proxies in open mode until terminated."""
    fake, upstream = fake_server
    fake.reset()
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text('[upstreams.openai]\nbase_url = "http://unused/v1"\napi_key = "sk-upstream-secret"\n')
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orq_proxy",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--upstream",
            upstream.url + "/v1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
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
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert out.usage is not None and out.usage.completion_tokens == 8
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0].decode()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is its normal exit here.
    assert proc.returncode in (0, -15), output
    assert "Traceback" not in output, output
    assert "OPEN MODE" in output


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
