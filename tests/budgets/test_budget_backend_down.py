"""A Redis that stops answering: the management API says 503 in orq's shape (not a 500), `/readyz` names
the backend, and both recover when Redis is back. The test runs its own `redis-server` on a free port (the
machine's Redis on 6379 is never stopped).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from orq_ai_sdk import Orq

from tests.budgets.conftest import OwnRedis


def test_redis_down_is_503_and_readyz_says_so(own_redis: OwnRedis, proxy_factory: Any) -> None:
    """GET /v2/budgets with Redis gone: 503 orq-shaped, naming the backend; /readyz 503 naming it too; a
    proxied call 503 `budget_unavailable`; all back to normal once Redis answers again."""
    _, server = proxy_factory({"storage": {"counters": own_redis.url}})
    with Orq(server_url=server.url, timeout_ms=10_000) as orq:
        orq.budgets.create(scope={"workspace": {}}, limits={"amount": 5.0})
        assert len(orq.budgets.list().data) == 1
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}

    own_redis.stop()
    listed = httpx.get(server.url + "/v2/budgets", timeout=30)
    assert listed.status_code == 503, listed.text
    body = listed.json()
    assert body["code"] == 14 and body["message"].startswith("budget counters (Redis) is unavailable")
    ready = httpx.get(server.url + "/readyz", timeout=30)
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable" and "budget counters (Redis)" in ready.json()["failing"]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "budget_unavailable"

        own_redis.start()  # same port, empty dataset
        assert httpx.get(server.url + "/readyz", timeout=30).json() == {"status": "ready"}
        assert httpx.get(server.url + "/v2/budgets", timeout=30).status_code == 200
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
