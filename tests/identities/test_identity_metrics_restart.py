"""include_metrics survives a restart when events are kept in a DuckDB file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
from orq_ai_sdk import Orq


def test_metrics_rebuilt_from_event_file(proxy_factory: Any, fake: Any, tmp_path: Path) -> None:
    """After a restart on the same event file, the 30-day figures equal those before it."""
    config = {"storage": {"events": f"duckdb:///{tmp_path / 'events.duckdb'}"}}
    _, server = proxy_factory(config)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as client:
        for _ in range(2):
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "one two three"}],
                extra_body={"orq": {"identity": {"id": "restart_user"}}},
            )
        _expect_error(client)
    with Orq(api_key="k", server_url=server.url) as orq:
        before = orq.identities.retrieve(id="restart_user", include_metrics=True).identity.metrics
    server.stop()
    assert before is not None and before.total_requests == 3 and before.error_rate > 0

    _, again = proxy_factory(config)
    with Orq(api_key="k", server_url=again.url) as orq:
        orq.identities.create(external_id="restart_user")  # records are in memory; events are on disk
        after = orq.identities.retrieve(id="restart_user", include_metrics=True).identity.metrics
    assert after is not None
    assert (after.total_requests, after.total_tokens, after.total_cost, after.error_rate) == (
        before.total_requests,
        before.total_tokens,
        before.total_cost,
        before.error_rate,
    )


def _expect_error(client: openai.OpenAI) -> None:
    try:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "one two three"}],
            extra_body={"orq": {"identity": {"id": "restart_user"}}},
            extra_headers={"x-fake-status": "500"},
        )
    except openai.InternalServerError:
        return
    raise AssertionError("the upstream error did not reach the client")
