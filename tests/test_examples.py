"""Documentation examples run as written."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import httpx
import openai

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


def test_demo_runs_every_step() -> None:
    """`orq-proxy demo` runs all its steps against the built-in fake upstream."""
    from orq_proxy.demo import run_demo

    lines: list[str] = []
    assert run_demo(out=lines.append) == 0, lines
    assert any("chat" in line for line in lines)
