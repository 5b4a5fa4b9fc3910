"""Azure OpenAI both ways, through the real proxy on a socket and the fake upstream's Azure layout.

Outgoing: an OpenAI-style call for `azure/<model>` goes to `{base_url}/openai/deployments/{deployment}/...`
with `api-version` and `api-key`, priced as the model the deployment maps from; Azure's stream shapes (a
first chunk without choices, content-filter chunks without a delta) are metered exactly. Incoming: what
`openai.AzureOpenAI(azure_endpoint=<proxy>)` sends is accepted (key in `api-key`) and metered. Then one
report grouped by provider and model across OpenAI, Anthropic and Azure calls.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import openai
import pytest
from genai_prices import Usage, calc_price
from orq_ai_sdk import Orq

from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.fake_upstream import FakeUpstream, RecordedRequest
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.money import usd_to_nanos
from tests.waiting import wait_for

UPSTREAM_KEY = "sk-upstream-secret"
ADMIN, USER = "sk-admin", "sk-user"
KEYS = [
    {"key": ADMIN, "workspace": "ws", "admin": True, "id": "admin"},
    {"key": USER, "workspace": "ws", "id": "user_key"},
]
API_VERSION = "2024-10-21"
MESSAGES: list[Any] = [{"role": "user", "content": "say something nice about accountants"}]


def config(root: str) -> dict[str, Any]:
    return {
        "upstreams": {
            "openai": {"base_url": root + "/v1", "api_key": UPSTREAM_KEY, "default": True},
            "azure": {
                "base_url": root,
                "api": "azure",
                "api_version": API_VERSION,
                "deployments": {"gpt-4o-mini": "prod-4o-mini"},
                "api_key": UPSTREAM_KEY,
            },
            "anthropic": {"base_url": root, "api": "anthropic", "api_key": UPSTREAM_KEY},
        },
        "api_keys": KEYS,
    }


@pytest.fixture
def proxy(proxy_factory: Any, fake: FakeUpstream, fake_server: tuple[FakeUpstream, ServerThread]) -> Any:
    sink = MemorySink()
    _, server = proxy_factory(config(fake_server[1].url), sinks=[sink])
    return server, sink


def wait_events(sink: MemorySink, n: int) -> list[UsageEvent]:
    wait_for(lambda: len(sink.events) >= n, what=f"{n} usage events")
    return list(sink.events)


def last(fake: FakeUpstream) -> RecordedRequest:
    assert fake.requests
    return fake.requests[-1]


def nanos(provider: str, model: str, prompt: int, completion: int) -> tuple[int, int]:
    price = calc_price(Usage(input_tokens=prompt, output_tokens=completion), model, provider_id=provider)
    return usd_to_nanos(price.input_price), usd_to_nanos(price.output_price)


def openai_client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0)


def azure_client(server: ServerThread, **kwargs: Any) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=server.url,
        api_key=kwargs.pop("api_key", USER),
        api_version="2024-06-01",
        max_retries=0,
        **kwargs,
    )


def test_outgoing_call_goes_to_the_deployment_with_api_key_and_version(
    proxy: Any, fake: FakeUpstream
) -> None:
    server, sink = proxy
    with openai_client(server) as client:
        out = client.chat.completions.create(model="azure/gpt-4o-mini", messages=MESSAGES)
    assert out.usage is not None
    sent = last(fake)
    assert sent.path == "/openai/deployments/prod-4o-mini/chat/completions"
    assert sent.query == f"api-version={API_VERSION}"
    assert sent.headers["api-key"] == UPSTREAM_KEY and "authorization" not in sent.headers
    [event] = wait_events(sink, 1)
    assert (event.provider, event.model, event.status) == ("azure", "azure/gpt-4o-mini", "OK")
    assert (event.input_tokens, event.output_tokens) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    expected = nanos("azure", "gpt-4o-mini", out.usage.prompt_tokens, out.usage.completion_tokens)
    assert (event.input_cost_nanos, event.output_cost_nanos) == expected and sum(expected) > 0


def test_unmapped_model_goes_to_the_deployment_of_its_name(proxy: Any, fake: FakeUpstream) -> None:
    server, sink = proxy
    with openai_client(server) as client:
        client.embeddings.create(model="azure/text-embedding-3-small", input="hello azure")
    sent = last(fake)
    assert sent.path == "/openai/deployments/text-embedding-3-small/embeddings"
    [event] = wait_events(sink, 1)
    assert event.product == "embeddings" and event.input_tokens > 0


@pytest.mark.parametrize("include_usage", [False, True])
def test_azure_stream_shapes_are_metered_exactly(proxy: Any, fake: FakeUpstream, include_usage: bool) -> None:
    """Azure opens with a chunk that has no choices and sends content-filter chunks without a delta: the
    client gets them as Azure sent them (the usage the proxy asked for stays hidden), the event is exact."""
    server, sink = proxy
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    with openai_client(server) as client:
        chunks = list(
            client.chat.completions.create(
                model="azure/gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-fake-words": "5", "x-fake-azure-filter-chunks": "1"},
                **options,
            )
        )
    assert chunks[0].choices == []  # Azure's prompt-filter chunk, passed through
    deltas = [getattr(c.choices[0], "delta", None) for c in chunks if c.choices]
    assert None in deltas  # the content-filter chunk, which has no delta
    text = "".join(d.content or "" for d in deltas if d is not None)
    assert len(text.split()) == 5
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == (1 if include_usage else 0)
    [event] = wait_events(sink, 1)
    assert event.usage_source == "exact" and event.output_tokens == 5 and event.stream
    if include_usage:
        assert (event.input_tokens, event.output_tokens) == (
            usages[0].prompt_tokens,
            usages[0].completion_tokens,
        )


def test_incoming_azure_paths_are_accepted_and_metered(proxy: Any, fake: FakeUpstream) -> None:
    """`AzureOpenAI(azure_endpoint=<proxy>)`: the key in `api-key`, the model in the path. A deployment an
    azure upstream maps goes there (with that upstream's api-version, not the client's); any other name is
    the model, routed as usual (here to the default OpenAI upstream, without the Azure query)."""
    server, sink = proxy
    with azure_client(server) as client:
        plain = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        plain_sent = last(fake)
        embedded = client.embeddings.create(model="text-embedding-3-small", input="hello")
    with azure_client(server, azure_deployment="prod-4o-mini") as client:
        mapped = client.chat.completions.create(model="ignored-by-azure", messages=MESSAGES)
        mapped_sent = last(fake)
    assert plain.usage is not None and mapped.usage is not None and embedded.usage is not None
    assert (plain_sent.path, plain_sent.query) == ("/v1/chat/completions", "")
    assert plain_sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert mapped_sent.path == "/openai/deployments/prod-4o-mini/chat/completions"
    assert mapped_sent.query == f"api-version={API_VERSION}"
    assert mapped_sent.json["model"] == "gpt-4o-mini"
    events = wait_events(sink, 3)
    assert [(e.provider, e.model, e.product) for e in events] == [
        ("openai", "openai/gpt-4o-mini", "chat.completions"),
        ("openai", "openai/text-embedding-3-small", "embeddings"),
        ("azure", "azure/gpt-4o-mini", "chat.completions"),
    ]
    assert all(e.api_key_id == "user_key" and e.total_cost_nanos > 0 for e in events)
    assert events[2].input_cost_nanos == nanos("azure", "gpt-4o-mini", mapped.usage.prompt_tokens, 0)[0]


def test_incoming_azure_wrong_key_is_401(proxy: Any, fake: FakeUpstream) -> None:
    server, _ = proxy
    with (
        azure_client(server, api_key="sk-wrong") as client,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.code == "invalid_api_key"
    assert not fake.requests


def test_report_groups_openai_anthropic_and_azure(proxy: Any, fake: FakeUpstream) -> None:
    """One report by provider and model covers the three wire formats, with their costs."""
    server, sink = proxy
    with openai_client(server) as client:
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
        client.chat.completions.create(model="azure/gpt-4o-mini", messages=MESSAGES)
        client.chat.completions.create(model="azure/gpt-4o-mini", messages=MESSAGES)
    with anthropic.Anthropic(base_url=server.url, api_key=USER, max_retries=0) as c:
        c.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=MESSAGES)
    events = wait_events(sink, 4)
    cost_by_model: dict[str, int] = {}
    for e in events:
        cost_by_model[e.model or ""] = cost_by_model.get(e.model or "", 0) + e.total_cost_nanos
    now = datetime.now(UTC)
    window = {"from_": now - timedelta(hours=1), "to": now + timedelta(minutes=5)}
    deadline = time.monotonic() + 5
    with Orq(api_key=ADMIN, server_url=server.url, timeout_ms=10_000) as orq:
        while True:
            report = orq.reporting.query(
                metric="genai.requests", mode="scalar", group_by=["provider", "model"], **window
            )
            rows = {
                (r.dimensions["provider"], r.dimensions["model"]): r.metrics["genai.requests"]
                for r in report.data or []
            }
            if sum(rows.values()) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        cost = orq.reporting.query(metric="genai.cost", mode="scalar", group_by=["model"], **window)
    assert rows == {
        ("openai", "openai/gpt-4o-mini"): 1,
        ("azure", "azure/gpt-4o-mini"): 2,
        ("anthropic", "anthropic/claude-haiku-4-5"): 1,
    }
    reported = {r.dimensions["model"]: r.metrics["genai.cost"] for r in cost.data or []}
    assert reported.keys() == cost_by_model.keys()
    for model, total in cost_by_model.items():
        assert reported[model] == pytest.approx(total / 1e9, abs=1e-12) and total > 0
