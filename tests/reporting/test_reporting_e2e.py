"""End to end: requests through the real proxy (openai SDK, fake upstream), then a report through the orq SDK
that sees them within a second."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from orq_ai_sdk import Orq

MESSAGES: list[Any] = [{"role": "user", "content": "how much did this cost"}]
CONFIG = {
    "api_keys": [
        {"key": "sk-admin", "id": "key_admin", "admin": True},
        # Explicitly "any" (with an owner the default is "owner"): one key attributes by all three sources.
        {"key": "sk-alice", "id": "key_alice", "owner": "alice", "identities": "any"},
    ]
}


def test_proxied_requests_show_up_in_reports_within_a_second(proxy_factory: Any, fake: Any) -> None:
    """Chat calls attributed by owner, header and body identity, one stream, one upstream error: the
    report counts each, sums the tokens the client saw, and sees them less than a second after the last."""
    _, server = proxy_factory(CONFIG)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-alice", max_retries=0)
    seen_tokens = 0
    for _ in range(2):  # attributed to the key's owner
        out = client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
        assert out.usage is not None
        seen_tokens += out.usage.total_tokens
    out = client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=MESSAGES, extra_headers={"X-ORQ-IDENTITY-ID": "bob"}
    )
    assert out.usage is not None
    seen_tokens += out.usage.total_tokens
    stream = client.chat.completions.create(
        model="openai/gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"orq": {"identity": {"id": "carol"}}},
    )
    for chunk in stream:
        if chunk.usage is not None:
            seen_tokens += chunk.usage.total_tokens
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES, extra_headers={"x-fake-status": "500"}
        )
    finished = time.monotonic()

    now = datetime.now(UTC)
    window = {"from_": now - timedelta(hours=1), "to": now + timedelta(minutes=5)}
    with Orq(api_key="sk-admin", server_url=server.url, timeout_ms=10_000) as orq:
        while True:
            report = orq.reporting.query(
                metric="genai.requests", mode="scalar", group_by=["identity"], sort="asc", **window
            )
            counts = {
                row.dimensions.get("identity"): row.metrics["genai.requests"] for row in report.data or []
            }
            if sum(counts.values()) >= 5 or time.monotonic() - finished > 1.0:
                break
            time.sleep(0.02)
        assert time.monotonic() - finished < 1.0, f"events not visible within a second: {counts}"
        assert counts == {"alice": 3, "bob": 1, "carol": 1}

        usage = orq.reporting.query(
            metric="genai.usage",
            mode="scalar",
            filters=[{"field": "status_code", "op": "eq", "values": ["OK"]}],
            include_totals=True,
            **window,
        )
        assert usage.data is not None and usage.data[0].metrics["request_count"] == 4
        assert usage.data[0].metrics["total_tokens"] == seen_tokens
        assert usage.data[0].metrics["total_cost"] > 0

        errors = orq.reporting.query(
            metric="genai.errors", mode="scalar", group_by=["http_status_code"], **window
        )
        rows = [(row.dimensions, row.metrics) for row in errors.data or []]
        assert rows == [
            ({"http_status_code": "500"}, {"genai.errors": 1}),
            ({"http_status_code": "200"}, {"genai.errors": 0}),
        ]

        models = orq.reporting.query(metric="genai.requests", mode="scalar", group_by=["model"], **window)
        assert {row.dimensions.get("model") for row in models.data or []} == {
            "openai/gpt-4o",
            "openai/gpt-4o-mini",
        }

        ttft = orq.reporting.query(metric="genai.ttft.avg", mode="scalar", group_by=["identity"], **window)
        assert [row.dimensions for row in ttft.data or []] == [{"identity": "carol"}]
