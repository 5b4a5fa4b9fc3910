"""Usage taps: SSE and JSON, every shape of usage, lines split anywhere, junk, caps, and rewriting."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orq_proxy.metering.taps import JSONTap, ReportedUsage, SSETap, output_text_bytes, parse_usage
from orq_proxy.usage.pricing import TokenUsage

CHAT_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 1},
    "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 4},
}
CHAT_EXPECTED = ReportedUsage(TokenUsage(11, 7, 3, 2, 1, 4), 18)
RESPONSES_USAGE = {
    "input_tokens": 20,
    "input_tokens_details": {"cached_tokens": 5},
    "output_tokens": 9,
    "output_tokens_details": {"reasoning_tokens": 4},
    "total_tokens": 29,
}
RESPONSES_EXPECTED = ReportedUsage(TokenUsage(20, 9, 5, 4), 29)


def chunk(content: str | None = None, *, usage: Any = "absent", choices: Any = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o"}
    obj["choices"] = choices if choices is not None else [{"index": 0, "delta": {"content": content}}]
    if usage != "absent":
        obj["usage"] = usage
    return obj


def sse(*objs: Any, done: bool = True, eol: str = "\n") -> bytes:
    out = "".join(f"data: {json.dumps(o, separators=(',', ':'))}{eol}{eol}" for o in objs)
    if done:
        out += f"data: [DONE]{eol}{eol}"
    return out.encode()


CHAT_STREAM = sse(chunk("Hello"), chunk(" world"), chunk(choices=[], usage=CHAT_USAGE))


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (CHAT_USAGE, CHAT_EXPECTED),
        (RESPONSES_USAGE, RESPONSES_EXPECTED),
        ({"prompt_tokens": 5, "total_tokens": 5}, ReportedUsage(TokenUsage(5, 0), 5)),  # embeddings
        ({"prompt_tokens": 2, "completion_tokens": 3}, ReportedUsage(TokenUsage(2, 3), 5)),  # no total
        (
            {"prompt_tokens": True, "completion_tokens": -1, "total_tokens": "x"},
            ReportedUsage(TokenUsage(), 0),
        ),
        ({"input_tokens": 1, "input_tokens_details": None}, ReportedUsage(TokenUsage(1), 1)),
        ({"foo": 1}, None),
        (None, None),
        ([1, 2], None),
    ],
)
def test_parse_usage_shapes(usage: Any, expected: ReportedUsage | None) -> None:
    """Every OpenAI usage shape parses; junk counts as zero; non-usage is None."""
    assert parse_usage(usage) == expected


@pytest.mark.parametrize("split", range(len(CHAT_STREAM) + 1))
def test_sse_split_at_every_byte(split: int) -> None:
    """The usage is found whatever byte the stream is cut at."""
    tap = SSETap()
    tap.feed(CHAT_STREAM[:split])
    tap.feed(CHAT_STREAM[split:])
    tap.close()
    assert tap.usage == CHAT_EXPECTED
    assert tap.model == "gpt-4o"
    assert tap.done and not tap.error
    assert tap.output_bytes == len("Hello world")


def test_sse_one_byte_at_a_time_with_crlf() -> None:
    """CRLF line endings and one-byte chunks."""
    data = sse(chunk("Hi"), chunk(choices=[], usage=CHAT_USAGE), eol="\r\n")
    tap = SSETap()
    for i in range(len(data)):
        tap.feed(data[i : i + 1])
    tap.close()
    assert tap.usage == CHAT_EXPECTED and tap.done and tap.events == 2


def test_sse_skips_junk_and_keeps_last_usage() -> None:
    """Comments, other fields, bad JSON, non-objects and empty data are skipped; the last usage wins."""
    data = (
        b": keep-alive\n\nevent: ping\nid: 3\nretry: 10\ndata:\ndata: {not json\ndata: [1,2]\n"
        b"data: null\n\n"
        + sse(chunk(choices=[], usage={"prompt_tokens": 1, "completion_tokens": 1}), done=False)
        + b"data:"
        + json.dumps(chunk(choices=[], usage=CHAT_USAGE)).encode()
        + b"\n\n"  # no space after colon
    )
    tap = SSETap()
    tap.feed(data)
    tap.close()
    assert tap.usage == CHAT_EXPECTED
    assert not tap.done


def test_sse_last_line_without_newline_counts_at_close() -> None:
    """A final line with no newline is read by close()."""
    tap = SSETap()
    tap.feed(b"data: " + json.dumps(chunk(choices=[], usage=CHAT_USAGE)).encode())
    assert tap.usage is None
    tap.close()
    assert tap.usage == CHAT_EXPECTED


def test_sse_responses_api_completed() -> None:
    """Responses API: deltas counted, usage from `response.completed`, model from the response."""
    events = [
        {"type": "response.created", "response": {"model": "gpt-4o-2024", "usage": None}},
        {"type": "response.output_text.delta", "delta": "abc"},
        {"type": "response.output_text.delta", "delta": "de"},
        {"type": "response.completed", "response": {"model": "gpt-4o-2024", "usage": RESPONSES_USAGE}},
    ]
    data = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    tap = SSETap()
    tap.feed(data)
    tap.close()
    assert tap.usage == RESPONSES_EXPECTED
    assert tap.model == "gpt-4o-2024" and tap.output_bytes == 5 and tap.done and not tap.error


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.failed", "response": {"usage": None}},
        {"type": "error", "message": "x"},
        {"error": {}},
    ],
)
def test_sse_error_events_flagged(event: dict[str, Any]) -> None:
    """An error carried inside a 200 stream is flagged."""
    tap = SSETap()
    tap.feed(sse(event, done=False))
    assert tap.error


def test_sse_legacy_completions_text_counted() -> None:
    """Legacy completion chunks: `choices[].text` counts as output; usage chunk read."""
    tap = SSETap()
    tap.feed(sse({"choices": [{"text": "abcd"}]}, {"choices": [], "usage": CHAT_USAGE}))
    assert tap.usage == CHAT_EXPECTED and tap.output_bytes == 4


def test_sse_overlong_line_skipped_bounded() -> None:
    """A line over the cap is skipped without being kept; the next line is read normally."""
    tap = SSETap(line_cap=100)
    tap.feed(b"data: " + b"x" * 150)
    tap.feed(b"y" * 500)
    assert len(tap._tail) == 0 and tap.overflowed
    tap.feed(b"zz\n" + sse(chunk(choices=[], usage=CHAT_USAGE)))
    assert tap.usage == CHAT_EXPECTED


def test_sse_tail_never_exceeds_cap() -> None:
    """Memory stays bounded by the cap whatever arrives."""
    tap = SSETap(line_cap=64)
    for _ in range(100):
        tap.feed(b"a" * 50)
        assert len(tap._tail) <= 64


# -- rewriting -------------------------------------------------------------------------------------
def injected_stream(eol: str = "\n") -> tuple[bytes, bytes]:
    """(what the upstream sends with include_usage, what it would send without it)."""
    with_usage = sse(
        chunk("Hello", usage=None), chunk(" you", usage=None), chunk(choices=[], usage=CHAT_USAGE), eol=eol
    )
    without = sse(chunk("Hello"), chunk(" you"), eol=eol)
    return with_usage, without


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("split", range(0, 400, 7))
def test_rewrite_hides_injected_usage(split: int, eol: str) -> None:
    """Rewriting yields exactly the stream without include_usage, and still reads the usage."""
    upstream, expected = injected_stream(eol)
    tap = SSETap(hide_usage=True)
    out = tap.rewrite(upstream[:split]) + tap.rewrite(upstream[split:], final=True)
    assert out == expected
    assert tap.usage == CHAT_EXPECTED


def test_rewrite_forwards_complete_lines_at_once() -> None:
    """Each complete line goes out immediately; only an unfinished line is held back."""
    tap = SSETap(hide_usage=True)
    first = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n'
    assert tap.rewrite(first + b'\ndata: {"cho') == b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    assert tap.rewrite(b'ices":[]}\n') == b'data: {"choices":[]}\n'  # no usage key: unchanged


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'data: {"usage":null,"a":1}', b'data: {"a":1}'),
        (b'data: {"usage": null, "a": 1}', b'data: {"a": 1}'),
        (b'data: {"a":1, "usage" : null }', b'data: {"a":1 }'),
        (b'data: {"usage":null}', b"data: {}"),
        (b'data: {"a":{"usage":null},"usage":null}', b'data: {"a":{"usage":null}}'),
        (b'data: {"a":"\\"usage\\":null","usage":null}', b'data: {"a":"\\"usage\\":null"}'),
        (b'data: {"a":{"usage":null,"b":2},"usage":null,"c":3}', b'data: {"a":{"usage":null,"b":2},"c":3}'),
        (b'data: {"usage":null,"a":{"b":1,"usage":null}}', b'data: {"a":{"b":1,"usage":null}}'),
        (b'data: {"a": "usage", "usage": null}', b'data: {"a":"usage"}'),
        (b'data: {"a":1,"usage":null}\r', b'data: {"a":1}\r'),
    ],
)
def test_rewrite_strips_only_top_level_usage_null(line: bytes, expected: bytes) -> None:
    """`"usage":null` is removed from the chunk object only, touching as little as possible."""
    tap = SSETap(hide_usage=True)
    out = tap.rewrite(line + b"\n")
    assert out == expected + b"\n"


def test_rewrite_passes_overlong_lines_through_unchanged() -> None:
    """A line over the rewrite cap is forwarded as it arrives, not held back."""
    tap = SSETap(hide_usage=True, line_cap=32)
    part1 = b'data: {"usage":null,"x":"' + b"a" * 40
    assert tap.rewrite(part1) == part1
    assert tap.rewrite(b'"}\n\n') == b'"}\n\n'
    assert tap.rewrite(b'data: {"usage":null}\n') == b"data: {}\n"


def test_rewrite_final_flushes_partial_line() -> None:
    """The end of the body flushes a held-back line."""
    tap = SSETap(hide_usage=True)
    assert tap.rewrite(b"data: [DO") == b""
    assert tap.rewrite(b"NE]", final=True) == b"data: [DONE]"
    assert tap.done


def test_rewrite_without_hiding_keeps_bytes() -> None:
    """Rewriting mode with hide_usage off is the identity."""
    upstream, _ = injected_stream()
    tap = SSETap(hide_usage=False)
    assert tap.rewrite(upstream, final=True) == upstream


# -- rewriting the usage wherever an upstream puts it ----------------------------------------------------
def rewrite_in_pieces(data: bytes, size: int) -> tuple[bytes, SSETap]:
    """Rewrite `data` arriving in `size`-byte reads; (what the client gets, the tap)."""
    tap = SSETap(hide_usage=True)
    out = b"".join(tap.rewrite(data[i : i + size]) for i in range(0, len(data), size))
    return out + tap.rewrite(b"", final=True), tap


def openai_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """A chat chunk as OpenAI sends it (key order included)."""
    return {
        "id": "chatcmpl-Bx1",
        "object": "chat.completion.chunk",
        "created": 1750000000,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_07871e2ad8",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


OPENAI_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 1},
    "completion_tokens_details": {
        "reasoning_tokens": 2,
        "audio_tokens": 4,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


@pytest.mark.parametrize("size", [1, 13, 10_000])
def test_rewrite_openai_stream_with_obfuscation(size: int) -> None:
    """OpenAI: `"usage":null` followed by `obfuscation` on every chunk, then the `choices: []` chunk:
    the client gets the stream OpenAI sends without include_usage."""
    deltas = [{"role": "assistant", "content": "", "refusal": None}, {"content": "Hi"}, {"content": "!"}]
    with_usage = [openai_chunk(d, usage=None, obfuscation="x1") for d in deltas]
    with_usage.append(openai_chunk({}, "stop", usage=None, obfuscation="x2"))
    final = {**openai_chunk({}), "choices": [], "usage": OPENAI_USAGE, "obfuscation": "x3"}
    without = [openai_chunk(d, obfuscation="x1") for d in deltas] + [
        openai_chunk({}, "stop", obfuscation="x2")
    ]
    out, tap = rewrite_in_pieces(sse(*with_usage, final), size)
    assert out == sse(*without)
    assert tap.usage == CHAT_EXPECTED


def litellm_chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
    """A chunk as the LiteLLM proxy sends it (`exclude_none`: no `"usage":null` on content chunks)."""
    return {
        "id": "chatcmpl-7f3",
        "created": 1750000000,
        "model": "gpt-4o-mini",
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp_06737a9306",
        "choices": choices,
        **extra,
    }


LITELLM_CONTENT = [
    litellm_chunk([{"index": 0, "delta": {"content": "Hello", "role": "assistant"}}]),
    litellm_chunk([{"index": 0, "delta": {"content": " there"}}]),
    litellm_chunk([{"finish_reason": "stop", "index": 0, "delta": {}}]),
]


@pytest.mark.parametrize(
    "usage_choices",
    [
        [{"index": 0, "delta": {}}],
        [{"index": 0, "delta": {}, "finish_reason": None}],
        [{"finish_reason": None, "index": 0, "delta": {"content": None, "role": None}, "logprobs": None}],
        [{"index": 0, "delta": {"content": ""}}],
    ],
)
@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_rewrite_drops_litellm_usage_chunk(usage_choices: list[Any], eol: str, size: int) -> None:
    """LiteLLM's usage chunk has one choice with an empty delta and no finish_reason: it carries nothing
    for the client, so it is dropped with its blank line, and its usage is still read."""
    upstream = sse(*LITELLM_CONTENT, litellm_chunk(usage_choices, usage=OPENAI_USAGE), eol=eol)
    out, tap = rewrite_in_pieces(upstream, size)
    assert out == sse(*LITELLM_CONTENT, eol=eol)
    assert tap.usage == CHAT_EXPECTED and tap.done


def vllm_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """A chunk as vLLM sends it (`exclude_unset`: no `usage` key unless usage is being reported)."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "chatcmpl-b0c",
        "object": "chat.completion.chunk",
        "created": 1750000000,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "choices": [choice],
        **extra,
    }


def running(completion: int) -> dict[str, int]:
    """vLLM's `continuous_usage_stats` usage after `completion` tokens (its key order)."""
    return {"prompt_tokens": 11, "total_tokens": 11 + completion, "completion_tokens": completion}


VLLM_DELTAS = [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}]


@pytest.mark.parametrize("size", [1, 29, 10_000])
def test_rewrite_vllm_continuous_usage_cut_from_every_chunk(size: int) -> None:
    """vLLM with `continuous_usage_stats` (the client's option, made live by the injected include_usage)
    puts usage on every chunk, then sends a `choices: []` chunk: the usage goes from each chunk, the
    usage-only chunk goes, the text stays; the final usage is the one recorded."""
    upstream = sse(
        *(vllm_chunk(d, usage=running(i)) for i, d in enumerate(VLLM_DELTAS)),
        vllm_chunk({"content": "!"}, "stop", usage=running(3)),
        {**vllm_chunk({}), "choices": [], "usage": running(3)},
    )
    out, tap = rewrite_in_pieces(upstream, size)
    assert out == sse(*(vllm_chunk(d) for d in VLLM_DELTAS), vllm_chunk({"content": "!"}, "stop"))
    assert tap.usage == ReportedUsage(TokenUsage(11, 3), 14)
    assert tap.output_bytes == len("Hello!")


@pytest.mark.parametrize("size", [1, 31, 10_000])
def test_rewrite_usage_on_the_last_content_chunk(size: int) -> None:
    """Usage carried by the last content chunk (with its text and finish_reason, as some OpenAI-compatible
    servers send it): forwarded with only the usage removed."""
    upstream = sse(
        *(vllm_chunk(d) for d in VLLM_DELTAS), vllm_chunk({"content": "!"}, "length", usage=OPENAI_USAGE)
    )
    out, tap = rewrite_in_pieces(upstream, size)
    assert out == sse(*(vllm_chunk(d) for d in VLLM_DELTAS), vllm_chunk({"content": "!"}, "length"))
    assert tap.usage == CHAT_EXPECTED


@pytest.mark.parametrize(
    ("usage_chunk", "forwarded"),
    [
        ({"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": None}]}, None),
        (
            {"choices": [{"text": "!", "index": 0, "logprobs": None, "finish_reason": "length"}]},
            {"choices": [{"text": "!", "index": 0, "logprobs": None, "finish_reason": "length"}]},
        ),
        (
            {"choices": [{"text": "", "index": 0, "finish_reason": "stop"}]},
            {"choices": [{"text": "", "index": 0, "finish_reason": "stop"}]},
        ),
    ],
)
def test_rewrite_legacy_completions_usage_chunks(usage_chunk: dict[str, Any], forwarded: Any) -> None:
    """Legacy completions: an empty-text usage chunk is dropped; one with text or a finish_reason is
    forwarded without its usage."""
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct"}
    text = {**head, "choices": [{"text": "Hi", "index": 0, "logprobs": None, "finish_reason": None}]}
    out, tap = rewrite_in_pieces(sse(text, {**head, **usage_chunk, "usage": OPENAI_USAGE}), 10_000)
    assert out == (sse(text) if forwarded is None else sse(text, {**head, **forwarded}))
    assert tap.usage == CHAT_EXPECTED


USAGE_BYTES = b'{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}'


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b'data: {"choices":[{"delta":{"content":"a"}}],"usage":%s}',
            b'data: {"choices":[{"delta":{"content":"a"}}]}',
        ),
        (
            b'data: {"usage":%s,"choices":[{"delta":{"content":"a"}}]}',
            b'data: {"choices":[{"delta":{"content":"a"}}]}',
        ),
        (
            b'data: {"usage" : %s , "choices": [{"delta": {"content": "a"}}]}',
            b'data: {"choices": [{"delta": {"content": "a"}}]}',
        ),
        (
            b'data: {"choices":[{"delta":{"content":"a"}}], "usage" : %s }',
            b'data: {"choices":[{"delta":{"content":"a"}}] }',
        ),
        (
            b'data: {"choices":[{"delta":{"content":"a"}}],"usage":%s,"obfuscation":"q"}',
            b'data: {"choices":[{"delta":{"content":"a"}}],"obfuscation":"q"}',
        ),
        (  # non-ASCII text before the usage: byte offsets are not character offsets
            'data: {"choices":[{"delta":{"content":"héllo ✓"}}],"usage":%s}'.encode(),
            'data: {"choices":[{"delta":{"content":"héllo ✓"}}]}'.encode(),
        ),
        (
            b'data: {"choices":[{"delta":{"content":"a"}}],"usage":%s}\r',
            b'data: {"choices":[{"delta":{"content":"a"}}]}\r',
        ),
        (  # `"usage"` also as a string value: the chunk is re-serialized, compactly
            b'data: {"choices": [{"delta": {"content": "usage"}}], "usage": %s}',
            b'data: {"choices":[{"delta":{"content":"usage"}}]}',
        ),
    ],
)
def test_rewrite_cuts_only_the_usage_object(line: bytes, expected: bytes) -> None:
    """A usage object on a chunk with content is cut out, leaving every other byte as it was."""
    tap = SSETap(hide_usage=True)
    assert tap.rewrite(line.replace(b"%s", USAGE_BYTES) + b"\n") == expected + b"\n"
    assert tap.usage == ReportedUsage(TokenUsage(1, 2), 3)


@pytest.mark.parametrize(
    "line",
    [
        # the top-level key spelled with an escape, a nested `"usage"` spelled plainly
        b'data: {"choices":[{"delta":{"content":"a"},"usage":null}],"us\\u0061ge":%s}',
        b'data: {"choices":[{"delta":{"content":"a"},"usage":{"x":1}}],"us\\u0061ge":%s}',
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":%s\r}',  # `\r` as JSON whitespace
    ],
)
def test_rewrite_unusual_usage_bytes_reserialized(line: bytes) -> None:
    """When the bytes do not show plainly where the top-level usage is, the chunk is re-serialized
    without it (nested `usage` members stay)."""
    raw = line.replace(b"%s", USAGE_BYTES)
    tap = SSETap(hide_usage=True)
    out = tap.rewrite(raw + b"\n")
    expected = {k: v for k, v in json.loads(raw[6:]).items() if k != "usage"}
    assert json.loads(out[6:]) == expected and b"prompt_tokens" not in out
    assert tap.usage == ReportedUsage(TokenUsage(1, 2), 3)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'data: {"choices":["junk"],"usage":%s}', b'data: {"choices":["junk"]}'),
        (b'data: {"choices":{"a":1},"usage":%s}', b'data: {"choices":{"a":1}}'),
        (b'data: {"choices":[{"delta":{"content":"a"}}],"usage":"n/a"}', None),
        (b'data: {"choices":[{"delta":{"content":"a"}}],"usage":[1]}', None),
    ],
)
def test_rewrite_junk_choices_or_usage(line: bytes, expected: bytes | None) -> None:
    """Choices that are not a list of objects are not "nothing": kept, without the usage object; a
    `usage` that is not an object (nor null) is not the injected usage: left alone."""
    tap = SSETap(hide_usage=True)
    raw = line.replace(b"%s", USAGE_BYTES)
    assert tap.rewrite(raw + b"\n") == (raw if expected is None else expected) + b"\n"


def test_rewrite_usage_object_with_braces_in_a_string() -> None:
    """The end of the usage object is found by parsing it, not by counting braces."""
    usage = b'{"prompt_tokens":1,"completion_tokens":2,"note":"} {\\"x"}'
    tap = SSETap(hide_usage=True)
    line = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":' + usage + b',"z":1}\n'
    assert tap.rewrite(line) == b'data: {"choices":[{"delta":{"content":"a"}}],"z":1}\n'
    assert tap.usage == ReportedUsage(TokenUsage(1, 2), 3)


def test_rewrite_drops_usage_chunk_without_choices() -> None:
    """A chunk that is only metadata and usage (no `choices` at all) is dropped too."""
    out, tap = rewrite_in_pieces(sse({"id": "x", "model": "m", "usage": OPENAI_USAGE}, done=False), 5)
    assert out == b"" and tap.usage == CHAT_EXPECTED


@pytest.mark.parametrize(
    "choice",
    [
        {"index": 0, "delta": {"role": "assistant"}},
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}},
        {"index": 0, "delta": {}, "logprobs": {"content": [{"token": "a", "logprob": -0.1}]}},
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"},
    ],
)
def test_rewrite_keeps_a_usage_chunk_that_still_says_something(choice: dict[str, Any]) -> None:
    """A role, a tool call, logprobs or a finish_reason is something the client reads: kept, usage cut."""
    out, _ = rewrite_in_pieces(sse(litellm_chunk([choice], usage=OPENAI_USAGE), done=False), 10_000)
    assert out == sse(litellm_chunk([choice]), done=False)


# -- JSON ------------------------------------------------------------------------------------------
CHAT_JSON = {
    "id": "x",
    "model": "gpt-4o-mini",
    "choices": [
        {
            "message": {
                "content": "héllo",
                "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}, {"type": "x"}],
            }
        },
        {"text": "abc"},
        "junk",
    ],
    "usage": CHAT_USAGE,
}


@pytest.mark.parametrize("split", [0, 1, 10, 50, -1])
def test_json_tap_chat_without_usage(split: int) -> None:
    """Chat JSON without usage, in two pieces: model and generated-text bytes (for an estimate)."""
    data = json.dumps({**CHAT_JSON, "usage": None}).encode()
    tap = JSONTap()
    tap.feed(data[:split])
    tap.feed(data[split:])
    tap.close()
    assert tap.usage is None and tap.model == "gpt-4o-mini"
    assert tap.output_bytes == len("héllo".encode()) + 2 + 3
    assert not tap.error


def test_json_tap_responses_output_text() -> None:
    """Responses JSON: text and function-call arguments counted without usage; usage with details."""
    body = {
        "model": "m",
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "hey"}, "x"]},
            {"type": "function_call", "arguments": "{}"},
            "junk",
        ],
    }
    tap = JSONTap()
    tap.feed(json.dumps(body).encode())
    tap.close()
    assert tap.usage is None and tap.output_bytes == 5
    tap = JSONTap()
    tap.feed(json.dumps({**body, "usage": RESPONSES_USAGE}).encode())
    tap.close()
    assert tap.usage == RESPONSES_EXPECTED and tap.output_bytes == 0


@pytest.mark.parametrize(
    ("body", "error"),
    [(b"not json", False), (b"[1]", False), (b'{"error":{"message":"x"}}', True), (b"", False)],
)
def test_json_tap_junk(body: bytes, error: bool) -> None:
    """Unparseable or non-object bodies give no usage; an error body is flagged."""
    tap = JSONTap()
    tap.feed(body)
    tap.close()
    assert tap.usage is None and tap.error is error


def test_json_tap_over_cap_finds_usage_in_tail() -> None:
    """A body larger than the cap keeps only a bounded tail and still finds `usage` at its end."""
    body = {
        "data": [{"embedding": [0.1] * 50_000, "index": 0}],
        "model": "e",
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
    }
    data = json.dumps(body).encode()
    tap = JSONTap(cap=10_000)
    for i in range(0, len(data), 4096):
        tap.feed(data[i : i + 4096])
        assert sum(map(len, tap._chunks)) + len(tap._tail) <= max(10_000 + 4096, 64 * 1024)
    tap.close()
    assert tap.overflowed and tap.usage == ReportedUsage(TokenUsage(9), 9)


def test_json_tap_over_cap_without_usage() -> None:
    """Over the cap and no usage in the tail: None (the middleware will estimate)."""
    tap = JSONTap(cap=10)
    tap.feed(b'{"usage": {"a": 1}, "data": "' + b"x" * 100 + b'"}')
    tap.close()
    assert tap.usage is None


def test_output_text_bytes_non_object() -> None:
    """Anything but an object has no output text."""
    assert output_text_bytes([1]) == 0 and output_text_bytes({"choices": "x", "output": "y"}) == 0


def long_stream(n: int, *, usage_null: bool) -> list[dict[str, Any]]:
    """A realistic chat stream: role chunk, `n` content chunks (one a tool call, one with escapes)."""
    extra: dict[str, Any] = {"usage": None} if usage_null else {}
    chunks: list[dict[str, Any]] = [
        chunk(None, choices=[{"index": 0, "delta": {"role": "assistant"}}], **extra)
    ]
    for i in range(n):
        chunks.append(chunk(f"w{i}", **extra))
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    chunks.append(chunk(choices=[{"index": 0, "delta": {"tool_calls": [call]}}], **extra))
    chunks.append(chunk('say "hi"', **extra))
    return chunks


def test_sse_fast_path_after_first_lines() -> None:
    """Past the first lines, content chunks take the fast path and still count text and find usage."""
    chunks = long_stream(20, usage_null=True)
    tap = SSETap()
    tap.feed(sse(*chunks, chunk(choices=[], usage=CHAT_USAGE)))
    tap.close()
    text = sum(len(f"w{i}") for i in range(20)) + len('{"a":1}') + len('say "hi"')
    # escaped text counts its escaped length: two quotes in `say "hi"`, six in the tool arguments
    assert text <= tap.output_bytes <= text + 6
    assert tap.usage == CHAT_EXPECTED and tap.done and tap.events == 24


def test_sse_fast_path_responses_deltas() -> None:
    """Many Responses deltas: counted on the fast path; a non-delta event still parsed."""
    events = [{"type": "response.created", "response": {"model": "m"}}]
    events += [
        {"type": "response.output_text.delta", "delta": "abcd", "sequence_number": i} for i in range(10)
    ]
    events += [{"type": "response.failed", "response": {"usage": RESPONSES_USAGE}}]
    tap = SSETap()
    tap.feed(sse(*events, done=False))
    assert tap.output_bytes == 40 and tap.usage == RESPONSES_EXPECTED and tap.error and tap.done


def test_rewrite_long_stream_matches_stream_without_usage() -> None:
    """Rewriting a long include_usage stream gives byte for byte the stream without include_usage."""
    with_usage = sse(*long_stream(20, usage_null=True), chunk(choices=[], usage=CHAT_USAGE))
    without = sse(*long_stream(20, usage_null=False))
    tap = SSETap(hide_usage=True)
    out = b"".join(tap.rewrite(with_usage[i : i + 37]) for i in range(0, len(with_usage), 37))
    out += tap.rewrite(b"", final=True)
    assert out == without and tap.usage == CHAT_EXPECTED


def test_sse_error_after_first_lines_flagged() -> None:
    """An error object late in a stream is still seen."""
    tap = SSETap()
    tap.feed(sse(*long_stream(5, usage_null=False), {"error": {"message": "overloaded"}}, done=False))
    assert tap.error and not tap.done


def test_json_tap_last_usage_wins_and_model_from_head() -> None:
    """A nested `usage` object earlier in the body does not shadow the top-level one at the end."""
    body = {"model": "gpt-4o", "output": [{"usage": {"input_tokens": 99}}], "usage": RESPONSES_USAGE}
    tap = JSONTap()
    tap.feed(json.dumps(body).encode())
    tap.close()
    assert tap.usage == RESPONSES_EXPECTED and tap.model == "gpt-4o"


def test_json_tap_empty_chunks_ignored() -> None:
    """Empty chunks (the final empty body message) change nothing."""
    tap = JSONTap(cap=5)
    tap.feed(b"")
    tap.close()
    assert (tap.size, tap.overflowed, tap.usage) == (0, False, None)


# -- the bulk path: whole runs of plain lines read together must match the line-by-line reader ---------
class LineByLineTap(SSETap):
    """The reference: the same tap with the bulk path turned off."""

    __slots__ = ()

    def _plain_end(self, chunk: bytes, start: int) -> int:
        return start


_LINES = {
    "content": b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"w\\"x"}}]%s}',
    "nested_null": b'data: {"id":"c","choices":[{"delta":{"content":"a"},"x":{"b":1,"usage":null}}]%s}',
    "spaced": b'data: {"id":"c","choices":[{"delta":{"content":"b"}}], "usage" : null }',
    "tool": b'data: {"choices":[{"delta":{"tool_calls":[{"type":"function","function":{"arguments":"{}"}}]}}]%s}',
    "error": b'data: {"error":{"message":"overloaded"}}',
    "usage": b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}',
    "comment": b": keep-alive",
    "event": b"event: message",
    "done": b"data: [DONE]",
    "blank": b"",
    # usage on chunks that are not OpenAI's `choices: []` one
    "litellm_usage": b'data: {"id":"c","model":"m","object":"chat.completion.chunk","choices":[{"index":0,"delta":{}}],"usage":{"completion_tokens":7,"prompt_tokens":11,"total_tokens":18}}',
    "continuous": b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"y"},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":11,"total_tokens":12,"completion_tokens":1}}',
    "usage_on_finish": b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"z"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}',
    "legacy_usage": b'data: {"id":"c","object":"text_completion","choices":[{"text":"","index":0,"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7}}',
}
# What the client gets for each line when the usage is hidden (None: the chunk and its blank line go).
_HIDDEN: dict[str, bytes | None] = {
    **{kind: line % b"" if b"%s" in line else line for kind, line in _LINES.items()},
    "spaced": b'data: {"id":"c","choices":[{"delta":{"content":"b"}}] }',
    "usage": None,
    "litellm_usage": None,
    "continuous": b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"y"},"logprobs":null,"finish_reason":null}]}',
    "usage_on_finish": b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"z"},"finish_reason":"stop"}]}',
    "legacy_usage": None,
}


@pytest.mark.parametrize("hide", [True, False])
@given(
    kinds=st.lists(st.sampled_from(sorted(_LINES)), min_size=1, max_size=30),
    usage_null=st.booleans(),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
)
@settings(max_examples=300, deadline=None)
def test_bulk_path_matches_line_by_line(
    hide: bool, kinds: list[str], usage_null: bool, crlf: bool, cuts: list[int]
) -> None:
    """However a stream is cut into chunks, the bulk path forwards the same bytes and reads the same
    usage, model, events, errors and end as reading every line on its own (text counts may only differ
    on lines mixing text keys, which these streams keep apart); hiding, both forward exactly the
    stream without the usage, wherever it was."""
    eol = b"\r\n" if crlf else b"\n"
    first = b'data: {"id":"c","model":"gpt-4o","choices":[{"delta":{"role":"assistant"}}]%s}'
    lines = [first] + [_LINES[k] for k in kinds]
    body = b"".join(
        (line % (b',"usage":null' if usage_null else b"") if b"%s" in line else line) + eol + eol
        for line in lines
    )
    hidden = [first % b""] + [_HIDDEN[k] for k in kinds]
    expected = b"".join(line + eol + eol for line in hidden if line is not None)
    bounds = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *bounds], [*bounds, len(body)], strict=True)]
    results = []
    for cls in (SSETap, LineByLineTap):
        tap = cls(hide_usage=hide)
        if hide:
            out = b"".join(tap.rewrite(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces))
        else:
            for p in pieces:
                tap.feed(p)
            tap.close()
            out = body
        results.append((out, tap.usage, tap.model, tap.events, tap.error, tap.done, tap.output_bytes))
    assert results[0] == results[1]
    # (Not checked: a nested `"usage":null` alone on a line the fast path does not parse, which is cut
    # too; both paths agree on it, above.)
    if hide and (usage_null or "nested_null" not in kinds):
        assert results[0][0] == expected


def test_bulk_rewrite_of_a_whole_openai_stream_in_one_chunk() -> None:
    """A whole include_usage stream arriving in one read is rewritten to the stream without usage."""
    with_usage = sse(*long_stream(30, usage_null=True), chunk(choices=[], usage=CHAT_USAGE))
    tap = SSETap(hide_usage=True)
    assert tap.rewrite(with_usage, final=True) == sse(*long_stream(30, usage_null=False))
    assert tap.usage == CHAT_EXPECTED and tap.done and tap.events == 34
