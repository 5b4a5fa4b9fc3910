"""What the dashboard tests share: the keys, the price arithmetic, a handle on the running proxy, screenshots."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = "sk-ui-admin"
USER = "sk-ui-user"
UPSTREAM_KEY = "sk-upstream-secret"  # the session fake upstream's credential (tests/conftest.py)
MESSAGES = [{"role": "user", "content": "hello there"}]
# The fake upstream bills "hello there" as 6 prompt and 8 completion tokens; at 10,000 and 20,000 USD per
# million tokens that is 0.06 + 0.16 = $0.22 a request.
REQUEST_COST_USD = 0.22
REQUEST_TOKENS = 14
SCREENSHOTS_TO_DOCS = os.environ.get("ORQ_UI_SCREENSHOTS") == "docs"  # refresh docs/ui-*.png
DOCS = Path(__file__).resolve().parents[2] / "docs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proxy:
    """One `orq-proxy serve` process with an admin key and a non-admin key."""

    url: str
    proc: subprocess.Popen[bytes]
    admin: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """An admin call that must succeed; its JSON."""
        response = self.admin.request(method, path, **kwargs)
        assert response.status_code in (200, 201), (method, path, response.status_code, response.text)
        return response.json()

    def chat(self, identity: str, n: int = 1) -> None:
        """`n` chat completions attributed to `identity`, through the real openai SDK."""
        with openai.OpenAI(base_url=self.url + "/v1", api_key=USER, max_retries=0) as client:
            for _ in range(n):
                client.chat.completions.create(
                    model="test-model",
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=10,
                    extra_body={"orq": {"identity": {"id": identity}}},
                )

    def requests_of(self, identity: str) -> int:
        """How many requests of `identity` the reporting API has (events reach it a moment after)."""
        now = time.time()
        report = self.api(
            "POST",
            "/v2/reporting",
            json={
                "metric": "genai.requests",
                "from": _rfc3339(now - 86400),
                "to": _rfc3339(now + 60),
                "filters": [{"field": "identity", "op": "eq", "values": [identity]}],
                "mode": "scalar",
            },
        )
        return int(sum(row["metrics"]["genai.requests"] for row in report["data"]))


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write_config(path: Path, upstream: str) -> Path:
    path.write_text(
        f"""
[upstreams.openai]
base_url = "{upstream}/v1"
api_key = "{UPSTREAM_KEY}"
default = true

[[api_keys]]
key = "{ADMIN}"
workspace = "ws"
admin = true
id = "admin"

[[api_keys]]
key = "{USER}"
workspace = "ws"
id = "app"

[prices."openai/test-model"]
input_per_mtok = 10000.0
output_per_mtok = 20000.0
"""
    )
    return path


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot into the test's folder (and into docs/ with ORQ_UI_SCREENSHOTS=docs)."""
    target = tmp_path / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    if SCREENSHOTS_TO_DOCS and not name.endswith("-phone"):
        shutil.copyfile(target, DOCS / f"{name}.png")
    return target


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 50 ms (each poll is an API call) until it holds; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
