"""The fake's Anthropic Messages API and Azure OpenAI layout, driven directly by the official SDKs.

`anthropic.Anthropic` / `AsyncAnthropic` (create, `messages.stream`, `count_tokens`) and
`openai.AzureOpenAI` (chat, streams, embeddings) talk to the fake on a socket. The fake's JSON and SSE
events are also validated with the `anthropic` SDK's pydantic models (`Message`, `RawMessageStreamEvent`,
`MessageTokensCount`), so a field the SDK requires and the fake leaves out fails here. Usage figures are
checked against the documented rule: words of every text + 4 per message (a system prompt is one more),
cache reads and writes carved out of that total.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pydantic
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent

from orq_proxy.testing.fake_upstream import FakeUpstream, build_fake_upstream
from orq_proxy.testing.servers import ServerThread, serve_in_thread

KEY = "sk-fake-upstream"
VERSION = "2023-06-01"
AZURE_VERSION = "2024-10-21"
MODEL = "claude-sonnet-4-5"
PROMPT: list[Any] = [{"role": "user", "content": "write a poem about budgets"}]  # 5 words + 4 = 9 tokens
ANSWER = "The quick brown fox jumps over the lazy"
_EVENT = pydantic.TypeAdapter[Any](RawMessageStreamEvent)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeUpstream, ServerThread]]:
    fake = build_fake_upstream(api_key=KEY, azure_models={"prod-4o-mini": "gpt-4o-mini-2024-07-18"})
    with serve_in_thread(fake) as server:
        yield fake, server


@pytest.fixture
def fake(served: tuple[FakeUpstream, ServerThread]) -> FakeUpstream:
    served[0].reset()
    return served[0]


@pytest.fixture
def url(served: tuple[FakeUpstream, ServerThread], fake: FakeUpstream) -> str:
    return served[1].url


def claude(url: str, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=kwargs.pop("api_key", KEY), max_retries=0, **kwargs)


def azure(url: str, **kwargs: Any) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=url,
        api_version=AZURE_VERSION,
        api_key=kwargs.pop("api_key", KEY),
        max_retries=0,
        **kwargs,
    )


def post_messages(url: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    sent = {"x-api-key": KEY, "anthropic-version": VERSION, **headers}
    return httpx.post(url + "/v1/messages", json=body, headers=sent)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each Anthropic SSE event, checking the framing as it goes."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == name_line[len("event: ") :]
        events.append((data["type"], data))
    return events


# --- Anthropic: the SDKs --------------------------------------------------------------------------------


def test_sync_create_parses_with_the_documented_usage(fake: FakeUpstream, url: str) -> None:
    """A system prompt (string) and block content count as the rule says; the SDK parses every field."""
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "one two"}, {"type": "image", "source": {}}]},
        {"role": "assistant", "content": "three"},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t", "content": "four five six"}],
        },
    ]
    with claude(url) as client:
        message = client.messages.create(
            model=MODEL,
            max_tokens=64,
            system="be brief",
            messages=messages,
            metadata={"user_id": "dev-1"},
            extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
        )
    assert (message.type, message.role, message.model, message.stop_reason) == (
        "message",
        "assistant",
        MODEL,
        "end_turn",
    )
    assert message.id.startswith("msg_") and message.stop_sequence is None
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", ANSWER)]
    usage = message.usage
    assert usage.input_tokens == (2 + 4) + (1 + 4) + (3 + 4) + (2 + 4)  # 3 messages + the system prompt
    assert (usage.output_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
        8,
        0,
        0,
    )
    assert usage.cache_creation is not None and usage.cache_creation.ephemeral_1h_input_tokens == 0
    assert usage.service_tier == "standard"
    [sent] = fake.requests
    assert (sent.api, sent.path, sent.json["metadata"]) == ("anthropic", "/v1/messages", {"user_id": "dev-1"})
    # The SDK sends its key as a bearer token (anthropic>=2) or as `x-api-key`: the fake takes either.
    assert KEY in (sent.headers.get("x-api-key"), sent.headers.get("authorization", "")[7:])
    assert sent.headers["anthropic-version"] == client.default_headers["anthropic-version"]
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"


@pytest.mark.parametrize(
    ("read", "write_5m", "write_1h", "expected"),
    [
        pytest.param(3, 2, 1, (3, 3, 2, 1), id="all-three"),  # of 9 prompt tokens: 3 left as input_tokens
        pytest.param(0, 0, 4, (5, 4, 0, 4), id="1h-only"),
        pytest.param(7, 5, 5, (0, 2, 2, 0), id="capped-by-the-prompt"),  # reads first, then 5m, then 1h
    ],
)
def test_cache_headers_carve_reads_and_writes_out_of_the_prompt(
    url: str, read: int, write_5m: int, write_1h: int, expected: tuple[int, int, int, int]
) -> None:
    """`input_tokens` excludes cache reads and writes; the three always add up to the whole prompt."""
    headers = {
        "x-fake-cache-read-tokens": str(read),
        "x-fake-cache-write-tokens": str(write_5m),
        "x-fake-cache-write-1h-tokens": str(write_1h),
    }
    with claude(url) as client:
        usage = client.messages.create(
            model=MODEL, max_tokens=8, messages=PROMPT, extra_headers=headers
        ).usage
    assert usage.cache_creation is not None
    got = (
        usage.input_tokens,
        usage.cache_creation_input_tokens,
        usage.cache_creation.ephemeral_5m_input_tokens,
        usage.cache_creation.ephemeral_1h_input_tokens,
    )
    assert got == expected
    assert (
        usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0)
        == 9
    )


def test_max_tokens_caps_the_answer(url: str) -> None:
    with claude(url) as client:
        message = client.messages.create(
            model=MODEL, max_tokens=3, messages=PROMPT, extra_headers={"x-fake-words": "20"}
        )
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)
    assert message.content[0].type == "text" and message.content[0].text == "The quick brown"


def test_stream_through_the_sdk_helper(url: str) -> None:
    """`messages.stream`: text deltas one per word; the final message has the running output count."""
    headers = {
        "x-fake-words": "5",
        "x-fake-cache-read-tokens": "2",
        "x-fake-model": "claude-sonnet-4-5-20250929",
    }
    with (
        claude(url) as client,
        client.messages.stream(model=MODEL, max_tokens=64, messages=PROMPT, extra_headers=headers) as stream,
    ):
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["The", " quick", " brown", " fox", " jumps"]
    assert final.model == "claude-sonnet-4-5-20250929" and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (
        7,
        2,
        5,
    )


async def test_async_client_create_stream_and_count_tokens(url: str) -> None:
    """`AsyncAnthropic`: create, a raw `stream=True` iteration, and `count_tokens` agree on the input."""
    async with anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0) as client:
        message = await client.messages.create(
            model=MODEL, max_tokens=16, system=[{"type": "text", "text": "hi"}], messages=PROMPT
        )
        counted = await client.messages.count_tokens(
            model=MODEL, system=[{"type": "text", "text": "hi"}], messages=PROMPT
        )
        kinds = [
            event.type
            async for event in await client.messages.create(
                model=MODEL, max_tokens=2, messages=PROMPT, stream=True
            )
        ]
    assert message.usage.input_tokens == counted.input_tokens == 9 + (1 + 4)
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK skips `ping`


def test_count_tokens_is_the_total_input_whatever_the_cache(fake: FakeUpstream, url: str) -> None:
    headers = {"x-fake-cache-read-tokens": "4", "x-fake-prompt-tokens": "chars"}
    with claude(url) as client:
        counted = client.messages.count_tokens(model=MODEL, messages=PROMPT, extra_headers=headers)
        usage = client.messages.create(
            model=MODEL, max_tokens=4, messages=PROMPT, extra_headers=headers
        ).usage
    chars = len("write a poem about budgets".replace(" ", ""))
    assert counted.input_tokens == chars + 4
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == counted.input_tokens
    assert fake.requests[0].path == "/v1/messages/count_tokens"


# --- Anthropic: the wire, strictly --------------------------------------------------------------------


def test_json_and_count_tokens_validate_against_the_sdk_models(url: str) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": PROMPT}
    message = Message.model_validate(post_messages(url, body).json())
    assert message.usage.cache_creation is not None
    response = httpx.post(
        url + "/v1/messages/count_tokens", json=body, headers={"x-api-key": KEY, "anthropic-version": VERSION}
    )
    assert MessageTokensCount.model_validate(response.json()).input_tokens == 9


@pytest.mark.parametrize("late", [False, True])
def test_stream_events_in_order_and_the_late_cache_split(url: str, late: bool) -> None:
    """Every event validates; `message_start` has the input usage with `output_tokens: 1`, `message_delta`
    repeats it with the cumulative output. With `x-fake-anthropic-late-usage` the TTL split is only late."""
    headers = {"x-fake-words": "3", "x-fake-cache-write-tokens": "1", "x-fake-cache-write-1h-tokens": "2"}
    if late:
        headers["x-fake-anthropic-late-usage"] = "1"
    response = post_messages(
        url, {"model": MODEL, "max_tokens": 8, "messages": PROMPT, "stream": True}, **headers
    )
    assert response.headers["content-type"].startswith("text/event-stream") and response.headers["request-id"]
    events = sse_events(response.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for name, data in events:
        if name != "ping":
            _EVENT.validate_python(data)
    start = events[0][1]["message"]
    assert (start["content"], start["stop_reason"]) == ([], None)
    split = {"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 2}
    input_usage = {"input_tokens": 6, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 0}
    assert start["usage"] == {
        **input_usage,
        **({} if late else {"cache_creation": split}),
        "output_tokens": 1,
        "service_tier": "standard",
    }
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {
        **input_usage,
        "output_tokens": 3,
        **({"cache_creation": split} if late else {}),
    }
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "The quick brown"


def test_omit_usage_leaves_no_usage_anywhere(url: str) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": PROMPT}
    assert "usage" not in post_messages(url, body, **{"x-fake-omit-usage": "1"}).json()
    events = sse_events(post_messages(url, {**body, "stream": True}, **{"x-fake-omit-usage": "1"}).text)
    assert "usage" not in events[0][1]["message"] and "usage" not in events[-2][1]
    assert [n for n, _ in events][-2:] == ["message_delta", "message_stop"]


def test_stream_error_event_ends_the_stream(url: str) -> None:
    """`x-fake-stream-error: N`: N text deltas, then Anthropic's `error` event, then a clean end; the SDK
    raises it as an API error."""
    body = {"model": MODEL, "max_tokens": 8, "messages": PROMPT, "stream": True}
    events = sse_events(post_messages(url, body, **{"x-fake-stream-error": "2"}).text)
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 2,
        "error",
    ]
    assert events[-1][1]["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    with claude(url) as client, pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        for _ in client.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=PROMPT,
            stream=True,
            extra_headers={"x-fake-stream-error": "1"},
        ):
            pass


def test_disconnect_after_breaks_the_stream(url: str) -> None:
    """`x-fake-disconnect-after: N`: N events, then the connection drops mid-body."""
    with (
        claude(url) as client,
        pytest.raises(Exception, match=r"incomplete chunked read|peer closed"),  # the SDK's own httpx
        client.messages.stream(
            model=MODEL, max_tokens=64, messages=PROMPT, extra_headers={"x-fake-disconnect-after": "4"}
        ) as stream,
    ):
        for _ in stream:
            pass


@pytest.mark.parametrize(
    ("status", "error_type", "exception"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (529, "overloaded_error", anthropic.InternalServerError),
    ],
)
def test_fake_status_in_anthropics_error_shape(
    url: str, status: int, error_type: str, exception: type[Exception]
) -> None:
    with claude(url) as client, pytest.raises(exception) as raised:
        client.messages.create(
            model=MODEL, max_tokens=8, messages=PROMPT, extra_headers={"x-fake-status": str(status)}
        )
    error: Any = raised.value
    assert error.status_code == status and error.body["type"] == "error"
    assert error.body["error"]["type"] == error_type and error.body["request_id"].startswith("req_")
    assert error.request_id == error.body["request_id"]  # the `request-id` header


@pytest.mark.parametrize(
    ("headers", "body", "status", "error_type", "message"),
    [
        pytest.param(
            {"x-api-key": "wrong"}, {}, 401, "authentication_error", "invalid x-api-key", id="wrong-key"
        ),
        pytest.param(
            {"x-api-key": None}, {}, 401, "authentication_error", "x-api-key header is required", id="no-key"
        ),
        pytest.param({"x-api-key": None, "authorization": f"Bearer {KEY}"}, {}, 200, "", "", id="bearer-key"),
        pytest.param(
            {"anthropic-version": None},
            {},
            400,
            "invalid_request_error",
            "anthropic-version",
            id="no-version",
        ),
        pytest.param(
            {}, {"max_tokens": None}, 400, "invalid_request_error", "max_tokens: Field required", id="no-max"
        ),
        pytest.param({}, {"max_tokens": 0}, 400, "invalid_request_error", "max_tokens", id="zero-max"),
        pytest.param({}, {"max_tokens": True}, 400, "invalid_request_error", "max_tokens", id="bool-max"),
        pytest.param(
            {}, {"model": None}, 400, "invalid_request_error", "model: Field required", id="no-model"
        ),
        pytest.param(
            {}, {"messages": []}, 400, "invalid_request_error", "at least one message", id="no-messages"
        ),
    ],
)
def test_anthropic_refusals(
    url: str, headers: dict[str, str | None], body: dict[str, Any], status: int, error_type: str, message: str
) -> None:
    sent = {
        k: v for k, v in {"x-api-key": KEY, "anthropic-version": VERSION, **headers}.items() if v is not None
    }
    payload = {
        k: v
        for k, v in {"model": MODEL, "max_tokens": 8, "messages": PROMPT, **body}.items()
        if v is not None
    }
    response = httpx.post(url + "/v1/messages", json=payload, headers=sent)
    assert response.status_code == status
    if status == 200:
        assert response.json()["type"] == "message"
        return
    error = response.json()
    assert (
        error["type"] == "error"
        and error["error"]["type"] == error_type
        and message in error["error"]["message"]
    )


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/v1/messages/batches", {}),
        ("GET", "/v1/messages", {}),
        (
            "POST",
            "/v1/complete",
            {"anthropic-version": VERSION},
        ),  # no such route: Anthropic's 404 all the same
    ],
)
def test_unknown_anthropic_paths_are_not_found_error(
    url: str, method: str, path: str, headers: dict[str, str]
) -> None:
    response = httpx.request(method, url + path, json={}, headers=headers)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


# --- Azure OpenAI ---------------------------------------------------------------------------------------


def test_azure_chat_json_with_filter_results_and_the_deployments_model(fake: FakeUpstream, url: str) -> None:
    """The deployment decides the model (`azure_models`), whatever the body says; the request is recorded
    with its deployment and api-version; the answer carries Azure's filter results."""
    with azure(url, azure_deployment="prod-4o-mini") as client:
        out = client.chat.completions.create(model="ignored", messages=PROMPT)
    assert out.model == "gpt-4o-mini-2024-07-18" and out.choices[0].message.content == ANSWER
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (9, 8)
    raw = out.model_dump()
    assert raw["prompt_filter_results"][0]["content_filter_results"]["jailbreak"] == {
        "filtered": False,
        "detected": False,
    }
    assert raw["choices"][0]["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}
    [sent] = fake.requests
    assert (sent.api, sent.deployment, sent.api_version) == ("azure", "prod-4o-mini", AZURE_VERSION)
    assert (sent.path, sent.query) == (
        "/openai/deployments/prod-4o-mini/chat/completions",
        f"api-version={AZURE_VERSION}",
    )
    assert sent.headers["api-key"] == KEY and "authorization" not in sent.headers


def test_azure_without_a_model_in_the_body_echoes_the_deployment(url: str) -> None:
    response = httpx.post(
        url + f"/openai/deployments/unmapped/chat/completions?api-version={AZURE_VERSION}",
        json={"messages": PROMPT},
        headers={"api-key": KEY},
    )
    assert response.status_code == 200 and response.json()["model"] == "unmapped"


@pytest.mark.parametrize("include_usage", [False, True])
def test_azure_chat_stream_shapes(url: str, include_usage: bool) -> None:
    """The first chunk has no choices (prompt filter results, model ""); a content-filter chunk without a
    `delta` follows the finish chunk; the usage chunk (when asked for) is last."""
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    with azure(url) as client:
        chunks = list(
            client.chat.completions.create(
                model="prod-4o-mini",
                messages=PROMPT,
                stream=True,
                extra_headers={"x-fake-words": "3"},
                **options,
            )
        )
    first, *rest = chunks
    assert first.choices == [] and first.model == "" and first.model_dump()["prompt_filter_results"]
    with_choices = [c for c in rest if c.choices]
    assert (
        "".join(c.choices[0].delta.content or "" for c in with_choices if c.choices[0].delta)
        == "The quick brown"
    )
    assert {c.model for c in with_choices[:-1]} == {"gpt-4o-mini-2024-07-18"}
    annotation = with_choices[-1]
    assert annotation.model == "" and getattr(annotation.choices[0], "delta", None) is None
    assert annotation.model_dump()["choices"][0]["content_filter_offsets"]["end_offset"] == len(
        "The quick brown"
    )
    assert with_choices[-2].choices[0].finish_reason == "stop"
    usages = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and usages == [chunks[-1].usage]
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (9, 3)
    else:
        assert usages == []


def test_azure_filter_chunks_can_be_turned_off(url: str) -> None:
    with azure(url) as client:
        chunks = list(
            client.chat.completions.create(
                model="d", messages=PROMPT, stream=True, extra_headers={"x-fake-azure-filter-chunks": "0"}
            )
        )
    assert chunks[0].choices == []  # the prompt-filter chunk stays: every Azure stream opens with it
    assert all(getattr(c.choices[0], "delta", None) is not None for c in chunks[1:])


def test_azure_embeddings_and_legacy_completions(fake: FakeUpstream, url: str) -> None:
    with azure(url) as client:
        embedded = client.embeddings.create(model="emb-deployment", input="hello azure world")
        completed = client.completions.create(model="instruct", prompt="one two", max_tokens=2)
    assert embedded.model == "emb-deployment" and embedded.usage.prompt_tokens == 3
    assert len(embedded.data[0].embedding) == 16
    assert completed.choices[0].text == "The quick" and completed.choices[0].finish_reason == "length"
    assert completed.model_dump()["choices"][0]["content_filter_results"]
    assert [r.path for r in fake.requests] == [
        "/openai/deployments/emb-deployment/embeddings",
        "/openai/deployments/instruct/completions",
    ]


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        pytest.param(
            f"chat/completions?api-version={AZURE_VERSION}", {"api-key": "wrong"}, 401, "401", id="wrong-key"
        ),
        pytest.param(f"chat/completions?api-version={AZURE_VERSION}", {}, 401, "401", id="no-key"),
        pytest.param(
            f"chat/completions?api-version={AZURE_VERSION}",
            {"authorization": f"Bearer {KEY}"},
            401,
            "401",
            id="bearer",
        ),
        pytest.param("chat/completions", {"api-key": KEY}, 404, "404", id="no-version"),  # as Azure answers
        pytest.param(
            "chat/completions?api-version=latest", {"api-key": KEY}, 400, "BadRequest", id="bad-version"
        ),
        pytest.param(
            f"images/generations?api-version={AZURE_VERSION}", {"api-key": KEY}, 404, "404", id="no-route"
        ),
        pytest.param(
            f"chat/completions?api-version={AZURE_VERSION}",
            {"api-key": KEY, "x-fake-status": "429"},
            429,
            "429",
            id="fake-status",
        ),
    ],
)
def test_azure_refusals_in_azures_shape(
    fake: FakeUpstream, url: str, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    response = httpx.post(
        url + "/openai/deployments/prod-4o-mini/" + path, json={"messages": PROMPT}, headers=headers
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if status == 401:
        assert error["message"].startswith("Access denied due to invalid subscription key")
    assert fake.requests[-1].api == "azure"


def test_azure_sdk_wrong_key_is_an_authentication_error(url: str) -> None:
    with azure(url, api_key="wrong") as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="d", messages=PROMPT)


@pytest.mark.parametrize(
    ("path", "headers", "content", "message"),
    [
        pytest.param(
            "/v1/messages", {"x-fake-words": "many"}, b"{}", "x-fake-words", id="anthropic-bad-knob"
        ),
        pytest.param("/v1/messages", {}, b"not json", "not valid JSON", id="anthropic-not-json"),
        pytest.param(
            f"/openai/deployments/d/chat/completions?api-version={AZURE_VERSION}",
            {"x-fake-words": "-1"},
            b"{}",
            "x-fake-words",
            id="azure-bad-knob",
        ),
        pytest.param(
            f"/openai/deployments/d/chat/completions?api-version={AZURE_VERSION}",
            {},
            b"[1, 2]",
            "JSON object",
            id="azure-not-an-object",
        ),
    ],
)
def test_bad_requests_are_400_in_each_apis_shape(
    url: str, path: str, headers: dict[str, str], content: bytes, message: str
) -> None:
    sent = {"x-api-key": KEY, "api-key": KEY, "anthropic-version": VERSION, **headers}
    response = httpx.post(url + path, content=content, headers=sent)
    assert response.status_code == 400
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and message in body["error"]["message"]
    else:
        assert body["error"]["code"] == "BadRequest" and message in body["error"]["message"]
