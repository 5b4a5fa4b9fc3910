"""The demo's identity step: a call with `orq.identity`, then the identity listed with its metrics."""

from __future__ import annotations

from typing import Any

from orq_proxy.demo import ADMIN_KEY, USER_KEY, DemoRun, step_identities
from orq_proxy.testing.fake_upstream import FakeUpstream


def test_demo_identity_step(proxy_factory: Any, fake: FakeUpstream) -> None:
    """The step upserts `ada` and prints her 30-day figures (one request, some tokens)."""
    # The demo's app backend names its users (ada): explicitly "any", as `demo_config` has it.
    keys = [{"key": ADMIN_KEY, "admin": True}, {"key": USER_KEY, "owner": "alice", "identities": "any"}]
    app, server = proxy_factory({"api_keys": keys})
    lines: list[str] = []
    step_identities(DemoRun(proxy=app, url=server.url, fake=fake, out=lines.append))
    [row] = [line for line in lines if "ada (Ada Lovelace" in line]
    assert "1 requests" in row and "tags ['beta']" in row and " 0 tokens" not in row
