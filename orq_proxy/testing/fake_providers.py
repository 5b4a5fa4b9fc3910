"""The fake upstream's other wire formats: Anthropic's Messages API and Azure OpenAI's layout.

`FakeUpstream` sends these paths here (see its module docstring for the OpenAI routes and the `x-fake-*`
headers, which apply here too: `x-fake-words`, `-status`, `-latency-ms`, `-ttft-ms`, `-chunk-delay-ms`,
`-disconnect-after`, `-model`).

Anthropic (`POST /v1/messages`, `POST /v1/messages/count_tokens`; a client's base URL is the fake's root):
- `x-api-key` must be the fake's key (when it has one) and `anthropic-version` must be sent, else 401 / 400
  in Anthropic's error shape (`{"type": "error", "error": {"type", "message"}, "request_id"}`); so are
  `x-fake-status` answers (529 is `overloaded_error`). `max_tokens` is required (a positive integer).
- Prompt tokens: words of `system` (string or text blocks) and of every message's content, plus 4 per
  message and 4 for a system prompt. `count_tokens` answers that number.
- Anthropic's `input_tokens` leaves out the cache: `x-fake-cache-read-tokens: N`,
  `x-fake-cache-write-tokens: N` (5-minute) and `x-fake-cache-write-1h-tokens: N` carve reads and writes
  out of the prompt (never more than it), reported as `cache_read_input_tokens`,
  `cache_creation_input_tokens` and the `cache_creation` TTL split.
- Output: `words` words capped by `max_tokens` (`stop_reason: "max_tokens"`), else `end_turn`.
- Streams: `message_start` (input usage, `output_tokens: 1`), `content_block_start`, `ping`, one
  `content_block_delta` per word, `content_block_stop`, `message_delta` (`stop_reason`, the output
  tokens), `message_stop`. `x-fake-anthropic-late-usage: 1` sends the cache-write TTL split only in
  `message_delta` (as late as the real API may).

Azure (`/openai/deployments/{deployment}/{chat/completions|completions|embeddings}?api-version=...`): the
`api-key` header must be the fake's key (401 in Azure's shape) and `api-version` is required (400). The
request is answered by the OpenAI routes (recorded with its Azure path and query). Streams open with Azure's
prompt-filter chunk (`"choices": []`, `prompt_filter_results`); `x-fake-azure-filter-chunks: 1` also sends,
after the first content chunk, a content-filter chunk whose choice has `content_filter_results` and no
`delta`.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from starlette.types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from orq_proxy.testing.fake_upstream import FakeUpstream

__all__ = ["handle_provider_path", "is_provider_path"]

_AZURE_PATH = re.compile(r"^/openai/deployments/([^/]+)(/.*)$")
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_AZURE_PROMPT_FILTER = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n'
)
_AZURE_CONTENT_FILTER = (
    b'data: {"choices":[{"content_filter_offsets":{"check_offset":0,"start_offset":0,"end_offset":10},'
    b'"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}},"finish_reason":null,"index":0}],'
    b'"created":0,"id":"azure-filter","model":"","object":"chat.completion.chunk"}\n\n'
)


def is_provider_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith(("/v1/messages/", "/openai/"))


async def handle_provider_path(fake: FakeUpstream, scope: Scope, receive: Receive, send: Send) -> None:
    path: str = scope["path"]
    if path.startswith("/openai/"):
        await _azure(fake, scope, receive, send)
    else:
        await _anthropic(fake, scope, receive, send)


# --- Azure -------------------------------------------------------------------------------------------


async def _azure(fake: FakeUpstream, scope: Scope, receive: Receive, send: Send) -> None:
    from orq_proxy.testing.fake_upstream import _send_json

    path: str = scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    match = _AZURE_PATH.match(path)
    if match is None:
        await _send_json(send, 404, {"error": {"code": "404", "message": "Resource not found"}})
        return
    if fake.api_key is not None and headers.get("api-key") != fake.api_key:
        message = (
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
            "key for an active subscription and use a correct regional API endpoint for your resource."
        )
        await _send_json(send, 401, {"error": {"code": "401", "message": message}})
        return
    if "api-version=" not in query:
        await _send_json(send, 400, {"error": {"code": "BadRequest", "message": "Missing API version"}})
        return
    inner_headers = [(k, v) for k, v in scope["headers"] if k not in (b"api-key", b"authorization")]
    if fake.api_key is not None:
        inner_headers.append((b"authorization", f"Bearer {fake.api_key}".encode()))
    inner = {
        **scope,
        "path": "/v1" + match.group(2),
        "raw_path": ("/v1" + match.group(2)).encode(),
        "query_string": b"",
        "headers": inner_headers,
        # What the request log shows: the request as Azure received it.
        "fake.recorded": (path, query, headers),
    }
    filter_chunks = headers.get("x-fake-azure-filter-chunks", "") not in ("", "0")
    stream = False
    chunks_seen = 0

    async def azure_send(message: Message) -> None:
        nonlocal stream, chunks_seen
        if message["type"] == "http.response.start":
            for k, v in message.get("headers", ()):
                if k == b"content-type" and v.startswith(b"text/event-stream"):
                    stream = True
            await send(message)
            return
        if stream and message["type"] == "http.response.body" and message.get("body"):
            chunks_seen += 1
            body: bytes = message["body"]
            if chunks_seen == 1:
                body = _AZURE_PROMPT_FILTER + body
                if filter_chunks:
                    body += _AZURE_CONTENT_FILTER
            message = {**message, "body": body}
        await send(message)

    await fake(inner, receive, azure_send)


# --- Anthropic ---------------------------------------------------------------------------------------


def _text_words(value: Any) -> int:
    from orq_proxy.testing.fake_upstream import count_words

    if isinstance(value, str):
        return count_words(value)
    n = 0
    if isinstance(value, list):
        for block in value:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                n += count_words(block["text"])
    return n


def _prompt_tokens(body: dict[str, Any]) -> int:
    n = 0
    system = body.get("system")
    if system:
        n += _text_words(system) + 4
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            n += 4
            if isinstance(message, dict):
                n += _text_words(message.get("content"))
    return n


def _header_int(headers: dict[str, str], name: str) -> int:
    try:
        return max(int(headers.get(name, "0")), 0)
    except ValueError:
        return 0


async def _anthropic_error(send: Send, status: int, message: str) -> None:
    from orq_proxy.testing.fake_upstream import _send_json

    error_type = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    await _send_json(
        send,
        status,
        {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_fake"},
    )


async def _anthropic(fake: FakeUpstream, scope: Scope, receive: Receive, send: Send) -> None:
    import asyncio

    from orq_proxy.testing.fake_upstream import (
        RecordedRequest,
        _apply_controls,
        _Plan,
        _send_json,
        _Stream,
        _words,
    )

    path: str = scope["path"]
    method: str = scope["method"]
    chunks: list[bytes] = []
    more = True
    while more and method == "POST":
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    raw = b"".join(chunks)
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = None
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    record = RecordedRequest(
        method=method,
        path=path,
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        body=raw,
        json=body,
    )
    if fake.record:
        fake.requests.append(record)
    plan = _Plan(fake.latency, fake.ttft, fake.chunk_delay, fake.words)
    try:
        _apply_controls(plan, [(k, v) for k, v in scope["headers"] if k[:7] == b"x-fake-"])
    except ValueError as exc:
        await _anthropic_error(send, 400, str(exc))
        return
    if fake.api_key is not None and headers.get("x-api-key") != fake.api_key:
        await _anthropic_error(send, 401, "invalid x-api-key")
        return
    if "anthropic-version" not in headers:
        await _anthropic_error(send, 400, "anthropic-version: header is required")
        return
    if plan.latency:
        await asyncio.sleep(plan.latency)
    if plan.status >= 400:
        await _anthropic_error(send, plan.status, "Fake upstream error.")
        return
    if method != "POST" or path not in ("/v1/messages", "/v1/messages/count_tokens"):
        await _anthropic_error(send, 404, f"Not found: {method} {path}")
        return
    if not isinstance(body, dict):
        await _anthropic_error(send, 400, "the request body must be a JSON object")
        return
    model = body.get("model")
    if not isinstance(model, str) or not model:
        await _anthropic_error(send, 400, "model: Field required")
        return
    prompt = _prompt_tokens(body)
    if path == "/v1/messages/count_tokens":
        await _send_json(send, 200, {"input_tokens": prompt})
        return
    max_tokens = body.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        await _anthropic_error(send, 400, "max_tokens: Field required (a positive integer)")
        return
    read = min(_header_int(headers, "x-fake-cache-read-tokens"), prompt)
    write_5m = min(_header_int(headers, "x-fake-cache-write-tokens"), prompt - read)
    write_1h = min(_header_int(headers, "x-fake-cache-write-1h-tokens"), prompt - read - write_5m)
    split = {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h}
    input_usage = {
        "input_tokens": prompt - read - write_5m - write_1h,
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_read_input_tokens": read,
        "cache_creation": split,
    }
    n = min(plan.words, max_tokens)
    stop_reason = "max_tokens" if plan.words > max_tokens else "end_turn"
    answered = plan.answer_model or model
    message_id = "msg_" + fake._next_id()
    words = _words(n)
    if body.get("stream") is not True:
        usage = {**input_usage, "output_tokens": n, "service_tier": "standard"}
        answer: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": answered,
            "content": [{"type": "text", "text": " ".join(words)}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if not plan.omit_usage:
            answer["usage"] = usage
        await _send_json(send, 200, answer)
        return

    late = headers.get("x-fake-anthropic-late-usage", "") not in ("", "0")
    start_usage: dict[str, Any] = {**input_usage, "output_tokens": 1}
    delta_usage: dict[str, Any] = {"output_tokens": n}
    if late:
        del start_usage["cache_creation"]
        delta_usage.update(input_usage)

    def event(kind: str, data: dict[str, Any]) -> bytes:
        return (
            f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()
        )

    start_message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": answered,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events: list[bytes | None] = [
        event("message_start", {"message": start_message}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("ping", {}),
    ]
    for i, word in enumerate(words):
        events.append(None)
        text = word if i == 0 else " " + word
        events.append(
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})
        )
    events.append(event("content_block_stop", {"index": 0}))
    events.append(
        event(
            "message_delta",
            {"delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": delta_usage},
        )
    )
    events.append(event("message_stop", {}))
    stream: _Stream = await fake._start_stream(send, plan, record, receive)
    await fake._run_stream(stream, events)
