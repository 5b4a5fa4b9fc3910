"""A Redis outage under a real proxy (the test's own redis-server, stopped) refuses many requests with a
handful of log lines and no traceback, instead of a ~3 KB traceback per refused request."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import openai
import pytest


def test_redis_outage_logs_a_few_lines_not_one_traceback_per_request(
    own_redis: Any, proxy_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """50 refused requests while Redis is down: at most a couple of warning lines from the gate, and no
    traceback (the old code logged a ~3 KB traceback per request)."""
    _, server = proxy_factory({"storage": {"counters": own_redis.url}})
    httpx.post(
        server.url + "/v2/budgets", json={"scope": {"workspace": {}}, "limits": {"amount": 5.0}}, timeout=30
    ).raise_for_status()
    own_redis.stop()
    with (
        caplog.at_level(logging.INFO, logger="orq_proxy.budgets.middleware"),
        openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=30) as client,
    ):
        for _ in range(50):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
    gate_lines = [r for r in caplog.records if r.name == "orq_proxy.budgets.middleware"]
    assert 1 <= len(gate_lines) <= 3, [r.getMessage() for r in gate_lines]
    assert "budget backend failed; refusing with 503" in gate_lines[0].getMessage()
    assert "budget counters (Redis) is unavailable" in gate_lines[0].getMessage()
    assert all(r.exc_info is None for r in gate_lines)
