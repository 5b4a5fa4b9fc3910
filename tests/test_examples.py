"""Documentation examples run as written."""

from __future__ import annotations

import importlib.util
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from orq_ai_sdk import Orq
from starlette.applications import Starlette
from starlette.routing import Mount

from orq_proxy.app import build_app
from orq_proxy.config import ProxyConfig
from orq_proxy.testing.servers import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mount_in_starlette(fake_server: Any) -> None:
    """The proxy mounted at /llm serves OpenAI calls next to the host app's own route."""
    fake, upstream = fake_server
    fake.reset()
    example = load_example("mount_in_starlette")
    app, _ = example.create_app(upstream.url + "/v1", upstream_key="sk-upstream-secret")
    with serve_in_thread(app) as server:
        assert httpx.get(server.url + "/hello").json() == {"hello": "from the host app"}
        assert httpx.get(server.url + "/llm/healthz").json() == {"status": "ok"}
        assert httpx.get(server.url + "/llm/readyz").json() == {"status": "ready"}
        client = openai.OpenAI(base_url=server.url + "/llm/v1", api_key="k", max_retries=0)
        out = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content
        assert httpx.get(server.url + "/v1/chat/completions").status_code == 404
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"]


def test_mounted_without_lifespan_still_records_usage(
    fake_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Mounted without `lifespan=` (the common mistake): the first request starts the proxy's resources,
    says once that the lifespan should run, and every call is still a usage event that reports show."""
    fake, upstream = fake_server
    fake.reset()
    upstream_cfg = {"base_url": upstream.url + "/v1", "api_key": "sk-upstream-secret"}
    proxy = build_app(ProxyConfig.model_validate({"upstreams": {"openai": upstream_cfg}}))
    app = Starlette(routes=[Mount("/llm", app=proxy)])  # no lifespan: Starlette never runs the proxy's
    with caplog.at_level(logging.WARNING, logger="orq_proxy.app"), serve_in_thread(app) as server:
        with openai.OpenAI(base_url=server.url + "/llm/v1", api_key="k", max_retries=0) as client:
            for _ in range(3):
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        now = datetime.now(UTC)
        with Orq(server_url=server.url + "/llm", timeout_ms=10_000) as orq:
            deadline = time.monotonic() + 5
            while True:
                report = orq.reporting.query(
                    metric="genai.requests", from_=now - timedelta(hours=1), to=now + timedelta(minutes=1)
                )
                total = sum(row.metrics["genai.requests"] for row in report.data or [])
                if total >= 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        assert total == 3
    warnings = [r.getMessage() for r in caplog.records if "lifespan did not run" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_demo_runs_every_step() -> None:
    """`orq-proxy demo` runs all its steps against the built-in fake upstream."""
    from orq_proxy.demo import run_demo

    lines: list[str] = []
    assert run_demo(out=lines.append) == 0, lines
    assert any("chat" in line for line in lines)
