"""The `orq-proxy` command as a real subprocess."""

from __future__ import annotations

import gc
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from orq_proxy.app import tune_gc, untune_gc


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
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully and Python exits normally
        output = proc.communicate(timeout=20)[0].decode()
    # uvicorn re-raises the signal it stopped on after a graceful shutdown: -2 is its normal exit here.
    assert proc.returncode in (0, -2), output
    assert "Traceback" not in output, output
    assert "OPEN MODE" in output
    # The GC was tuned after startup (objects frozen) and untuned at shutdown: nothing reported leaked.
    assert "leaked" not in output, output


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
