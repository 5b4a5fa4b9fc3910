"""The fake's Responses API against both SDKs: `orq_ai_sdk`'s `responses.create` and the `openai` types.

`orq.responses.create` goes through a real proxy on a socket (`/v3/router/responses`) to the fake. The fake's
own JSON and SSE events are also validated strictly with the `openai` SDK's and orq's pydantic models, so a
field that either SDK requires and the fake leaves out fails here, not in a user's client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from orq_ai_sdk import Orq
from orq_ai_sdk.models import CreateRouterResponseResponseBody, CreateRouterResponseResponsesResponseBody

from orq_proxy.testing.fake_upstream import build_fake_upstream
from orq_proxy.testing.servers import serve_in_thread

ANSWER = "The quick brown fox jumps over the lazy"
# Every field of a Response object that OpenAI returns on every answer, and `input`, which orq's SDK requires.
RESPONSE_FIELDS = {
    *("id", "object", "created_at", "status", "background", "completed_at", "error", "incomplete_details"),
    *("instructions", "max_output_tokens", "max_tool_calls", "model", "output", "parallel_tool_calls"),
    *("previous_response_id", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention"),
    *("reasoning", "safety_identifier", "service_tier", "store", "temperature", "text", "tool_choice"),
    *("tools", "top_logprobs", "top_p", "truncation", "usage", "user", "metadata", "frequency_penalty"),
    *("presence_penalty", "input"),
}
# (extra request fields, x-fake-* headers): plain, capped, no usage, every detail and echoed parameter.
CASES = [
    pytest.param({}, {}, id="plain"),
    pytest.param({"max_output_tokens": 2}, {}, id="capped"),
    pytest.param({}, {"x-fake-omit-usage": "1"}, id="omit-usage"),
    pytest.param(
        {
            "instructions": "be nice",
            "temperature": 0.5,
            "top_p": 0.9,
            "metadata": {"k": "v"},
            "prompt_cache_key": "pck",
            "safety_identifier": "user-1",
            "input": [{"role": "user", "content": "a b c"}],
        },
        {"x-fake-cached-tokens": "3", "x-fake-reasoning-tokens": "2"},
        id="details",
    ),
]
_OPENAI_EVENT = pydantic.TypeAdapter[Any](ResponseStreamEvent)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(build_fake_upstream(record=False)) as server:
        yield server.url + "/v1"


@pytest.fixture(scope="module")
def orq(module_proxy_factory: Any) -> Iterator[Orq]:
    """orq's SDK on a real proxy in front of the session's fake upstream."""
    _, server = module_proxy_factory()
    with Orq(api_key="k", server_url=server.url, timeout_ms=10_000) as client:
        yield client


def required(model: type[pydantic.BaseModel]) -> set[str]:
    return {name for name, info in model.model_fields.items() if info.is_required()}


def stream_events(base_url: str, body: dict[str, Any], headers: dict[str, str]) -> list[dict[str, Any]]:
    """The fake's SSE events for `body`, each checked against its `event:` line."""
    raw = httpx.post(base_url + "/responses", json={**body, "stream": True}, headers=headers).text
    events = []
    for block in raw.split("\n\n")[:-1]:
        kind, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == "event: " + event["type"]
        events.append(event)
    return events


# --- orq_ai_sdk through the proxy -------------------------------------------------------------------


def test_orq_sdk_parses_responses_json(orq: Orq) -> None:
    """`orq.responses.create` parses the answer: output text and every usage number."""
    result = orq.responses.create(
        model="openai/gpt-4o",
        input="two words",
        instructions="be nice",
        http_headers={"x-fake-cached-tokens": "3", "x-fake-reasoning-tokens": "5"},
    )
    assert isinstance(result, CreateRouterResponseResponseBody)
    assert (result.object, result.status, result.incomplete_details) == ("response", "completed", None)
    assert result.completed_at is not None and result.completed_at >= result.created_at
    [message] = result.output or []
    assert message["content"][0]["text"] == ANSWER
    assert result.instructions == "be nice"
    usage = result.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == ((2 + 4) + (2 + 4), 8 + 5, 25)
    assert usage.input_tokens_details.cached_tokens == 3
    assert usage.output_tokens_details.reasoning_tokens == 5


def test_orq_sdk_parses_every_stream_event(orq: Orq) -> None:
    """With `stream=True` every event parses, numbered in order, and the last one carries the usage."""
    with orq.responses.create(model="openai/gpt-4o", input="a b c", stream=True) as stream:
        events = [item.data for item in stream]
    assert all(event is not None for event in events)
    kinds = [event.type for event in events if event is not None]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 8,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events if event is not None] == list(range(len(events)))
    deltas = [e.delta for e in events if e is not None and e.type == "response.output_text.delta"]
    assert "".join(deltas) == ANSWER
    first, last = events[0], events[-1]
    assert first is not None and first.type == "response.created"
    assert (first.response.status, first.response.usage, first.response.output) == ("in_progress", None, [])
    assert last is not None and last.type == "response.completed"
    assert last.response.status == "completed"
    assert last.response.usage is not None
    assert (last.response.usage.input_tokens, last.response.usage.output_tokens) == (3 + 4, 8)
    assert last.response.usage.total_tokens == 15


def test_orq_sdk_parses_a_capped_stream(orq: Orq) -> None:
    """`max_output_tokens` ends the stream in `response.incomplete`, which orq's SDK parses."""
    with orq.responses.create(model="openai/gpt-4o", input="x", stream=True, max_output_tokens=2) as stream:
        events = [item.data for item in stream]
    last = events[-1]
    assert last is not None and last.type == "response.incomplete"
    assert last.response.status == "incomplete" and last.response.completed_at is None
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.usage is not None and last.response.usage.output_tokens == 2


# --- the fake's own output, validated strictly -------------------------------------------------------


@pytest.mark.parametrize(("extra", "headers"), CASES)
def test_json_has_every_field_both_sdks_require(
    base_url: str, extra: dict[str, Any], headers: dict[str, str]
) -> None:
    """The JSON answer has OpenAI's full field set and validates strictly against both SDKs' models."""
    body = {"model": "gpt-4.1", "input": "hello there", **extra}
    data = httpx.post(base_url + "/responses", json=body, headers=headers).json()
    expected = RESPONSE_FIELDS | required(Response) | required(CreateRouterResponseResponseBody)
    missing = expected - data.keys()
    assert not missing
    parsed = Response.model_validate(data, strict=True)
    CreateRouterResponseResponseBody.model_validate(data, strict=True)
    assert parsed.model == "gpt-4.1"
    assert parsed.status == ("incomplete" if "max_output_tokens" in extra else "completed")
    if "x-fake-omit-usage" in headers:
        assert parsed.usage is None
    else:
        assert parsed.usage is not None
        assert parsed.usage.input_tokens_details.cached_tokens == int(headers.get("x-fake-cached-tokens", 0))
        assert parsed.usage.input_tokens_details.cache_write_tokens == 0
    for name in ("instructions", "temperature", "top_p", "metadata", "prompt_cache_key", "safety_identifier"):
        if name in extra:
            assert data[name] == extra[name]


@pytest.mark.parametrize(("extra", "headers"), CASES)
def test_every_stream_event_validates_strictly(
    base_url: str, extra: dict[str, Any], headers: dict[str, str]
) -> None:
    """Each SSE event validates strictly as the openai SDK's event union and orq's, numbered from 0."""
    events = stream_events(base_url, {"model": "gpt-4.1", "input": "hello there", **extra}, headers)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        parsed = _OPENAI_EVENT.validate_python(event, strict=True)
        assert parsed.type == event["type"]
        orq_event = CreateRouterResponseResponsesResponseBody.model_validate({"data": event}, strict=True)
        assert orq_event.data is not None and orq_event.data.type == event["type"]
        if "response" in event:
            assert not RESPONSE_FIELDS - event["response"].keys()
    final = events[-1]["response"]
    assert final["status"] == ("incomplete" if "max_output_tokens" in extra else "completed")
    assert (final["usage"] is None) == ("x-fake-omit-usage" in headers)
