"""An OpenAI-compatible fake upstream: a fast raw ASGI app for tests, the demo and benchmarks.

It answers like OpenAI's API, in the shapes the `openai` SDK parses (ids, `object` names, `usage` blocks,
SSE framing), with deterministic content and token counts, so the proxy's metering can be checked to the
token. It is also the benchmarks' upstream, so it precomputes what it can, uses stdlib `json` only, and
builds SSE events from string templates.

Routes (everything under `/v1`; the base URL given to a client or to the proxy is `http://HOST:PORT/v1`):

- `POST /v1/chat/completions`: JSON, or SSE with `"stream": true` (role chunk, one chunk per word,
  a `finish_reason` chunk, then `data: [DONE]`). Only when `stream_options.include_usage` is true is a
  usage-only chunk (`"choices": []`) sent before `[DONE]`, and then every other chunk carries
  `"usage": null`, exactly as OpenAI does (`x-fake-usage-chunk` sends it as other servers do).
- `POST /v1/responses`: the Responses API, JSON or SSE (`response.created`, `response.in_progress`,
  `response.output_item.added`, `response.content_part.added`, one `response.output_text.delta` per word,
  `...done` events, and `response.completed` carrying `usage`). Every Response object and event carries
  every field that the `openai` SDK's types and `orq_ai_sdk`'s `responses.create` require (events numbered
  by `sequence_number`).
- `POST /v1/completions`: legacy completions, JSON or SSE (same usage-chunk rule as chat).
- `POST /v1/embeddings`: floats, or base64 little-endian float32 (what the SDK asks for by default).
- `GET /v1/models`, `GET /v1/models/{id}`.
Anything else is 404 with OpenAI's `Invalid URL (METHOD /path)` error, except Anthropic's Messages API
(`/v1/messages`, `/v1/messages/count_tokens`) and Azure OpenAI's layout (`/openai/deployments/...`), which
`fake_providers.py` answers (its docstring has their rules).

Deterministic usage:
- Prompt tokens: the number of whitespace-separated words in every text the request carries, plus 4 per
  message. Chat: each message's `content` (a string, or the `text` of its text parts). Responses: `input`
  as a string counts as one message; as a list, each item's `content` (string or parts); `instructions`
  count as one more message. Legacy completions and embeddings: words of each prompt/input string (token
  arrays count their length), no per-message overhead; embeddings have no completion tokens.
- `n` (chat, legacy completions) answers that many choices, each of the same words; legacy `best_of`
  generates (and bills) `max(n, best_of)`: `completion_tokens` counts every generated choice.
- Completion: `words` words (default 8, or `x-fake-words`), capped by `max_completion_tokens`,
  `max_tokens` (chat, completions) or `max_output_tokens` (responses); a capped answer ends with
  `finish_reason: "length"` (responses: `status: "incomplete"`). One word per content chunk.
- `completion_tokens` = words + reasoning tokens (OpenAI counts reasoning in completion tokens);
  `cached_tokens` (never more than the prompt) and `reasoning_tokens` are 0 unless a header asks.
- The echoed `model` is the requested model (or `x-fake-model`).

Per-request control through request headers (the proxy forwards client headers, so tests use the
openai SDK's `extra_headers`):

| header | effect |
|---|---|
| `x-fake-status: 500` | answer that status (>= 400) with an OpenAI-shaped error body |
| `x-fake-latency-ms: N` | wait N ms before the response headers (overrides `latency`) |
| `x-fake-ttft-ms: N` | streams: wait N ms between the headers and the first event (overrides `ttft`) |
| `x-fake-chunk-delay-ms: N` | streams: wait N ms before each content event after the first |
| `x-fake-words: N` | answer with N words (N completion tokens) |
| `x-fake-disconnect-after: N` | streams: after N SSE events, drop the connection without ending the body |
| `x-fake-omit-usage: 1` | no `usage` in JSON answers and no usage chunk/field in streams |
| `x-fake-cached-tokens: N` | report N cached prompt tokens |
| `x-fake-reasoning-tokens: N` | report N reasoning tokens (added to the completion tokens) |
| `x-fake-model: NAME` | answer as model NAME (an alias or deployment name the upstream resolves to another model) |
| `x-fake-prompt-tokens: RULE` | how prompt tokens are counted: `words` (default), `chars` (one per non-space character, as CJK tokenizes) or `bytes/N` (UTF-8 bytes / N, rounded up per text) |
| `x-fake-usage-chunk: SHAPE` | chat streams with include_usage: where the usage goes. `openai` (default, as above); `litellm` (LiteLLM's proxy: no `"usage": null`, the usage on a last chunk with `"choices": [{"index": 0, "delta": {}}]`); `vllm-continuous` (vLLM's `continuous_usage_stats`: the usage so far on every chunk, all of it on the `finish_reason` chunk, then the `choices: []` chunk); `on-finish` (only on the `finish_reason` chunk). Without include_usage every shape sends the same stream |

Timing knobs: `latency` delays every answer before its headers; `ttft` and `chunk_delay` only apply to
streams. A stream that is waiting notices a client disconnect, stops, and marks the recorded request
`disconnected=True` (so the proxy's cancellation can be tested).

A mid-stream disconnect returns from the ASGI callable without finishing the response: uvicorn then closes
the socket with the chunked body unterminated, so the client sees a broken stream, never a clean end.

Run standalone: `python -m orq_proxy.testing.fake_upstream --port 9000 [--host H] [--latency-ms N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

from orq_proxy.testing.fake_providers import handle_provider_path, is_provider_path

__all__ = [
    "DEFAULT_WORDS",
    "EMBEDDING_DIMENSIONS",
    "MODELS",
    "SYSTEM_FINGERPRINT",
    "TOKENS_PER_MESSAGE",
    "WORDS",
    "FakeUpstream",
    "RecordedRequest",
    "TokenCounter",
    "build_fake_upstream",
    "count_bytes",
    "count_chars",
    "count_words",
    "main",
]

DEFAULT_WORDS = 8
EMBEDDING_DIMENSIONS = 16
TOKENS_PER_MESSAGE = 4
SYSTEM_FINGERPRINT = "fp_fake0000"
MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini", "text-embedding-3-small", "gpt-3.5-turbo-instruct")
WORDS = (
    *("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "seven", "bright"),
    *("stars", "shine", "above", "quiet", "green", "hills", "and", "a", "calm", "river", "flows", "south"),
)

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "permission_error", None),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    408: ("Request timed out.", "timeout_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_USAGE_CHUNK_SHAPES = ("openai", "litellm", "vllm-continuous", "on-finish")  # `x-fake-usage-chunk`

# Responses API: the Response fields that are the same in every answer (the fake has no tools, no reasoning
# and no background mode), encoded once as a JSON fragment. Each snapshot of a response (created,
# in_progress, completed) is put together from fragments like this one instead of being encoded again.
_RESPONSE_FIXED = _dumps(
    {
        "background": False,
        "error": None,
        "parallel_tool_calls": True,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "user": None,
    }
)[1:-1]
# The `delta` of each `response.output_text.delta`, as JSON: the first word, then " word" by position.
_FIRST_DELTA = _dumps(WORDS[0])
_NEXT_DELTAS = tuple(_dumps(" " + word) for word in WORDS)
_EMPTY_TEXT_PART = '{"type":"output_text","annotations":[],"logprobs":[],"text":""}'


def count_words(text: str) -> int:
    """Tokens of one text under the fake's rule: whitespace-separated words."""
    return len(text.split())


def count_chars(text: str) -> int:
    """Tokens of one text under `x-fake-prompt-tokens: chars`: one per non-space character (as real
    tokenizers count CJK text, about one token per 3-byte character)."""
    return len(text) - sum(text.count(c) for c in " \t\n\r")


def count_bytes(bytes_per_token: int) -> Callable[[str], int]:
    """Tokens of one text under `x-fake-prompt-tokens: bytes/N`: its UTF-8 bytes / N, rounded up."""

    def count(text: str) -> int:
        return -(-len(text.encode("utf-8", "surrogatepass")) // bytes_per_token)

    return count


TokenCounter = Callable[[str], int]


def _content_words(content: Any, count: TokenCounter = count_words) -> int:
    if isinstance(content, str):
        return count(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += count(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += count(text)
        return total
    return 0


def _messages_tokens(messages: Any, count: TokenCounter = count_words) -> int:
    if not isinstance(messages, list):
        return 0
    total = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if isinstance(message, dict):
            total += _content_words(message.get("content"), count)
    return total


def _responses_prompt_tokens(body: dict[str, Any], count: TokenCounter = count_words) -> int:
    total = 0
    items = body.get("input")
    if isinstance(items, str):
        total += TOKENS_PER_MESSAGE + count(items)
    else:
        total += _messages_tokens(items, count)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += TOKENS_PER_MESSAGE + count(instructions)
    return total


def _response_echo(body: dict[str, Any]) -> str:
    """The Response fields that echo the request, as a JSON fragment (the same in every snapshot).

    A parameter the request leaves out (or sends as null) comes back as OpenAI's default. `input` is not in
    OpenAI's Response, but orq's (`orq_ai_sdk`) requires it: the input items, a string being one user message.
    """
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": items}]}]
    elif not isinstance(items, list):
        items = None
    return _dumps(
        {
            "model": body["model"],
            "input": items,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "prompt_cache_options": body.get("prompt_cache_options"),
            "prompt_cache_retention": body.get("prompt_cache_retention"),
            "safety_identifier": body.get("safety_identifier"),
            "store": bool(body.get("store", True)),
            "temperature": _or_default(body.get("temperature"), 1.0),
            "top_p": _or_default(body.get("top_p"), 1.0),
            "frequency_penalty": _or_default(body.get("frequency_penalty"), 0.0),
            "presence_penalty": _or_default(body.get("presence_penalty"), 0.0),
            "top_logprobs": _or_default(body.get("top_logprobs"), 0),
            "metadata": body.get("metadata") or {},
        }
    )[1:-1]


def _or_default(value: Any, default: float) -> Any:
    return default if value is None else value


def _inputs(value: Any) -> list[Any]:
    """Legacy prompt / embedding input as a list of items (strings or token arrays)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [value]  # one token array
        return value
    return []


def _input_tokens(item: Any, count: TokenCounter = count_words) -> int:
    if isinstance(item, str):
        return count(item)
    if isinstance(item, list):
        return len(item)
    return 0


@dataclass(slots=True)
class RecordedRequest:
    """One request the fake received.

    Attributes:
        method, path, query: as received (`path` includes `/v1`).
        headers: lower-case name -> value (the last one wins when repeated).
        body: raw body bytes; json: the parsed body, or None when it is not JSON.
        disconnected: the client went away while a stream was being produced.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any
    disconnected: bool = False


@dataclass(slots=True)
class _Plan:
    """What one answer looks like (defaults, overridden by `x-fake-*` headers)."""

    latency: float
    ttft: float
    chunk_delay: float
    words: int = DEFAULT_WORDS
    status: int = 0
    disconnect_after: int = -1
    omit_usage: bool = False
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_chunk: str = "openai"
    count: TokenCounter = count_words  # prompt tokens of one text (`x-fake-prompt-tokens`)
    answer_model: str = ""  # `x-fake-model`: the model the answer names (default: the requested one)


@dataclass(slots=True)
class _Stream:
    """Per-stream state: the events counted against `disconnect_after`, and the client's presence."""

    send: Send
    plan: _Plan
    record: RecordedRequest | None
    sent: int = 0
    gone: bool = False
    gone_event: asyncio.Event | None = None
    watcher: asyncio.Task[None] | None = field(default=None)


class _Abort(Exception):
    """Stop producing: the planned disconnect point was reached or the client left."""


class FakeUpstream:
    """The fake's ASGI app. Build it with `build_fake_upstream`.

    Attributes:
        requests: every request received (when recording), oldest first.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        ttft: float = 0.0,
        chunk_delay: float = 0.0,
        api_key: str | None = None,
        record: bool = True,
        words: int = DEFAULT_WORDS,
    ) -> None:
        if min(latency, ttft, chunk_delay) < 0:
            raise ValueError("latency, ttft and chunk_delay must be >= 0 seconds")
        if words < 0:
            raise ValueError("words must be >= 0")
        self.latency = latency
        self.ttft = ttft
        self.chunk_delay = chunk_delay
        self.api_key = api_key
        self.record = record
        self.words = words
        self.requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._post_routes: dict[
            str,
            Callable[
                [dict[str, Any], _Plan, Send, RecordedRequest | None, Receive], Coroutine[Any, Any, None]
            ],
        ] = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
        }
        models = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "system"} for m in MODELS]
        self._models_body = _dumps({"object": "list", "data": models}).encode()
        self._expected_auth = f"Bearer {api_key}" if api_key is not None else None

    def reset(self) -> None:
        """Forget the recorded requests."""
        self.requests.clear()

    def _next_id(self) -> str:
        return f"{next(self._ids):024x}"

    # --- entry point --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        # Anthropic's Messages API, Azure's layout: fake_providers.py (the first test keeps OpenAI's fast).
        if (path[:3] != "/v1" or path[:12] == "/v1/messages") and is_provider_path(path):
            await handle_provider_path(self, scope, receive, send)
            return
        plan = _Plan(self.latency, self.ttft, self.chunk_delay, self.words)
        authorization: str | None = None
        fake_headers: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name[:7] == b"x-fake-":
                fake_headers.append((name, value))
        if fake_headers:
            try:
                _apply_controls(plan, fake_headers)
            except ValueError as exc:
                await _send_error(send, 400, str(exc), "invalid_request_error", None)
                return

        body = b""
        if method == "POST":
            more = True
            chunks: list[bytes] = []
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        record: RecordedRequest | None = None
        if self.record:
            recorded = scope.get("fake.recorded")  # (path, query, headers) of an Azure-layout request
            record = RecordedRequest(
                method=method,
                path=recorded[0] if recorded else path,
                query=recorded[1] if recorded else scope.get("query_string", b"").decode("latin-1"),
                headers=recorded[2]
                if recorded
                else {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
                body=body,
                json=parsed,
            )
            self.requests.append(record)

        if self._expected_auth is not None and authorization != self._expected_auth:
            await _send_auth_error(send, authorization)
            return
        if plan.latency:
            await asyncio.sleep(plan.latency)
        if plan.status >= 400:
            text, type_, code = _ERRORS.get(plan.status, ("Fake upstream error.", "server_error", None))
            await _send_error(send, plan.status, text, type_, code)
            return

        if method == "GET":
            if path == "/v1/models":
                await _send_json_bytes(send, 200, self._models_body)
                return
            if path.startswith("/v1/models/"):
                await _send_json(
                    send,
                    200,
                    {
                        "id": path[len("/v1/models/") :],
                        "object": "model",
                        "created": 1700000000,
                        "owned_by": "system",
                    },
                )
                return
        handler = self._post_routes.get(path) if method == "POST" else None
        if handler is None:
            await _send_error(send, 404, f"Invalid URL ({method} {path})", "invalid_request_error", None)
            return
        if not isinstance(parsed, dict):
            await _send_error(
                send,
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
                "not valid JSON.)",
                "invalid_request_error",
                None,
            )
            return
        requested = parsed.get("model")
        if not isinstance(requested, str) or not requested:
            await _send_error(send, 400, "you must provide a model parameter", "invalid_request_error", None)
            return
        if plan.answer_model:  # an alias or deployment name answered by another model
            parsed = {**parsed, "model": plan.answer_model}
        await handler(parsed, plan, send, record, receive)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- shared pieces ---------------------------------------------------------------------------------

    @staticmethod
    def _answer_words(plan: _Plan, body: dict[str, Any], *cap_fields: str) -> tuple[int, bool]:
        """How many words to answer, and whether a max-tokens cap cut the answer short."""
        n = plan.words
        for name in cap_fields:
            cap = body.get(name)
            if isinstance(cap, int) and not isinstance(cap, bool):
                if cap < n:
                    return max(cap, 0), True
                break
        return n, False

    async def _start_stream(
        self, send: Send, plan: _Plan, record: RecordedRequest | None, receive: Receive
    ) -> _Stream:
        await send({"type": "http.response.start", "status": 200, "headers": self._headers(_SSE_HEADERS)})
        stream = _Stream(send, plan, record)
        if plan.ttft or plan.chunk_delay:
            # Only a stream that waits needs to notice a client that leaves; a fast one just finishes.
            stream.gone_event = asyncio.Event()
            stream.watcher = asyncio.ensure_future(_watch_disconnect(receive, stream))
        return stream

    def _headers(self, base: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [*base, (b"x-request-id", b"req_" + self._next_id().encode())]

    async def _run_stream(self, stream: _Stream, events: Sequence[bytes | None]) -> None:
        """Send events in order; `None` marks "a content event follows: apply chunk delay"."""
        try:
            plan = stream.plan
            if plan.ttft:
                await _pause(stream, plan.ttft)
            first_content = True
            for event in events:
                if event is None:
                    if not first_content and plan.chunk_delay:
                        await _pause(stream, plan.chunk_delay)
                    first_content = False
                    continue
                if stream.sent == plan.disconnect_after:
                    raise _Abort
                if stream.gone:
                    raise _Abort
                await stream.send({"type": "http.response.body", "body": event, "more_body": True})
                stream.sent += 1
            if stream.sent == plan.disconnect_after:
                raise _Abort
            await stream.send({"type": "http.response.body", "body": b"", "more_body": False})
        except _Abort:
            # Return without finishing the response: the server drops the connection mid-body.
            if stream.gone and stream.record is not None:
                stream.record.disconnected = True
        finally:
            if stream.watcher is not None:
                stream.watcher.cancel()

    # --- chat completions ------------------------------------------------------------------------------

    async def _chat(
        self, body: dict[str, Any], plan: _Plan, send: Send, record: RecordedRequest | None, receive: Receive
    ) -> None:
        model: str = body["model"]
        n_words, capped = self._answer_words(plan, body, "max_completion_tokens", "max_tokens")
        n = _count_field(body, "n")
        finish = "length" if capped else "stop"
        usage = _chat_usage(_messages_tokens(body.get("messages"), plan.count), n_words * n, plan)
        created = int(time.time())
        cid = "chatcmpl-" + self._next_id()
        if not body.get("stream"):
            answer: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": " ".join(_words(n_words)),
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for index in range(n)
                ],
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
            if not plan.omit_usage:
                answer["usage"] = usage
            await self._send_json(send, answer)
            return
        include_usage = _include_usage(body) and not plan.omit_usage
        shape = plan.usage_chunk if include_usage else ""
        head = (
            f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
            f'"model":{_dumps(model)},"service_tier":"default","system_fingerprint":"{SYSTEM_FINGERPRINT}",'
            f'"choices":[{{"index":0,"delta":'
        )
        tail = ',"usage":null}\n\n' if shape == "openai" else "}\n\n"
        events: list[bytes | None] = [
            (
                head
                + '{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]'
                + tail
            ).encode()
        ]
        for delta in _CHAT_DELTAS[:n_words] if n_words <= len(_CHAT_DELTAS) else _chat_deltas(n_words):
            events.append(None)
            events.append((head + delta + ',"logprobs":null,"finish_reason":null}]' + tail).encode())
        last = (head + f'{{}},"logprobs":null,"finish_reason":"{finish}"}}]' + tail).encode()
        events.append(last)
        if n > 1:  # each further choice streams the same chunks under its own index, one choice after another
            first = [e for e in events if e is not None]
            for index in range(1, n):
                marker = f'"choices":[{{"index":{index},'.encode()
                events.extend(e.replace(b'"choices":[{"index":0,', marker, 1) for e in first)
            last = first[-1].replace(b'"choices":[{"index":0,', f'"choices":[{{"index":{n - 1},'.encode(), 1)
        if shape == "litellm":
            events.append((head + '{}}],"usage":' + _dumps(usage) + "}\n\n").encode())
        elif shape == "on-finish":
            events[-1] = _with_usage(last, usage)
        elif shape:  # `openai`, or `vllm-continuous` (then usage on every chunk too)
            if shape == "vllm-continuous":
                _add_running_usage(events, usage)
            events.append(
                (
                    f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
                    f'"model":{_dumps(model)},"service_tier":"default","system_fingerprint":"{SYSTEM_FINGERPRINT}",'
                    f'"choices":[],"usage":{_dumps(usage)}}}\n\n'
                ).encode()
            )
        events.append(b"data: [DONE]\n\n")
        await self._run_stream(await self._start_stream(send, plan, record, receive), events)

    # --- legacy completions ----------------------------------------------------------------------------

    async def _completions(
        self, body: dict[str, Any], plan: _Plan, send: Send, record: RecordedRequest | None, receive: Receive
    ) -> None:
        model: str = body["model"]
        n_words, capped = self._answer_words(plan, body, "max_tokens")
        n = _count_field(body, "n")
        generated = max(n, _count_field(body, "best_of"))  # best_of candidates are generated and billed
        finish = "length" if capped else "stop"
        prompt_tokens = sum(_input_tokens(p, plan.count) for p in _inputs(body.get("prompt")))
        usage = _chat_usage(prompt_tokens, n_words * generated, plan)
        created = int(time.time())
        cid = "cmpl-" + self._next_id()
        if not body.get("stream"):
            answer: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [
                    {"text": " ".join(_words(n_words)), "index": i, "logprobs": None, "finish_reason": finish}
                    for i in range(n)
                ],
            }
            if not plan.omit_usage:
                answer["usage"] = usage
            await self._send_json(send, answer)
            return
        include_usage = _include_usage(body) and not plan.omit_usage
        head = f'data: {{"id":"{cid}","object":"text_completion","created":{created},"choices":[{{"text":'
        tail = f'"model":{_dumps(model)},"system_fingerprint":"{SYSTEM_FINGERPRINT}"' + (
            ',"usage":null}\n\n' if include_usage else "}\n\n"
        )
        events: list[bytes | None] = []
        for i, word in enumerate(_words(n_words)):
            events.append(None)
            text = word if i == 0 else " " + word
            events.append(
                (head + _dumps(text) + ',"index":0,"logprobs":null,"finish_reason":null}],' + tail).encode()
            )
        events.append((head + f'"","index":0,"logprobs":null,"finish_reason":"{finish}"}}],' + tail).encode())
        if include_usage:
            events.append(
                (
                    f'data: {{"id":"{cid}","object":"text_completion","created":{created},"choices":[],'
                    f'"model":{_dumps(model)},"system_fingerprint":"{SYSTEM_FINGERPRINT}",'
                    f'"usage":{_dumps(usage)}}}\n\n'
                ).encode()
            )
        events.append(b"data: [DONE]\n\n")
        await self._run_stream(await self._start_stream(send, plan, record, receive), events)

    # --- responses -------------------------------------------------------------------------------------

    async def _responses(
        self, body: dict[str, Any], plan: _Plan, send: Send, record: RecordedRequest | None, receive: Receive
    ) -> None:
        n_words, capped = self._answer_words(plan, body, "max_output_tokens")
        prompt_tokens = _responses_prompt_tokens(body, plan.count)
        usage_json = "null"
        if not plan.omit_usage:
            usage_json = _dumps(
                {
                    "input_tokens": prompt_tokens,
                    "input_tokens_details": {
                        "cached_tokens": min(plan.cached_tokens, prompt_tokens),
                        "cache_write_tokens": 0,
                        "cache_creation_tokens": 0,  # orq's name for the same thing; its SDK requires both
                    },
                    "output_tokens": n_words + plan.reasoning_tokens,
                    "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
                    "total_tokens": prompt_tokens + n_words + plan.reasoning_tokens,
                }
            )
        rid = "resp_" + self._next_id()
        mid = "msg_" + self._next_id()
        created = int(time.time())
        text = " ".join(_words(n_words))
        final_status = "incomplete" if capped else "completed"
        text_json = _dumps(text)
        part_json = f'{{"type":"output_text","annotations":[],"logprobs":[],"text":{text_json}}}'
        message_json = (
            f'{{"id":"{mid}","type":"message","status":"{final_status}","role":"assistant",'
            f'"content":[{part_json}]}}'
        )
        # Every snapshot of this response shares these fragments: only status, timing, output and usage vary.
        head = f'{{"id":"{rid}","object":"response","created_at":{created},"status":'
        rest = f",{_response_echo(body)},{_RESPONSE_FIXED}"
        if capped:
            ending = '"incomplete","completed_at":null,"incomplete_details":{"reason":"max_output_tokens"}'
        else:
            # The events are built before the stream starts, so "completed" is stamped with the start time.
            ending = f'"completed","completed_at":{created},"incomplete_details":null'
        final = f'{head}{ending}{rest},"output":[{message_json}],"usage":{usage_json}}}'
        if not body.get("stream"):
            await self._send_json_data(send, final.encode())
            return

        opening = (
            f'{head}"in_progress","completed_at":null,"incomplete_details":null'
            f'{rest},"output":[],"usage":null}}'
        )
        seq = itertools.count()

        def event(kind: str, fields: str) -> bytes:
            data = f'{{"type":"{kind}","sequence_number":{next(seq)},{fields}}}'
            return f"event: {kind}\ndata: {data}\n\n".encode()

        ids = f'"item_id":"{mid}","output_index":0,"content_index":0'
        events: list[bytes | None] = [
            event("response.created", '"response":' + opening),
            event("response.in_progress", '"response":' + opening),
            event(
                "response.output_item.added",
                f'"output_index":0,"item":{{"id":"{mid}","type":"message","status":"in_progress",'
                '"content":[],"role":"assistant"}',
            ),
            event("response.content_part.added", f'{ids},"part":{_EMPTY_TEXT_PART}'),
        ]
        for i in range(n_words):
            delta = _NEXT_DELTAS[i % len(WORDS)] if i else _FIRST_DELTA
            events.append(None)
            events.append(event("response.output_text.delta", f'{ids},"delta":{delta},"logprobs":[]'))
        events.append(event("response.output_text.done", f'{ids},"text":{text_json},"logprobs":[]'))
        events.append(event("response.content_part.done", f'{ids},"part":{part_json}'))
        events.append(event("response.output_item.done", f'"output_index":0,"item":{message_json}'))
        events.append(event(f"response.{final_status}", '"response":' + final))
        await self._run_stream(await self._start_stream(send, plan, record, receive), events)

    # --- embeddings ------------------------------------------------------------------------------------

    async def _embeddings(
        self, body: dict[str, Any], plan: _Plan, send: Send, record: RecordedRequest | None, receive: Receive
    ) -> None:
        inputs = _inputs(body.get("input"))
        dims = body.get("dimensions")
        if not isinstance(dims, int) or isinstance(dims, bool) or dims <= 0:
            dims = EMBEDDING_DIMENSIONS
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _vector(_input_tokens(item), index, dims)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        prompt_tokens = sum(_input_tokens(item, plan.count) for item in inputs)
        answer: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if not plan.omit_usage:
            answer["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        await self._send_json(send, answer)

    async def _send_json(self, send: Send, payload: dict[str, Any]) -> None:
        await self._send_json_data(send, _dumps(payload).encode())

    async def _send_json_data(self, send: Send, data: bytes) -> None:
        headers = self._headers(_JSON_HEADERS)
        headers.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def build_fake_upstream(
    *,
    latency: float = 0.0,
    ttft: float = 0.0,
    chunk_delay: float = 0.0,
    api_key: str | None = None,
    record: bool = True,
) -> FakeUpstream:
    """Build the OpenAI-compatible fake upstream (an ASGI app).

    Args:
        latency: seconds before every answer's headers.
        ttft: streams only: seconds between the headers and the first event.
        chunk_delay: streams only: seconds before each content event after the first.
        api_key: when set, a missing or different `Authorization: Bearer` gets OpenAI's 401.
        record: keep every request in `.requests` (turn off for long benchmark runs).

    Example:
        fake = build_fake_upstream()
        with serve_in_thread(fake) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert fake.requests[0].json["model"] == "gpt-4o"
    """
    return FakeUpstream(latency=latency, ttft=ttft, chunk_delay=chunk_delay, api_key=api_key, record=record)


# --- helpers -----------------------------------------------------------------------------------------


def _count_field(body: dict[str, Any], name: str) -> int:
    """`n` / `best_of` as the upstream reads it: a positive integer, 1 when absent or not one."""
    value = body.get(name)
    return value if type(value) is int and value > 1 else 1


def _words(n: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(n)]


def _chat_deltas(n: int) -> list[str]:
    return [_dumps({"content": w if i == 0 else " " + w}) for i, w in enumerate(_words(n))]


_CHAT_DELTAS = _chat_deltas(64)


def _vector(tokens: int, index: int, dims: int) -> list[float]:
    # Deterministic, exactly representable in float32 (multiples of 1/64), so base64 round-trips exactly.
    return [((tokens * 7 + index * 3 + i * 5) % 64) / 64.0 for i in range(dims)]


def _chat_usage(prompt_tokens: int, words: int, plan: _Plan) -> dict[str, Any]:
    completion = words + plan.reasoning_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": min(plan.cached_tokens, prompt_tokens), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _with_usage(event: bytes, usage: dict[str, Any]) -> bytes:
    """A chat chunk event (ending `}\\n\\n`) with a `usage` member added at its end."""
    return event[:-3] + b',"usage":' + _dumps(usage).encode() + b"}\n\n"


def _add_running_usage(events: list[bytes | None], usage: dict[str, Any]) -> None:
    """vLLM's `continuous_usage_stats`: each chunk carries the usage so far (its key order), the last
    chunk all of it."""
    prompt = usage["prompt_tokens"]
    n = 0  # tokens so far: the role chunk has none, each word chunk one more
    for i, event in enumerate(events):
        if event is None:
            continue
        so_far = {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}
        events[i] = _with_usage(event, usage if i == len(events) - 1 else so_far)
        n += 1


def _apply_controls(plan: _Plan, headers: list[tuple[bytes, bytes]]) -> None:
    for name, raw in headers:
        key = name.decode("latin-1")
        value = raw.decode("latin-1").strip()
        if key == "x-fake-omit-usage":
            plan.omit_usage = value.lower() not in ("", "0", "false", "no")
            continue
        if key == "x-fake-model":
            plan.answer_model = value
            continue
        if key == "x-fake-prompt-tokens":
            plan.count = _prompt_rule(value)
            continue
        if key == "x-fake-usage-chunk":
            if value.lower() not in _USAGE_CHUNK_SHAPES:
                raise ValueError(f"{key} must be one of {', '.join(_USAGE_CHUNK_SHAPES)}, got {value!r}")
            plan.usage_chunk = value.lower()
            continue
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
        if number < 0:
            raise ValueError(f"{key} must be >= 0, got {number}")
        if key == "x-fake-status":
            plan.status = number
        elif key == "x-fake-latency-ms":
            plan.latency = number / 1000
        elif key == "x-fake-ttft-ms":
            plan.ttft = number / 1000
        elif key == "x-fake-chunk-delay-ms":
            plan.chunk_delay = number / 1000
        elif key == "x-fake-words":
            plan.words = number
        elif key == "x-fake-disconnect-after":
            plan.disconnect_after = number
        elif key == "x-fake-cached-tokens":
            plan.cached_tokens = number
        elif key == "x-fake-reasoning-tokens":
            plan.reasoning_tokens = number
        # Unknown x-fake-* headers are ignored, like any unknown header.


def _prompt_rule(value: str) -> TokenCounter:
    """`x-fake-prompt-tokens`: `words` (the default), `chars` (one per non-space character, as CJK text
    tokenizes) or `bytes/N` (UTF-8 bytes / N, rounded up: `bytes/2` counts twice the 4-bytes rule)."""
    rule = value.lower()
    if rule == "words":
        return count_words
    if rule == "chars":
        return count_chars
    if rule.startswith("bytes/") and rule[6:].isdigit() and int(rule[6:]) > 0:
        return count_bytes(int(rule[6:]))
    raise ValueError(f"x-fake-prompt-tokens must be words, chars or bytes/N (N >= 1), got {value!r}")


async def _watch_disconnect(receive: Receive, stream: _Stream) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            stream.gone = True
            if stream.record is not None:
                stream.record.disconnected = True
            assert stream.gone_event is not None
            stream.gone_event.set()
            return


async def _pause(stream: _Stream, seconds: float) -> None:
    """Sleep, but wake up (and stop the stream) as soon as the client disconnects."""
    if stream.gone_event is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(stream.gone_event.wait(), seconds)
    except TimeoutError:
        return
    raise _Abort


async def _send_json_bytes(send: Send, status: int, data: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON_HEADERS, (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    await _send_json_bytes(send, status, _dumps(payload).encode())


async def _send_error(send: Send, status: int, message: str, type_: str, code: str | None) -> None:
    await _send_json(
        send, status, {"error": {"message": message, "type": type_, "param": None, "code": code}}
    )


async def _send_auth_error(send: Send, authorization: str | None) -> None:
    if not authorization or not authorization.startswith("Bearer "):
        await _send_error(
            send,
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank "
            "username) if you're accessing the API from your browser and are prompted for a username and "
            "password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
        )
        return
    key = authorization[len("Bearer ") :]
    masked = key[:3] + "*" * max(len(key) - 7, 0) + key[-4:] if len(key) > 7 else "*" * len(key)
    await _send_error(
        send,
        401,
        f"Incorrect API key provided: {masked}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        "invalid_api_key",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the fake upstream with uvicorn (uvloop and httptools when installed)."""
    parser = argparse.ArgumentParser(
        prog="python -m orq_proxy.testing.fake_upstream",
        description="OpenAI-compatible fake upstream (base URL: http://HOST:PORT/v1)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer's headers")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="streams: delay before the first event")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="streams: delay between content events"
    )
    parser.add_argument("--api-key", default=None, help="require this bearer key (OpenAI's 401 otherwise)")
    parser.add_argument("--record", action="store_true", help="keep every request in memory (off by default)")
    args = parser.parse_args(argv)

    import uvicorn

    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    http = "auto"
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is part of uvicorn[standard]
        pass
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:  # pragma: no cover
        pass
    app = build_fake_upstream(
        latency=args.latency_ms / 1000,
        ttft=args.ttft_ms / 1000,
        chunk_delay=args.chunk_delay_ms / 1000,
        api_key=args.api_key,
        record=args.record,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, http=http, log_level="warning", access_log=False, lifespan="on"
    )

    class _SayWhere(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # the port it really bound (`--port 0` picks one)
                port = self.servers[0].sockets[0].getsockname()[1]
                print(
                    f"fake upstream: http://{args.host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops it)",
                    flush=True,
                )

    run(_SayWhere(config).serve())


if __name__ == "__main__":
    main()
