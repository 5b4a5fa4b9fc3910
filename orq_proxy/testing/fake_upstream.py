"""A fake upstream: a fast raw ASGI app for tests, the demo and benchmarks, speaking OpenAI's API,
Anthropic's Messages API and Azure OpenAI's layout.

It answers in the shapes the official SDKs parse (`openai`, `openai.AzureOpenAI`, `anthropic`: ids, `object`
names, `usage` blocks, SSE framing), with deterministic content and token counts, so the proxy's metering can
be checked to the token. It is also the benchmarks' upstream, so it precomputes what it can, uses stdlib
`json` only, and builds SSE events from string templates; a request for one of OpenAI's routes pays one
dict lookup for the other two APIs.

OpenAI routes (under `/v1`; the base URL given to a client or to the proxy is `http://HOST:PORT/v1`):

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
- `POST /v1/responses/compact`: the input's user messages, then one `compaction` item (`object:
  "response.compaction"`); `usage` counts the input as above and `words` output tokens.
- `GET /v1/responses/{id}`: a Response made before (not with `"store": false`), as it ended; the newest
  4,096 are kept. Another id: 404 `Response with id '...' not found.`
- `GET /v1/models`, `GET /v1/models/{id}`.
Anything else is 404 with OpenAI's `Invalid URL (METHOD /path)` error, except the paths below.

Anthropic routes (a client's or proxy's base URL is `http://HOST:PORT`; the SDK adds `/v1/messages`):
- `POST /v1/messages`: JSON, or SSE with `"stream": true`: `message_start` (the message with `content: []`,
  `stop_reason: null` and the input usage with `output_tokens: 1`, as Anthropic sends), `content_block_start`,
  `ping`, one `content_block_delta` (`text_delta`) per word, `content_block_stop`, `message_delta`
  (`stop_reason`; `usage` with the cumulative `output_tokens`, repeating `input_tokens` and the two cache
  totals, as Anthropic now does), `message_stop`. Each event is `event: NAME` + `data: {"type": NAME, ...}`.
- `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, N being the message's whole input (below).
- Checks, in this order, each refused in Anthropic's shape `{"type": "error", "error": {"type", "message"},
  "request_id"}` (also sent as the `request-id` header): another path under `/v1/messages`, or any unknown
  path sent with `anthropic-version`: 404 `not_found_error`; with an `api_key`, the key as `x-api-key` or
  `Authorization: Bearer` (anthropic>=2 sends the latter), else 401 `authentication_error`; no
  `anthropic-version` header: 400; then `x-fake-status`; then the body: `model`, a non-empty `messages` list
  and (not for count_tokens) `max_tokens`, a positive integer, else 400 `invalid_request_error`.
- The echoed `model` is the requested one (or `x-fake-model`); `stop_reason` is `end_turn`, or `max_tokens`
  when the words were capped.

Azure OpenAI routes (`openai.AzureOpenAI(azure_endpoint="http://HOST:PORT")`):
- `POST /openai/deployments/{deployment}/chat/completions|completions|embeddings?api-version=V`, answered by
  the OpenAI routes above (same words, usage and knobs). The body's `model` is optional and ignored: the
  answer names the deployment's model (`azure_models`, default the deployment's name, `x-fake-model` wins).
  Recorded with its Azure path and query, `api="azure"`, `deployment` and `api_version`.
- Checks, in this order, in Azure's shape `{"error": {"code", "message"}}`: another path, or no `api-version`
  (Azure answers both alike): 404 `Resource not found`; an `api-version` that is not `YYYY-MM-DD[-preview]`:
  400 `API version not supported`; with an `api_key`, the `api-key` header (a bearer token is not taken):
  401 `Access denied due to invalid subscription key...`; then `x-fake-status` (code `"429"`, ...).
- JSON answers (chat, legacy completions) carry `prompt_filter_results` and each choice's
  `content_filter_results`. Streams open with Azure's prompt-filter chunk (`"choices": []`, `"id": ""`,
  `"model": ""`, `prompt_filter_results`); every choice carries `content_filter_results`; chat streams then
  send, after the last `finish_reason` chunk and before the usage chunk, one content-filter annotation per
  choice with no `delta` (`content_filter_results`, `content_filter_offsets`; off with
  `x-fake-azure-filter-chunks: 0`). With `stream_options.include_usage` these chunks carry `"usage": null`
  and the usage chunk is last before `[DONE]`, as for OpenAI.

Deterministic usage:
- Prompt tokens: the number of whitespace-separated words in every text the request carries, plus 4 per
  message. Chat: each message's `content` (a string, or the `text` of its text parts). Responses: `input`
  as a string counts as one message; as a list, each item's `content` (string or parts); `instructions`
  count as one more message. Legacy completions and embeddings: words of each prompt/input string (token
  arrays count their length), no per-message overhead; embeddings have no completion tokens.
- `n` (chat, legacy completions) answers that many choices, each of the same words; legacy `best_of`
  generates (and bills) `max(n, best_of)`: `completion_tokens` counts every generated choice. A legacy
  `prompt` list (of strings or token arrays) is completed prompt by prompt: `n` choices for each.
- Completion: `words` words (default 8, or `x-fake-words`), capped by `max_completion_tokens`,
  `max_tokens` (chat, completions) or `max_output_tokens` (responses); a capped answer ends with
  `finish_reason: "length"` (responses: `status: "incomplete"`). One word per content chunk.
- `completion_tokens` = words + reasoning tokens (OpenAI counts reasoning in completion tokens);
  `cached_tokens` (never more than the prompt) and `reasoning_tokens` are 0 unless a header asks.
- The echoed `model` is the requested model (or `x-fake-model`).
- Anthropic: the whole input is the words of `system` (a string or text blocks; counted as one more message,
  4 more tokens, when not empty) and of each message's content (a string, or blocks: a block's `text`, a
  `tool_result`'s content; images, tool_use and others count 0), plus 4 per message, under the
  `x-fake-prompt-tokens` rule. Tools count 0. `count_tokens` answers that whole input. Anthropic's
  `input_tokens` excludes the cache: the `x-fake-cache-*` reads, then 5-minute writes, then 1-hour writes
  are carved out of the whole input in that order, each capped by what is left, so `input_tokens +
  cache_creation_input_tokens + cache_read_input_tokens` is always the whole input, and
  `cache_creation` = `{"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"}` splits the writes.
  `output_tokens` = the words (a stream's `message_start` says 1). `service_tier` is `"standard"`.
  `x-fake-cached-tokens` and `x-fake-reasoning-tokens` are OpenAI-only.

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
| `x-fake-cache-read-tokens: N` | Anthropic: N of the input read from the cache (`cache_read_input_tokens`) |
| `x-fake-cache-write-tokens: N` | Anthropic: N of the input written to the 5-minute cache |
| `x-fake-cache-write-1h-tokens: N` | Anthropic: N of the input written to the 1-hour cache |
| `x-fake-anthropic-late-usage: 1` | Anthropic streams: the `cache_creation` TTL split only in `message_delta`, not in `message_start` (the totals stay in both) |
| `x-fake-stream-error: N` | Anthropic streams: after N text deltas (or all, if fewer), an `event: error` (`overloaded_error`), then the stream ends cleanly |
| `x-fake-azure-filter-chunks: 0` | Azure chat streams: no delta-less content-filter chunk (on by default) |
| `x-fake-usage-chunk: SHAPE` | chat streams with include_usage: where the usage goes. `openai` (default, as above); `litellm` (LiteLLM's proxy: no `"usage": null`, the usage on a last chunk with `"choices": [{"index": 0, "delta": {}}]`); `vllm-continuous` (vLLM's `continuous_usage_stats`: the usage so far on every chunk, all of it on the `finish_reason` chunk, then the `choices: []` chunk); `on-finish` (only on the `finish_reason` chunk). Without include_usage every shape sends the same stream |

Every knob works on all three APIs unless the table says otherwise (`x-fake-status` answers in each API's
error shape; 529 is Anthropic's `overloaded_error`; `x-fake-omit-usage` leaves no `usage` anywhere, in
`message_start` and `message_delta` included; `x-fake-disconnect-after` counts Anthropic's `ping` too).

Timing knobs: `latency` delays every answer before its headers; `ttft` and `chunk_delay` only apply to
streams. A stream that is waiting notices a client disconnect, stops, and marks the recorded request
`disconnected=True` (so the proxy's cancellation can be tested).

A mid-stream disconnect returns from the ASGI callable without finishing the response: uvicorn then closes
the socket with the chunked body unterminated, so the client sees a broken stream, never a clean end.

Run standalone: `python -m orq_proxy.testing.fake_upstream --port 9000 [--host H] [--latency-ms N]
[--azure-model DEPLOYMENT=MODEL ...]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import re
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

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
# How many Responses the fake keeps for `GET /v1/responses/{id}` (the oldest is forgotten first).
_STORED_RESPONSES = 4096
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
_FLAG_HEADERS = {  # yes/no `x-fake-*` headers -> their `_Plan` field
    "x-fake-omit-usage": "omit_usage",
    "x-fake-anthropic-late-usage": "late_usage",
    "x-fake-azure-filter-chunks": "azure_filter_chunks",
}

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
        api: which API the request was answered as: `"openai"`, `"anthropic"` or `"azure"`.
        deployment, api_version: Azure requests only: the deployment named in the path and the
            `api-version` query parameter (None when absent).
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any
    disconnected: bool = False
    api: str = "openai"
    deployment: str | None = None
    api_version: str | None = None


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
    # Anthropic only: cache reads and writes carved out of the prompt, the late TTL split, a stream error.
    cache_read: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    late_usage: bool = False
    stream_error: int = 0  # after this many text deltas (0: never)
    # Azure only: answering an Azure request (filter results), and its delta-less content-filter chunk.
    azure: bool = False
    azure_filter_chunks: bool = True


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
        azure_models: dict[str, str] | None = None,
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
        self.azure_models = dict(azure_models or {})
        self.requests: list[RecordedRequest] = []
        self._stored_responses: dict[str, bytes] = {}  # `GET /v1/responses/{id}`; the newest, bounded
        self._ids = itertools.count(1)
        self._post_routes: dict[
            str,
            Callable[
                [dict[str, Any], _Plan, Send, RecordedRequest | None, Receive], Coroutine[Any, Any, None]
            ],
        ] = {
            "/v1/chat/completions": self._chat,
            "/v1/responses": self._responses,
            "/v1/responses/compact": self._compact,
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
        # Only a path that is none of OpenAI's is looked at further, so the benchmarks' requests pay one
        # dict lookup for the other APIs. Anthropic's are told apart by path, or, for a path no API has,
        # by the `anthropic-version` header every Anthropic client sends (its 404 is Anthropic's).
        if path not in self._post_routes and path[:10] != "/v1/models":
            if path[:8] == "/openai/":
                await self._azure(scope, receive, send)
                return
            if path[:12] == "/v1/messages" or any(k == b"anthropic-version" for k, _ in scope["headers"]):
                await self._anthropic(scope, receive, send)
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
            record = RecordedRequest(
                method=method,
                path=path,
                query=scope.get("query_string", b"").decode("latin-1"),
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
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
            if path[:14] == "/v1/responses/":
                stored = self._stored_responses.get(path[14:])
                if stored is None:
                    await _send_error(
                        send, 404, f"Response with id '{path[14:]}' not found.", "invalid_request_error", None
                    )
                else:
                    await _send_json_bytes(send, 200, stored)
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
        self,
        send: Send,
        plan: _Plan,
        record: RecordedRequest | None,
        receive: Receive,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> _Stream:
        if headers is None:
            headers = self._headers(_SSE_HEADERS)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
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
            if plan.azure:
                _add_azure_filter_results(answer)
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
        if plan.azure:
            _azureize_chat_stream(events, n, n_words, plan, shape == "openai")
        events.append(b"data: [DONE]\n\n")
        await self._run_stream(await self._start_stream(send, plan, record, receive), events)

    # --- legacy completions ----------------------------------------------------------------------------

    async def _completions(
        self, body: dict[str, Any], plan: _Plan, send: Send, record: RecordedRequest | None, receive: Receive
    ) -> None:
        model: str = body["model"]
        n_words, capped = self._answer_words(plan, body, "max_tokens")
        prompts = _inputs(body.get("prompt")) or [""]
        # Every prompt of a list is completed: `n` choices each (`index` = prompt * n + choice), `best_of`
        # candidates each generated and billed.
        n = _count_field(body, "n") * len(prompts)
        generated = max(_count_field(body, "n"), _count_field(body, "best_of")) * len(prompts)
        finish = "length" if capped else "stop"
        prompt_tokens = sum(_input_tokens(p, plan.count) for p in prompts)
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
            if plan.azure:
                _add_azure_filter_results(answer)
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
        if plan.azure:
            events.insert(0, _azure_prompt_filter_chunk(include_usage))
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
        if body.get("store") is not False:  # as OpenAI does by default: retrievable by id
            stored = self._stored_responses
            stored[rid] = final.encode()
            if len(stored) > _STORED_RESPONSES:
                del stored[next(iter(stored))]
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

    async def _compact(
        self, body: dict[str, Any], plan: _Plan, send: Send, record: RecordedRequest | None, receive: Receive
    ) -> None:
        """`POST /v1/responses/compact`: the conversation's user messages, then one opaque compaction item
        of `words` output tokens; `usage` counts the input as `/v1/responses` does."""
        prompt_tokens = _responses_prompt_tokens(body, plan.count)
        output_tokens = plan.words + plan.reasoning_tokens
        items = body.get("input")
        if isinstance(items, str):
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": items}]}]
        kept = (
            [i for i in items if isinstance(i, dict) and i.get("role") == "user"]
            if isinstance(items, list)
            else []
        )
        compaction = {
            "type": "compaction",
            "id": "cmp_" + self._next_id(),
            "encrypted_content": "fake:" + "x" * 16,
        }
        payload = {
            "id": "resp_" + self._next_id(),
            "object": "response.compaction",
            "created_at": int(time.time()),
            "output": [*kept, compaction],
            "usage": None
            if plan.omit_usage
            else {
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": min(plan.cached_tokens, prompt_tokens)},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
                "total_tokens": prompt_tokens + output_tokens,
            },
        }
        await self._send_json_data(send, _dumps(payload).encode())

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

    # --- Azure OpenAI --------------------------------------------------------------------------------

    async def _azure(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`/openai/deployments/{deployment}/{operation}?api-version=V`, answered by the OpenAI routes as
        the deployment's model, with Azure's filter results, errors and key header."""
        method: str = scope["method"]
        path: str = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        match = _AZURE_PATH.fullmatch(path)
        deployment = match.group(1) if match else None
        versions = parse_qs(query).get("api-version")
        api_version = versions[-1] if versions else None
        body = await _read_body(receive) if method == "POST" else b""
        if body is None:
            return
        parsed = _parse_json(body)
        record: RecordedRequest | None = None
        if self.record:
            record = RecordedRequest(
                method,
                path,
                query,
                headers,
                body,
                parsed,
                api="azure",
                deployment=deployment,
                api_version=api_version,
            )
            self.requests.append(record)
        handler = self._post_routes.get("/v1" + match.group(2)) if match and method == "POST" else None
        if handler is None or api_version is None:
            # Azure answers a request without `api-version` as it answers an unknown path.
            await _send_azure_error(send, 404, "404", "Resource not found")
            return
        if not _AZURE_API_VERSION.fullmatch(api_version):
            await _send_azure_error(send, 400, "BadRequest", "API version not supported")
            return
        if self.api_key is not None and headers.get("api-key") != self.api_key:
            await _send_azure_error(send, 401, "401", _AZURE_ACCESS_DENIED)
            return
        plan = _Plan(self.latency, self.ttft, self.chunk_delay, self.words, azure=True)
        try:
            _apply_controls(plan, [(k, v) for k, v in scope["headers"] if k[:7] == b"x-fake-"])
        except ValueError as exc:
            await _send_azure_error(send, 400, "BadRequest", str(exc))
            return
        if plan.latency:
            await asyncio.sleep(plan.latency)
        if plan.status >= 400:
            code, message = _AZURE_ERRORS.get(plan.status, (str(plan.status), "Fake upstream error."))
            await _send_azure_error(send, plan.status, code, message)
            return
        if not isinstance(parsed, dict):
            await _send_azure_error(send, 400, "BadRequest", "The request body must be a JSON object.")
            return
        # Azure ignores the body's `model`: the deployment decides, and answers with its model's name.
        assert deployment is not None
        model = plan.answer_model or self.azure_models.get(deployment, deployment)
        await handler({**parsed, "model": model}, plan, send, record, receive)

    # --- Anthropic Messages --------------------------------------------------------------------------

    async def _anthropic(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`POST /v1/messages` and `POST /v1/messages/count_tokens`, with Anthropic's checks and errors."""
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        body = await _read_body(receive) if method == "POST" else b""
        if body is None:
            return
        parsed = _parse_json(body)
        record: RecordedRequest | None = None
        if self.record:
            query = scope.get("query_string", b"").decode("latin-1")
            record = RecordedRequest(method, path, query, headers, body, parsed, api="anthropic")
            self.requests.append(record)
        request_id = "req_" + self._next_id()
        if method != "POST" or path not in _ANTHROPIC_PATHS:
            await _send_anthropic_error(send, 404, "Not Found", request_id)
            return
        if self.api_key is not None:
            # Anthropic takes the key as `x-api-key`, or as a bearer token (what anthropic>=2 sends).
            key = headers.get("x-api-key")
            authorization = headers.get("authorization", "")
            if key is None and authorization[:7] == "Bearer ":
                key = authorization[7:]
            if key != self.api_key:
                message = "x-api-key header is required" if key is None else "invalid x-api-key"
                await _send_anthropic_error(send, 401, message, request_id)
                return
        if "anthropic-version" not in headers:
            await _send_anthropic_error(send, 400, "anthropic-version: header is required", request_id)
            return
        plan = _Plan(self.latency, self.ttft, self.chunk_delay, self.words)
        try:
            _apply_controls(plan, [(k, v) for k, v in scope["headers"] if k[:7] == b"x-fake-"])
        except ValueError as exc:
            await _send_anthropic_error(send, 400, str(exc), request_id)
            return
        if plan.latency:
            await asyncio.sleep(plan.latency)
        if plan.status >= 400:
            await _send_anthropic_error(send, plan.status, "Fake upstream error.", request_id)
            return
        problem = _anthropic_problem(parsed, count_only=path == "/v1/messages/count_tokens")
        if problem:
            await _send_anthropic_error(send, 400, problem, request_id)
            return
        prompt = _anthropic_prompt_tokens(parsed, plan.count)
        if path == "/v1/messages/count_tokens":
            await _send_json_bytes(send, 200, _dumps({"input_tokens": prompt}).encode(), request_id)
            return
        await self._messages(parsed, prompt, plan, send, record, receive, request_id)

    async def _messages(
        self,
        body: dict[str, Any],
        prompt: int,
        plan: _Plan,
        send: Send,
        record: RecordedRequest | None,
        receive: Receive,
        request_id: str,
    ) -> None:
        # The cache reads and writes are carved out of the prompt, in this order, never more than it:
        # Anthropic's `input_tokens` is what is left (total input = input + cache creation + cache read).
        read = min(plan.cache_read, prompt)
        write_5m = min(plan.cache_write, prompt - read)
        write_1h = min(plan.cache_write_1h, prompt - read - write_5m)
        input_usage: dict[str, Any] = {
            "input_tokens": prompt - read - write_5m - write_1h,
            "cache_creation_input_tokens": write_5m + write_1h,
            "cache_read_input_tokens": read,
        }
        split = {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h}
        max_tokens: int = body["max_tokens"]
        n_words = min(plan.words, max_tokens)
        stop_reason = "max_tokens" if plan.words > max_tokens else "end_turn"
        model = plan.answer_model or body["model"]
        message: dict[str, Any] = {
            "id": "msg_" + self._next_id(),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": " ".join(_words(n_words))}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if body.get("stream") is not True:
            if not plan.omit_usage:
                message["usage"] = {
                    **input_usage,
                    "cache_creation": split,
                    "output_tokens": n_words,
                    "service_tier": "standard",
                }
            await _send_json_bytes(send, 200, _dumps(message).encode(), request_id)
            return

        message["content"] = []
        message["stop_reason"] = None
        start_usage = {**input_usage, "output_tokens": 1, "service_tier": "standard"}  # 1, as Anthropic sends
        delta_usage = {**input_usage, "output_tokens": n_words}  # cumulative, repeating the input figures
        if plan.late_usage:
            delta_usage["cache_creation"] = split  # the TTL split only here, at the end
        else:
            start_usage["cache_creation"] = split
        if not plan.omit_usage:
            message["usage"] = start_usage
        events: list[bytes | None] = [
            _anthropic_event("message_start", {"message": message}),
            _anthropic_event(
                "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
            ),
            _ANTHROPIC_PING,
        ]
        for i, word in enumerate(_words(n_words)):
            if plan.stream_error and i == plan.stream_error:
                break
            events.append(None)
            events.append(
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                b'"delta":{"type":"text_delta","text":'
                + _dumps(" " + word if i else word).encode()
                + b"}}\n\n"
            )
        if plan.stream_error:
            error = {"type": "overloaded_error", "message": "Overloaded"}
            events.append(_anthropic_event("error", {"error": error, "request_id": request_id}))
        else:
            delta: dict[str, Any] = {"delta": {"stop_reason": stop_reason, "stop_sequence": None}}
            if not plan.omit_usage:
                delta["usage"] = delta_usage
            events.append(_anthropic_event("content_block_stop", {"index": 0}))
            events.append(_anthropic_event("message_delta", delta))
            events.append(_ANTHROPIC_STOP)
        headers = [*_SSE_HEADERS, (b"request-id", request_id.encode())]
        await self._run_stream(await self._start_stream(send, plan, record, receive, headers), events)


def build_fake_upstream(
    *,
    latency: float = 0.0,
    ttft: float = 0.0,
    chunk_delay: float = 0.0,
    api_key: str | None = None,
    record: bool = True,
    azure_models: dict[str, str] | None = None,
) -> FakeUpstream:
    """Build the fake upstream (an ASGI app): OpenAI's API, Anthropic's Messages API and Azure's layout.

    Args:
        latency: seconds before every answer's headers.
        ttft: streams only: seconds between the headers and the first event.
        chunk_delay: streams only: seconds before each content event after the first.
        api_key: when set, a missing or different key gets a 401 in each API's shape: OpenAI's routes
            read `Authorization: Bearer`, Anthropic's `x-api-key` and Azure's `api-key`.
        azure_models: Azure deployment -> the model it answers as (`{"prod": "gpt-4o-mini-2024-07-18"}`);
            a deployment not listed answers as its own name.
        record: keep every request in `.requests` (turn off for long benchmark runs).

    Example:
        fake = build_fake_upstream()
        with serve_in_thread(fake) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert fake.requests[0].json["model"] == "gpt-4o"
    """
    return FakeUpstream(
        latency=latency,
        ttft=ttft,
        chunk_delay=chunk_delay,
        api_key=api_key,
        record=record,
        azure_models=azure_models,
    )


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


# --- Azure helpers -------------------------------------------------------------------------------------

_AZURE_PATH = re.compile(r"/openai/deployments/([^/]+)(/chat/completions|/completions|/embeddings)")
_AZURE_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
_AZURE_ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)
_AZURE_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Invalid request."),
    403: ("403", "Access denied."),
    404: ("DeploymentNotFound", "The API deployment for this resource does not exist."),
    408: ("Timeout", "The operation was timeout."),
    429: ("429", "Requests have exceeded the token rate limit of your current pricing tier."),
    500: ("InternalServerError", "The service is temporarily unable to process your request."),
}
_SAFE = {"filtered": False, "severity": "safe"}
_NOT_DETECTED = {"filtered": False, "detected": False}
_AZURE_PROMPT_RESULTS = {
    "hate": _SAFE,
    "jailbreak": _NOT_DETECTED,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
_AZURE_CHOICE_RESULTS = {
    "hate": _SAFE,
    "protected_material_code": _NOT_DETECTED,
    "protected_material_text": _NOT_DETECTED,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
_AZURE_PROMPT_FILTER = _dumps([{"prompt_index": 0, "content_filter_results": _AZURE_PROMPT_RESULTS}])
_AZURE_CHOICE_FILTER = _dumps(_AZURE_CHOICE_RESULTS)


def _add_azure_filter_results(answer: dict[str, Any]) -> None:
    """A JSON answer as Azure sends it: the prompt's filter results, and each choice's."""
    answer["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": _AZURE_PROMPT_RESULTS}]
    for choice in answer["choices"]:
        choice["content_filter_results"] = _AZURE_CHOICE_RESULTS


def _azure_prompt_filter_chunk(usage_null: bool) -> bytes:
    """Azure's first stream chunk: no choices, no model, the prompt's filter results."""
    usage = ',"usage":null' if usage_null else ""
    return (
        f'data: {{"choices":[],"created":0,"id":"","model":"","object":"",'
        f'"prompt_filter_results":{_AZURE_PROMPT_FILTER}{usage}}}\n\n'
    ).encode()


def _azureize_chat_stream(
    events: list[bytes | None], n: int, n_words: int, plan: _Plan, usage_null: bool
) -> None:
    """A chat stream in Azure's shape, in place: the prompt-filter chunk first, `content_filter_results`
    on every choice, and (unless `x-fake-azure-filter-chunks: 0`) after the last `finish_reason` chunk
    one content-filter annotation per choice, without a `delta` (Azure's asynchronous filter)."""
    last_finish = -1
    for i, event in enumerate(events):
        if event is None:
            continue
        if b'"finish_reason":"' in event:
            last_finish = i
        events[i] = event.replace(
            b'"logprobs":null,"finish_reason":',
            b'"logprobs":null,"content_filter_results":{},"finish_reason":',
            1,
        )
    if plan.azure_filter_chunks:
        end = len(" ".join(_words(n_words)))  # the offsets are character positions in the answer
        usage = ',"usage":null' if usage_null else ""
        annotations = [
            (
                f'data: {{"choices":[{{"index":{index},"finish_reason":null,'
                f'"content_filter_results":{_AZURE_CHOICE_FILTER},'
                f'"content_filter_offsets":{{"check_offset":{end},"start_offset":0,"end_offset":{end}}}}}],'
                f'"created":0,"id":"","model":"","object":""{usage}}}\n\n'
            ).encode()
            for index in range(n)
        ]
        events[last_finish + 1 : last_finish + 1] = annotations
    events.insert(0, _azure_prompt_filter_chunk(usage_null))


async def _send_azure_error(send: Send, status: int, code: str, message: str) -> None:
    await _send_json(send, status, {"error": {"code": code, "message": message}})


# --- Anthropic helpers ---------------------------------------------------------------------------------

_ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ANTHROPIC_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_ANTHROPIC_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _anthropic_event(kind: str, fields: dict[str, Any]) -> bytes:
    """One Anthropic SSE event: `event: NAME`, then JSON data whose `type` is that name."""
    return f"event: {kind}\ndata: {_dumps({'type': kind, **fields})}\n\n".encode()


async def _send_anthropic_error(send: Send, status: int, message: str, request_id: str) -> None:
    error_type = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    payload = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}
    await _send_json_bytes(send, status, _dumps(payload).encode(), request_id)


def _anthropic_problem(body: Any, *, count_only: bool) -> str | None:
    """What Anthropic would refuse in this body (400 invalid_request_error), or None."""
    if not isinstance(body, dict):
        return "The request body is not valid JSON."
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "model: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list):
        return "messages: Field required"
    if not messages:
        return "messages: at least one message is required"
    if count_only:
        return None
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return "max_tokens: Field required"
    if type(max_tokens) is not int or max_tokens < 1:
        return "max_tokens: Input should be a positive integer"
    return None


def _anthropic_blocks_tokens(content: Any, count: TokenCounter) -> int:
    """A content string, or blocks: each block's `text`, and a `tool_result`'s content; others 0."""
    if isinstance(content, str):
        return count(content)
    total = 0
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            text = block.get("text")
            if isinstance(text, str):
                total += count(text)
            elif block.get("type") == "tool_result":
                total += _anthropic_blocks_tokens(block.get("content"), count)
    return total


def _anthropic_prompt_tokens(body: dict[str, Any], count: TokenCounter = count_words) -> int:
    """The whole input: words of every text plus 4 per message, a system prompt being one more message."""
    total = 0
    system = body.get("system")
    if isinstance(system, (str, list)) and system:
        total += TOKENS_PER_MESSAGE + _anthropic_blocks_tokens(system, count)
    for message in body["messages"]:
        total += TOKENS_PER_MESSAGE
        if isinstance(message, dict):
            total += _anthropic_blocks_tokens(message.get("content"), count)
    return total


# --- request helpers -----------------------------------------------------------------------------------


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client left first. (The OpenAI routes inline this.)"""
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _apply_controls(plan: _Plan, headers: list[tuple[bytes, bytes]]) -> None:
    for name, raw in headers:
        key = name.decode("latin-1")
        value = raw.decode("latin-1").strip()
        if key in _FLAG_HEADERS:
            setattr(plan, _FLAG_HEADERS[key], value.lower() not in ("", "0", "false", "no"))
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
        elif key == "x-fake-cache-read-tokens":
            plan.cache_read = number
        elif key == "x-fake-cache-write-tokens":
            plan.cache_write = number
        elif key == "x-fake-cache-write-1h-tokens":
            plan.cache_write_1h = number
        elif key == "x-fake-stream-error":
            plan.stream_error = number
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


async def _send_json_bytes(send: Send, status: int, data: bytes, request_id: str | None = None) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(data)).encode())]
    if request_id is not None:  # Anthropic's answers name their request (the SDK reads `request-id`)
        headers.append((b"request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
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
        description="fake upstream: OpenAI at http://HOST:PORT/v1, Anthropic and Azure OpenAI at http://HOST:PORT",
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
    parser.add_argument(
        "--azure-model",
        action="append",
        default=[],
        metavar="DEPLOYMENT=MODEL",
        help="the model an Azure deployment answers as (repeatable)",
    )
    args = parser.parse_args(argv)
    azure_models = dict(item.partition("=")[::2] for item in args.azure_model)

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
        azure_models=azure_models,
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
                    f"fake upstream: http://{args.host}:{port}/v1 (OpenAI; Anthropic and Azure at the root; "
                    "Ctrl-C stops it)",
                    flush=True,
                )

    run(_SayWhere(config).serve())


if __name__ == "__main__":
    main()
