"""The fake upstream, through the real `openai` SDK on a real socket: every shape parses, every knob works."""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from orq_proxy.testing.fake_upstream import FakeUpstream, build_fake_upstream
from orq_proxy.testing.servers import ServerThread, serve_in_thread

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hello there fake"}]},
]
PROMPT_TOKENS = (2 + 4) + (3 + 4)  # words + 4 per message
ANSWER = "The quick brown fox jumps over the lazy"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeUpstream, ServerThread]]:
    fake = build_fake_upstream()
    with serve_in_thread(fake) as server:
        yield fake, server


@pytest.fixture
def fake(served: tuple[FakeUpstream, ServerThread]) -> FakeUpstream:
    served[0].reset()
    return served[0]


@pytest.fixture
def base_url(served: tuple[FakeUpstream, ServerThread]) -> str:
    return served[1].url + "/v1"


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0)


def sse_data(raw: str) -> list[str]:
    """The `data:` payloads of a raw SSE body, in order."""
    return [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]


# --- chat completions -------------------------------------------------------------------------------


def test_chat_json_shape_usage_and_recording(client: openai.OpenAI, fake: FakeUpstream) -> None:
    """A JSON chat completion parses, echoes the model, counts tokens by the rule and is recorded."""
    result = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Tag": "a"}
    )
    assert result.object == "chat.completion"
    assert result.model == "gpt-4o-mini"
    assert result.choices[0].message.content == ANSWER
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (PROMPT_TOKENS, 8)
    assert result.usage.total_tokens == PROMPT_TOKENS + 8
    assert result.usage.prompt_tokens_details and result.usage.prompt_tokens_details.cached_tokens == 0
    assert result.usage.completion_tokens_details
    assert result.usage.completion_tokens_details.reasoning_tokens == 0
    [seen] = fake.requests
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["x-tag"] == "a"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.json["messages"] == MESSAGES
    assert json.loads(seen.body) == seen.json


def test_chat_stream_without_include_usage_has_no_usage_anywhere(
    client: openai.OpenAI, base_url: str
) -> None:
    """Without include_usage: role chunk, one chunk per word, finish chunk, [DONE]; no `usage` key at all."""
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert len(chunks) == 1 + 8 + 1
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    raw = httpx.post(
        base_url + "/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    data = sse_data(raw.text)
    assert data[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in data[:-1])
    assert raw.text.endswith("data: [DONE]\n\n")


def test_chat_stream_with_include_usage_sends_usage_chunk(client: openai.OpenAI, base_url: str) -> None:
    """With include_usage: every chunk has `usage: null` except a final `choices: []` chunk with the usage."""
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    data = sse_data(httpx.post(base_url + "/chat/completions", json=body).text)
    parsed = [json.loads(d) for d in data[:-1]]
    assert all(p["usage"] is None for p in parsed[:-1])
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["total_tokens"] == PROMPT_TOKENS + 8


async def test_async_chat_json_and_stream(aclient: openai.AsyncOpenAI) -> None:
    """The async client parses both shapes too."""
    async with aclient:
        result = await aclient.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert result.choices[0].message.content == ANSWER
        stream = await aclient.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text == ANSWER
        assert usage is not None and usage.completion_tokens == 8


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
def test_chat_max_tokens_caps_the_answer(client: openai.OpenAI, cap_field: str) -> None:
    """A max-tokens cap below the answer length cuts it and reports finish_reason=length."""
    result = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **{cap_field: 3})  # type: ignore[call-overload]
    assert result.choices[0].message.content == "The quick brown"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 3


# --- responses API ----------------------------------------------------------------------------------


def test_responses_json(client: openai.OpenAI) -> None:
    """A Responses API answer parses, with input/output usage and their details."""
    result = client.responses.create(
        model="gpt-4.1",
        input="two words",
        instructions="be nice",
        extra_headers={"x-fake-cached-tokens": "3", "x-fake-reasoning-tokens": "5"},
    )
    assert result.status == "completed"
    assert result.model == "gpt-4.1"
    assert result.output_text == ANSWER
    assert result.usage is not None
    assert result.usage.input_tokens == (2 + 4) + (2 + 4)
    assert result.usage.output_tokens == 8 + 5
    assert result.usage.total_tokens == 12 + 13
    assert result.usage.input_tokens_details.cached_tokens == 3
    assert result.usage.output_tokens_details.reasoning_tokens == 5


def test_responses_stream_events_and_final_usage(client: openai.OpenAI) -> None:
    """The SSE event sequence runs from response.created to response.completed with usage."""
    with client.responses.stream(model="gpt-4.1", input=[{"role": "user", "content": "a b c"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds.count("response.output_text.delta") == 8
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.output_text == ANSWER
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (7, 8)


async def test_async_responses_stream_capped(aclient: openai.AsyncOpenAI) -> None:
    """max_output_tokens cuts the stream short and it ends in response.incomplete."""
    async with aclient:
        stream = await aclient.responses.create(model="gpt-4.1", input="x", stream=True, max_output_tokens=2)
        events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details is not None
    assert events[-1].response.usage is not None and events[-1].response.usage.output_tokens == 2
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "The quick"


# --- embeddings, legacy completions, models ---------------------------------------------------------


@pytest.mark.parametrize("encoding", ["base64", "float", None])
def test_embeddings(client: openai.OpenAI, encoding: str | None) -> None:
    """Embeddings parse in base64 (the SDK default, decoded by it) and float form, with prompt-only usage."""
    kwargs = {} if encoding is None else {"encoding_format": encoding}
    result = client.embeddings.create(
        model="text-embedding-3-small",
        input=["one two", "three"],
        dimensions=4,
        **kwargs,  # type: ignore[arg-type]
    )
    assert [d.index for d in result.data] == [0, 1]
    vectors: list[list[float]] = [
        list(struct.unpack("<4f", base64.b64decode(d.embedding)))
        if isinstance(d.embedding, str)
        else d.embedding
        for d in result.data
    ]
    assert (encoding == "base64") == isinstance(result.data[0].embedding, str)
    assert all(len(v) == 4 for v in vectors)
    assert vectors[0] != vectors[1]
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (3, 3)


def test_embeddings_base64_equals_float(client: openai.OpenAI) -> None:
    """The base64 vector decodes to exactly the float vector."""
    floats = client.embeddings.create(model="e", input="same text", encoding_format="float")
    decoded = client.embeddings.create(model="e", input="same text")
    assert floats.data[0].embedding == decoded.data[0].embedding


def test_legacy_completions_json_and_stream(client: openai.OpenAI) -> None:
    """Legacy completions parse as JSON and as a stream with the include_usage chunk."""
    result = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say three words")
    assert result.choices[0].text == ANSWER
    assert result.usage is not None and (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 8)
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt=["a b", "c"],
            stream=True,
            max_tokens=2,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The quick"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 3


def test_models(client: openai.OpenAI) -> None:
    """GET /models lists models and GET /models/{id} returns one."""
    assert "gpt-4o" in [m.id for m in client.models.list()]
    assert client.models.retrieve("anything").id == "anything"


# --- control headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, openai.InternalServerError),
        (429, openai.RateLimitError),
        (400, openai.BadRequestError),
        (503, openai.InternalServerError),
    ],
)
def test_x_fake_status(client: openai.OpenAI, status: int, error: type[openai.APIStatusError]) -> None:
    """x-fake-status answers that status with an OpenAI-shaped error body the SDK maps."""
    with pytest.raises(error) as caught:
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"x-fake-status": str(status)}
        )
    assert caught.value.status_code == status
    body = caught.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_x_fake_words_and_omit_usage(client: openai.OpenAI) -> None:
    """x-fake-words sets the answer length; x-fake-omit-usage removes usage from JSON and streams."""
    result = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"x-fake-words": "30", "x-fake-omit-usage": "1"}
    )
    assert result.usage is None
    assert len((result.choices[0].message.content or "").split()) == 30
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-fake-omit-usage": "1", "x-fake-words": "70"},
        )
    )
    assert all(c.choices for c in chunks)
    assert len(chunks) == 1 + 70 + 1


@pytest.mark.parametrize("shape", ["openai", "litellm", "vllm-continuous", "on-finish"])
def test_x_fake_usage_chunk_shapes(client: openai.OpenAI, base_url: str, shape: str) -> None:
    """x-fake-usage-chunk puts a stream's usage where other servers do (the SDK parses each shape);
    without include_usage the stream is the default one."""
    headers = {"x-fake-usage-chunk": shape}
    body = {"model": "m", "messages": MESSAGES, "stream": True}

    def chunks(body: dict[str, Any], headers: dict[str, str]) -> list[dict[str, Any]]:
        data = sse_data(httpx.post(base_url + "/chat/completions", json=body, headers=headers).text)
        assert data[-1] == "[DONE]"
        return [{k: v for k, v in json.loads(d).items() if k not in ("id", "created")} for d in data[:-1]]

    assert chunks(body, headers) == chunks(body, {})
    parsed = chunks({**body, "stream_options": {"include_usage": True}}, headers)
    full = parsed[-1]["usage"]
    assert full["total_tokens"] == PROMPT_TOKENS + 8
    finish = [p for p in parsed if p["choices"] and p["choices"][0].get("finish_reason")]
    usages = [p.get("usage", "absent") for p in parsed]
    if shape == "openai":
        assert parsed[-1]["choices"] == [] and usages[:-1] == [None] * (len(parsed) - 1)
    elif shape == "litellm":
        assert parsed[-1]["choices"] == [{"index": 0, "delta": {}}]
        assert usages[:-1] == ["absent"] * (len(parsed) - 1)
    elif shape == "vllm-continuous":
        assert parsed[-1]["choices"] == [] and finish[0]["usage"] == full
        running = [u["completion_tokens"] for u in usages[:-2]]
        assert running == list(range(1 + 8))
    else:
        assert parsed[-1] is finish[0] and usages[:-1] == ["absent"] * (len(parsed) - 1)
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    text, usage = "", None
    for chunk in stream:
        text += "".join(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert text == ANSWER and usage is not None and usage.completion_tokens == 8


def test_x_fake_usage_chunk_unknown_shape_is_400(base_url: str) -> None:
    """An unknown usage-chunk shape is refused, naming the header and the shapes."""
    response = httpx.post(
        base_url + "/chat/completions",
        json={"model": "m", "messages": []},
        headers={"x-fake-usage-chunk": "mistral"},
    )
    assert response.status_code == 400
    assert "x-fake-usage-chunk must be one of openai, litellm" in response.json()["error"]["message"]


def test_cached_and_reasoning_tokens_in_chat(client: openai.OpenAI) -> None:
    """Cached tokens are capped by the prompt; reasoning tokens count in completion tokens."""
    result = client.chat.completions.create(
        model="o3-mini",
        messages=MESSAGES,
        extra_headers={"x-fake-cached-tokens": "1000", "x-fake-reasoning-tokens": "4"},
    )
    usage = result.usage
    assert usage is not None and usage.prompt_tokens_details and usage.completion_tokens_details
    assert usage.prompt_tokens_details.cached_tokens == PROMPT_TOKENS
    assert usage.completion_tokens_details.reasoning_tokens == 4
    assert usage.completion_tokens == 12


def test_x_fake_latency(client: openai.OpenAI) -> None:
    """x-fake-latency-ms delays the answer."""
    started = time.perf_counter()
    client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"x-fake-latency-ms": "120"}
    )
    assert time.perf_counter() - started >= 0.12


def test_x_fake_ttft_and_chunk_delay(base_url: str) -> None:
    """ttft delays the first event after the headers; chunk delay spaces the content events."""
    headers = {"x-fake-ttft-ms": "100", "x-fake-chunk-delay-ms": "40", "x-fake-words": "3"}
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    # Lower bounds from the moment the request was sent hold however late this thread reads the events.
    started = time.perf_counter()
    with httpx.stream("POST", base_url + "/chat/completions", json=body, headers=headers) as response:
        arrivals = [
            time.perf_counter() - started for line in response.iter_lines() if line.startswith("data: ")
        ]
    assert len(arrivals) == 1 + 3 + 1 + 1
    assert arrivals[0] >= 0.1
    assert arrivals[-1] >= 0.1 + 2 * 0.04  # two delays between three words
    no_delay = httpx.post(base_url + "/chat/completions", json=body, headers={"x-fake-words": "3"})
    assert no_delay.elapsed.total_seconds() < 0.1


def test_default_timing_knobs_apply() -> None:
    """Constructor latency applies to every request; negative values are refused."""
    fake = build_fake_upstream(latency=0.1)
    with serve_in_thread(fake) as server:
        started = time.perf_counter()
        httpx.get(server.url + "/v1/models")
        assert time.perf_counter() - started >= 0.1
    with pytest.raises(ValueError, match="latency"):
        build_fake_upstream(latency=-1)


@pytest.mark.parametrize("after", [0, 3])
def test_x_fake_disconnect_after_breaks_the_stream(client: openai.OpenAI, after: int) -> None:
    """After N events the connection drops: the SDK raises instead of ending cleanly."""
    received = []
    with pytest.raises(openai.APIConnectionError) as caught:
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-disconnect-after": str(after)},
        )
        for chunk in stream:
            received.append(chunk)
    # The SDK wraps the transport's RemoteProtocolError (its own httpx flavour, so match by name).
    assert type(caught.value.__cause__).__name__ == "RemoteProtocolError"
    assert len(received) == after


def test_disconnect_after_all_events_still_breaks(base_url: str) -> None:
    """Disconnecting after the very last event still leaves the body unterminated."""
    body = {"model": "m", "messages": MESSAGES, "stream": True, "x": 1}
    headers = {"x-fake-disconnect-after": str(1 + 8 + 1 + 1), "x-fake-words": "8"}
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(base_url + "/chat/completions", json=body, headers=headers)


def test_client_disconnect_is_recorded(base_url: str, fake: FakeUpstream) -> None:
    """A client leaving a slow stream stops it and marks the recorded request as disconnected."""
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    headers = {"x-fake-chunk-delay-ms": "200", "x-fake-words": "50"}
    with httpx.stream("POST", base_url + "/chat/completions", json=body, headers=headers) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 3
    while not fake.requests[-1].disconnected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.requests[-1].disconnected


def test_bad_control_header_is_400(base_url: str) -> None:
    """A non-integer control header is refused, naming the header."""
    response = httpx.post(
        base_url + "/chat/completions", json={"model": "m", "messages": []}, headers={"x-fake-words": "many"}
    )
    assert response.status_code == 400
    assert "x-fake-words" in response.json()["error"]["message"]


# --- errors and auth --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("POST", "/nope", b"{}", 404, "Invalid URL (POST /v1/nope)"),
        ("GET", "/chat/completions", b"", 404, "Invalid URL (GET /v1/chat/completions)"),
        ("POST", "/chat/completions", b"{not json", 400, "could not parse the JSON body"),
        ("POST", "/chat/completions", b'{"messages": []}', 400, "must provide a model"),
    ],
)
def test_error_answers(base_url: str, method: str, path: str, body: bytes, status: int, needle: str) -> None:
    """Unknown routes, bad JSON and a missing model get OpenAI-shaped errors."""
    response = httpx.request(method, base_url + path, content=body)
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


def test_api_key_enforced() -> None:
    """With api_key set, a wrong or missing bearer gets OpenAI's 401 bodies; the right one passes."""
    fake = build_fake_upstream(api_key="sk-right-key-123", record=False)
    with serve_in_thread(fake) as server:
        url = server.url + "/v1"
        with (
            openai.OpenAI(base_url=url, api_key="sk-wrong-key-999", max_retries=0) as wrong,
            pytest.raises(openai.AuthenticationError) as caught,
        ):
            wrong.models.list()
        assert caught.value.code == "invalid_api_key"
        assert "sk-" in caught.value.message and "wrong" not in caught.value.message
        missing = httpx.get(url + "/models")
        assert missing.status_code == 401
        assert "didn't provide an API key" in missing.json()["error"]["message"]
        with openai.OpenAI(base_url=url, api_key="sk-right-key-123", max_retries=0) as ok:
            assert ok.models.list().data
        assert fake.requests == []


def test_cli_serves_on_the_given_port() -> None:
    """`python -m orq_proxy.testing.fake_upstream --port P` serves the API and prints its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "orq_proxy.testing.fake_upstream", "--port", str(port), "--latency-ms", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        assert response.status_code == 200
        assert response.json()["object"] == "list"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
    assert f"http://127.0.0.1:{port}/v1" in output, output


def test_n_answers_that_many_choices_and_bills_them(client: openai.OpenAI) -> None:
    """`n` choices, each the same words; completion tokens count all of them (JSON and stream)."""
    answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, n=3, max_tokens=5)  # type: ignore[arg-type]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(
        c.finish_reason == "length" and c.message.content == "The quick brown fox jumps"
        for c in answer.choices
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 15
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,  # type: ignore[arg-type]
            n=2,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert texts == {0: "The quick brown", 1: "The quick brown"} and finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_best_of_bills_every_candidate(client: openai.OpenAI) -> None:
    """Legacy completions: `n` choices returned, `max(n, best_of)` generated and billed."""
    answer = client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=4, n=2, best_of=5
    )
    assert len(answer.choices) == 2 and answer.usage is not None and answer.usage.completion_tokens == 20


@pytest.mark.parametrize(
    ("rule", "tokens"),
    [("words", 2 + 4), ("chars", 8 + 4), ("bytes/1", 13 + 4), ("bytes/4", 4 + 4), ("BYTES/3", 5 + 4)],
)
def test_x_fake_prompt_tokens_rules(client: openai.OpenAI, rule: str, tokens: int) -> None:
    """`x-fake-prompt-tokens` picks how prompt tokens are counted: words, characters or bytes / N."""
    messages = [{"role": "user", "content": "预算 budget"}]  # 2 words, 8 non-space characters, 13 UTF-8 bytes
    answer = client.chat.completions.create(
        model="gpt-4o",
        messages=messages,  # type: ignore[arg-type]
        extra_headers={"x-fake-prompt-tokens": rule},
    )
    assert answer.usage is not None and answer.usage.prompt_tokens == tokens
    response = client.responses.create(
        model="gpt-4o", input="预算 budget", extra_headers={"x-fake-prompt-tokens": rule}
    )
    assert response.usage is not None and response.usage.input_tokens == tokens
    vector = client.embeddings.create(
        model="text-embedding-3-small", input="预算 budget", extra_headers={"x-fake-prompt-tokens": rule}
    )
    assert vector.usage.prompt_tokens == tokens - 4


@pytest.mark.parametrize("rule", ["bytes/0", "bytes/x", "tokens"])
def test_x_fake_prompt_tokens_bad_rule_is_400(base_url: str, rule: str) -> None:
    """An unknown counting rule is a 400 naming the header."""
    response = httpx.post(
        base_url + "/chat/completions",
        json={"model": "gpt-4o", "messages": []},
        headers={"x-fake-prompt-tokens": rule},
    )
    assert response.status_code == 400 and "x-fake-prompt-tokens" in response.json()["error"]["message"]


def test_x_fake_model_answers_as_another_model(client: openai.OpenAI) -> None:
    """`x-fake-model` names the model in the answer (an alias resolved upstream)."""
    answer = client.chat.completions.create(
        model="my-alias",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers={"x-fake-model": "gpt-4o"},
    )
    assert answer.model == "gpt-4o"
