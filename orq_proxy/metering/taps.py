"""Usage taps: read token usage from a response on the side, in bounded memory, without delaying it.

- `SSETap` reads a `text/event-stream` body chunk by chunk. It keeps only the unfinished tail of the
  current line (capped), splits on `\\n`, strips `\\r`, parses `data:` lines as JSON, skips `[DONE]` and
  junk, and keeps the last `usage` and `model` it saw: chat/legacy-completions chunks' `usage`, and the
  Responses API's `response.completed` (`response.usage`). It also counts the text of content deltas, for
  an estimate when usage never arrives. `SSETap.rewrite` is the same reader in rewriting mode: it hides
  the usage that exists only because the proxy asked for it: `"usage":null` fields, `usage` objects on
  whatever chunk carries them, and the chunks left with nothing else for the client.
- `JSONTap` keeps a capped copy of a non-stream body (plus a rolling window of its last bytes, where
  OpenAI puts `usage`) and parses it once at the end.

Neither imports starlette or httpx; both are plain synchronous objects, one per request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from orq_proxy.usage.pricing import TokenUsage

__all__ = [
    "DEFAULT_JSON_CAP",
    "DEFAULT_LINE_CAP",
    "DEFAULT_REWRITE_LINE_CAP",
    "JSON_TAIL_BYTES",
    "AnthropicSSETap",
    "JSONTap",
    "ReportedUsage",
    "SSETap",
    "output_text_bytes",
    "parse_anthropic_usage",
    "parse_usage",
]

DEFAULT_LINE_CAP = 4 * 1024 * 1024  # one SSE line; `response.completed` repeats the whole answer
DEFAULT_REWRITE_LINE_CAP = 64 * 1024  # rewriting holds back at most this much of an unfinished line
DEFAULT_JSON_CAP = 4 * 1024 * 1024  # copy of a non-stream body
JSON_TAIL_BYTES = 64 * 1024  # rolling window of a body's last bytes, searched when the copy overflowed

_DATA = b"data:"
_DONE = b"[DONE]"
_TERMINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# `"usage":null` as a key of the chunk object. Inside JSON strings quotes are escaped, so `"usage"` with
# both quotes unescaped is a key or a whole string value; the rewrite only edits bytes in place when it
# occurs exactly once in the chunk.
_USAGE_NULL_AFTER = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])')
_USAGE_NULL_FIRST = re.compile(rb'(?<=\{)\s*"usage"\s*:\s*null\s*(,\s*)?')
_USAGE_NULL_COMPACT = b',"usage":null}'  # how OpenAI ends every chunk of a stream that includes usage
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]*)"')
_DECODER = json.JSONDecoder()
# One scan for what makes a line worth parsing: a `usage` object, an `error` key, or a Responses event
# type (group 1; `*.delta` events are not worth it).
_INTEREST = re.compile(rb'"(?:usage"\s*:\s*\{|error"|type"\s*:\s*"([^"\\]*)")')
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
# Generated text in a chunk: chat `content`/`refusal`/`reasoning_content`, tool `arguments`, legacy
# `text`, Responses `delta`. Escapes count as their escaped length (close enough for an estimate).
_TEXT = re.compile(rb'"(?:content|text|delta|arguments|refusal|reasoning_content)"\s*:\s*"((?:[^"\\]|\\.)*)"')
_PARSE_FIRST = 1  # data lines always parsed at the start of a stream (the model that answers)


class ReportedUsage(NamedTuple):
    """Usage as the upstream reported it: the token counts, and its `total_tokens` (or their sum)."""

    tokens: TokenUsage
    total_tokens: int


def _count(value: Any) -> int:
    """A token count: a non-negative int (bools and junk count as 0)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def parse_usage(usage: Any) -> ReportedUsage | None:
    """A `usage` object in any OpenAI shape -> `ReportedUsage`, or None when it is not one.

    Chat/legacy completions/embeddings: `prompt_tokens`, `completion_tokens`, `prompt_tokens_details`
    (`cached_tokens`, `audio_tokens`), `completion_tokens_details` (`reasoning_tokens`, `audio_tokens`).
    Responses API: `input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`,
    `output_tokens_details.reasoning_tokens`.
    """
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return None
    get = usage.get
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        inp, out = get("prompt_tokens"), get("completion_tokens")
        in_details, out_details = get("prompt_tokens_details"), get("completion_tokens_details")
    elif "input_tokens" in usage or "output_tokens" in usage:
        inp, out = get("input_tokens"), get("output_tokens")
        in_details, out_details = get("input_tokens_details"), get("output_tokens_details")
    else:
        return None
    # Plain non-negative ints (what every upstream sends) are taken as they are; anything else goes through
    # `_count`. This runs once per request.
    if type(inp) is not int or inp < 0:
        inp = _count(inp)
    if type(out) is not int or out < 0:
        out = _count(out)
    cached = audio_in = reasoning = audio_out = 0
    if type(in_details) is dict or isinstance(in_details, Mapping):  # (the ABC check is slower)
        cached = _count(in_details.get("cached_tokens"))
        audio_in = _count(in_details.get("audio_tokens"))
    if type(out_details) is dict or isinstance(out_details, Mapping):
        reasoning = _count(out_details.get("reasoning_tokens"))
        audio_out = _count(out_details.get("audio_tokens"))
    total = get("total_tokens")
    if total is None:
        total = inp + out
    elif type(total) is not int or total < 0:
        total = _count(total)
    return ReportedUsage(TokenUsage(inp, out, cached, reasoning, audio_in, audio_out), total)


def parse_anthropic_usage(usage: Any) -> ReportedUsage | None:
    """Anthropic's `usage` -> `ReportedUsage`, or None when it is not one.

    Anthropic's `input_tokens` leaves out the prompt-cache reads (`cache_read_input_tokens`) and writes
    (`cache_creation_input_tokens`, split by TTL in `cache_creation.ephemeral_5m_input_tokens` /
    `ephemeral_1h_input_tokens`); here, as for OpenAI, `input_tokens` is all of the input, with the reads
    in `cached_input_tokens` and the writes in `cache_write_tokens` (`cache_write_1h_tokens` the 1-hour
    part of them), so each is priced once, at its own rate.
    """
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return None
    if "input_tokens" not in usage and "output_tokens" not in usage:
        return None
    get = usage.get
    inp, out = _count(get("input_tokens")), _count(get("output_tokens"))
    read = _count(get("cache_read_input_tokens"))
    write = _count(get("cache_creation_input_tokens"))
    write_1h = 0
    split = get("cache_creation")
    if type(split) is dict or isinstance(split, Mapping):
        write_5m = _count(split.get("ephemeral_5m_input_tokens"))
        write_1h = _count(split.get("ephemeral_1h_input_tokens"))
        write = max(write, write_5m + write_1h)
        write_1h = min(write_1h, write)
    total_in = inp + read + write
    tokens = TokenUsage(
        input_tokens=total_in,
        output_tokens=out,
        cached_input_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=write_1h,
    )
    return ReportedUsage(tokens, total_in + out)


def _merge_anthropic_usage(into: dict[str, Any], usage: Any) -> None:
    """Fold one stream event's `usage` into what the earlier ones said: a later non-null figure wins
    (`message_delta` repeats the running output and may carry the input and cache figures, the TTL split
    among them, that `message_start` did not)."""
    if not isinstance(usage, dict):
        return
    for key, value in usage.items():
        if value is None:
            continue
        if key == "cache_creation" and isinstance(value, dict):
            split = into.get("cache_creation")
            merged = dict(split) if isinstance(split, dict) else {}
            merged.update({k: v for k, v in value.items() if v is not None})
            into[key] = merged
        else:
            into[key] = value


def _text_len(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else 0


def _choices_text_bytes(choices: Any, part: str) -> int:
    """Text of `choices[*].<part>` (`delta` or `message`: content, refusal, reasoning, tool arguments)
    and of legacy `choices[*].text`."""
    n = 0
    if not isinstance(choices, list):
        return 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        n += _text_len(choice.get("text"))
        msg = choice.get(part)
        if not isinstance(msg, dict):
            continue
        n += _text_len(msg.get("content")) + _text_len(msg.get("refusal"))
        n += _text_len(msg.get("reasoning_content"))
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    n += _text_len(call["function"].get("arguments"))
    return n


def output_text_bytes(obj: Any) -> int:
    """Bytes of generated text in a non-stream response (chat, legacy completions, Responses API)."""
    if not isinstance(obj, dict):
        return 0
    n = _choices_text_bytes(obj.get("choices"), "message")
    if obj.get("type") == "message":  # Anthropic's: text, thinking and tool-input blocks
        n += _anthropic_blocks_bytes(obj.get("content"))
    output = obj.get("output")
    if isinstance(output, list):
        for item in output:
            if not isinstance(item, dict):
                continue
            n += _text_len(item.get("arguments"))
            content = item.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict):
                        n += _text_len(part.get("text"))
    return n


class SSETap:
    """Reads usage from a server-sent-event stream, one chunk at a time.

    Use `feed(chunk)` to observe bytes that are forwarded unchanged, or `rewrite(chunk)` to get the bytes
    to forward with the injected usage hidden (see `hide_usage`). Call `close()` at the end of the body.

    Args:
        hide_usage: rewriting mode: remove the top-level `usage` member (null or an object) from every
            chunk, and drop a chunk with a `usage` object that carries nothing else for the client (and
            the blank line that ends its event): OpenAI's and vLLM's `"choices": []`, LiteLLM's
            `[{"index": 0, "delta": {}}]`. A chunk that still has content (text, a role, a tool call,
            logprobs, a finish_reason) is forwarded without its usage. The proxy sets this when it
            injected `stream_options.include_usage` for a client that did not ask for it, so the client
            sees what it would have seen without it; the usage is read all the same.
        line_cap: the longest line kept; a longer line is skipped (and, when rewriting, passed through
            as it arrives rather than held back).

    Attributes:
        usage: the last usage seen (None until one is). model: the last `model` seen.
        output_bytes: bytes of generated text in content deltas (for an estimate).
        events: `data:` lines parsed. done: `[DONE]` or a terminal Responses event was seen.
        error: the stream carried an error object or a `response.failed`/`error` event.
        overflowed: a line longer than `line_cap` was skipped.
    """

    __slots__ = (
        "_drop_blank",
        "_parsed",
        "_passthrough",
        "_tail",
        "done",
        "error",
        "events",
        "hide_usage",
        "line_cap",
        "model",
        "output_bytes",
        "overflowed",
        "usage",
    )

    def __init__(self, *, hide_usage: bool = False, line_cap: int | None = None) -> None:
        self.hide_usage = hide_usage
        self.line_cap = line_cap or (DEFAULT_REWRITE_LINE_CAP if hide_usage else DEFAULT_LINE_CAP)
        self._tail = b""
        self._passthrough = False  # rewriting: the current line overflowed and is being passed through
        self._drop_blank = False
        self._parsed = 0
        self.usage: ReportedUsage | None = None
        self.model: str | None = None
        self.output_bytes = 0
        self.events = 0
        self.done = False
        self.error = False
        self.overflowed = False

    # -- observing ---------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        """Observe `chunk` (forwarded unchanged by the caller)."""
        if not chunk:
            return
        if self._tail:
            chunk = self._tail + chunk
            self._tail = b""
        start = 0
        while True:
            if not self._passthrough:
                stop = self._plain_end(chunk, start)
                if stop > start:
                    self._bulk_observe(chunk[start:stop])
                    start = stop
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if self._passthrough:  # the rest of an over-long line: skip it
                self._passthrough = False
            else:
                self._observe(chunk[start:end])
            start = end + 1
        rest = chunk[start:]
        if self._passthrough:
            return
        if len(rest) > self.line_cap:
            self.overflowed = True
            self._passthrough = True
        else:
            self._tail = rest

    def close(self) -> None:
        """End of body: a last line without a newline still counts."""
        if self._tail and not self._passthrough:
            self._observe(self._tail)
        self._tail = b""

    # -- rewriting ---------------------------------------------------------------------------------
    def rewrite(self, chunk: bytes, *, final: bool = False) -> bytes:
        """Observe `chunk` and return the bytes to forward now: every complete line (rewritten when
        `hide_usage`), holding back only the unfinished last line. `final=True` flushes that too."""
        out: list[bytes] = []
        if self._tail:
            chunk = self._tail + chunk
            self._tail = b""
        start = 0
        bulk = True
        while True:
            if bulk and not self._passthrough and not self._drop_blank:
                stop = self._plain_end(chunk, start)
                if stop > start:
                    region = chunk[start:stop]
                    if not self.hide_usage:
                        self._bulk_observe(region)
                        out.append(region)
                        start = stop
                    elif self._only_usage_null(region):
                        self._bulk_observe(region)
                        out.append(region.replace(_USAGE_NULL_COMPACT, b"}"))
                        start = stop
                    else:  # `"usage"` in an unusual form: line by line for the rest of this chunk
                        bulk = False
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if self._passthrough:
                self._passthrough = False
                out.append(chunk[start : end + 1])
            else:
                kept = self._rewrite_line(chunk[start:end])
                if kept is not None:
                    out.append(kept + b"\n")
            start = end + 1
        rest = chunk[start:]
        if rest:
            if final:
                if self._passthrough:
                    out.append(rest)
                else:
                    kept = self._rewrite_line(rest)
                    if kept is not None:
                        out.append(kept)
                self._passthrough = False
            elif self._passthrough or len(rest) > self.line_cap:
                # Too long to hold back: forward it as it comes, unparsed and unchanged.
                if not self._passthrough:
                    self.overflowed = True
                self._passthrough = True
                out.append(rest)
            else:
                self._tail = rest
        return out[0] if len(out) == 1 else b"".join(out)

    def _rewrite_line(self, raw: bytes) -> bytes | None:
        """The line to forward (None = drop it). `raw` has no `\\n`; it may end with `\\r`."""
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            if self._drop_blank:  # the blank line ending a dropped event
                self._drop_blank = False
                return None
            return raw
        self._drop_blank = False
        obj = self._observe(raw)
        if not self.hide_usage or b'"usage"' not in raw:
            return raw
        if obj is None:  # not parsed: its usage is not an object, so it is (at most) `"usage":null`
            return _strip_usage_null(raw)
        if not isinstance(obj, dict) or "usage" not in obj:
            return raw
        usage = obj["usage"]
        if usage is None:
            return _strip_usage_null(raw, obj)
        if not isinstance(usage, dict):
            return raw
        if _carries_nothing(obj):  # only there to carry the usage (OpenAI's, vLLM's, LiteLLM's shapes)
            self._drop_blank = True
            return None
        return _strip_usage_object(raw, obj)  # usage on a content chunk (vLLM continuous stats, ...)

    # -- the bulk path -----------------------------------------------------------------------------
    # Most of a stream is content chunks that only add generated text. Whole lines that cannot matter (no
    # `usage` object, error, Responses event or `[DONE]`, after the first parsed line) are read together:
    # a few C-level scans count their data lines and measure their text, and rewriting removes their
    # `"usage":null` with one `bytes.replace`. Only the lines that matter are read one by one.
    def _plain_end(self, chunk: bytes, start: int) -> int:
        """The end (just after a newline) of the run of whole plain lines at `chunk[start:]`; `start` when
        there is none (or while the first lines must still be parsed)."""
        if self._parsed < _PARSE_FIRST:
            return start
        stop = chunk.rfind(b"\n", start) + 1
        if stop <= start:
            return start
        match = _INTEREST.search(chunk, start, stop)
        first = match.start() if match is not None else stop
        done = chunk.find(_DONE, start, first)
        if done >= 0:
            first = done
        if first < stop:  # stop before the line that holds it
            stop = chunk.rfind(b"\n", start, first) + 1
        return max(stop, start)

    def _bulk_observe(self, region: bytes) -> None:
        """Count the data lines and the text of a run of whole plain lines."""
        self.events += region.count(b"\n" + _DATA) + region.startswith(_DATA)
        self.output_bytes += _fast_text_bytes(region)

    @staticmethod
    def _only_usage_null(region: bytes) -> bool:
        """Every data line of these whole lines ends with its own compact `,"usage":null}` and holds no
        other `"usage"` (how OpenAI sends each chunk of a stream that includes usage), so one
        `bytes.replace` removes exactly what the line-by-line rewrite would."""
        usages = region.count(b'"usage"')
        if not usages:
            return True
        lines = region.count(b"\n" + _DATA) + region.startswith(_DATA)
        at_end = region.count(_USAGE_NULL_COMPACT + b"\n") + region.count(_USAGE_NULL_COMPACT + b"\r\n")
        return usages == lines == at_end

    # -- parsing -----------------------------------------------------------------------------------
    def _observe(self, raw: bytes) -> Any:
        """Read one line. Most content chunks take a fast path (substring checks and one regex for the
        generated text); a line that can matter (the first few, one with a `usage` object, an error, a
        non-delta Responses event, `[DONE]`) is parsed as JSON and returned (None otherwise)."""
        if not raw.startswith(_DATA):
            return None
        if self._parsed < _PARSE_FIRST or len(raw) < 16:
            return self._parse(raw)
        interest = _INTEREST.search(raw)
        if interest is not None:
            kind = interest.group(1)
            if kind is None or not kind.endswith(b".delta"):  # usage object, error, non-delta event
                return self._parse(raw)
        self.events += 1
        self.output_bytes += _fast_text_bytes(raw)
        return None

    def _parse(self, raw: bytes) -> Any:
        payload = raw[5:].strip()  # also strips `\r` and the optional space after the colon
        if not payload:
            return None
        if payload == _DONE:
            self.done = True
            return None
        try:
            obj = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return obj
        self._parsed += 1
        self.events += 1
        model = obj.get("model")
        if isinstance(model, str):
            self.model = model
        usage = obj.get("usage")
        if usage is not None:
            parsed = parse_usage(usage)
            if parsed is not None:
                self.usage = parsed
        kind = obj.get("type")
        if isinstance(kind, str):  # Responses API event
            self._observe_response_event(kind, obj)
        else:
            self.output_bytes += _choices_text_bytes(obj.get("choices"), "delta")
            if obj.get("error") is not None:
                self.error = True
        return obj

    def _observe_response_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind.endswith(".delta"):
            self.output_bytes += _text_len(obj.get("delta"))
            return
        response = obj.get("response")
        if isinstance(response, dict):
            model = response.get("model")
            if isinstance(model, str):
                self.model = model
            parsed = parse_usage(response.get("usage"))
            if parsed is not None:
                self.usage = parsed
        if kind in _TERMINAL_RESPONSE_EVENTS:
            self.done = True
        if kind in ("response.failed", "error"):
            self.error = True


def _anthropic_blocks_bytes(content: Any) -> int:
    n = 0
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict):
                n += _text_len(block.get("text")) + _text_len(block.get("thinking"))
                if block.get("input") is not None:
                    n += len(json.dumps(block["input"]))
    return n


# Anthropic stream events: the generated text of a `content_block_delta` (`text_delta`, `thinking_delta`,
# `input_json_delta`), found without parsing the line.
_ANTHROPIC_DELTA_TEXT = re.compile(rb'"(?:text|thinking|partial_json)"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ANTHROPIC_DELTA = b'"content_block_delta"'


class AnthropicSSETap:
    """Reads usage from an Anthropic Messages stream (`message_start` ... `message_stop`), chunk by chunk.

    `message_start` carries the input usage (and the cache reads and writes); each `message_delta` the
    output so far, and possibly input and cache figures again (the 1-hour cache-write split may arrive
    only there); later figures win. The stream's usage (`usage`) is known once a `message_delta` with
    usage arrived; before that only the input (`input_usage`, from `message_start`): a stream cut short
    is then estimated from that exact input and the text received. Content deltas are counted without
    parsing the line. Same interface as `SSETap` (feed/close; `usage`, `model`, `output_bytes`, `events`,
    `done`, `error`, `overflowed`); it never rewrites (Anthropic streams always carry their usage).
    """

    __slots__ = (
        "_merged",
        "_passthrough",
        "_tail",
        "done",
        "error",
        "events",
        "hide_usage",
        "input_usage",
        "line_cap",
        "model",
        "output_bytes",
        "overflowed",
        "usage",
    )

    def __init__(self, *, line_cap: int | None = None) -> None:
        self.hide_usage = False
        self.line_cap = line_cap or DEFAULT_LINE_CAP
        self._tail = b""
        self._passthrough = False
        self._merged: dict[str, Any] = {}
        self.usage: ReportedUsage | None = None
        self.input_usage: ReportedUsage | None = None
        self.model: str | None = None
        self.output_bytes = 0
        self.events = 0
        self.done = False
        self.error = False
        self.overflowed = False

    def feed(self, chunk: bytes) -> None:
        """Observe `chunk` (forwarded unchanged by the caller)."""
        if not chunk:
            return
        if self._tail:
            chunk = self._tail + chunk
            self._tail = b""
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if self._passthrough:
                self._passthrough = False
            else:
                self._observe(chunk[start:end])
            start = end + 1
        rest = chunk[start:]
        if self._passthrough:
            return
        if len(rest) > self.line_cap:
            self.overflowed = True
            self._passthrough = True
        else:
            self._tail = rest

    def close(self) -> None:
        """End of body: a last line without a newline still counts."""
        if self._tail and not self._passthrough:
            self._observe(self._tail)
        self._tail = b""

    def _observe(self, raw: bytes) -> None:
        if not raw.startswith(_DATA):
            return  # `event:` lines name the type that the data's own `type` repeats
        self.events += 1
        if _ANTHROPIC_DELTA in raw:  # most of a stream: text deltas
            for match in _ANTHROPIC_DELTA_TEXT.finditer(raw):
                self.output_bytes += match.end(1) - match.start(1)
            return
        try:
            obj = json.loads(raw[5:])
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                model = message.get("model")
                if isinstance(model, str):
                    self.model = model
                _merge_anthropic_usage(self._merged, message.get("usage"))
                self.input_usage = parse_anthropic_usage(self._merged)
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                _merge_anthropic_usage(self._merged, usage)
                self.usage = parse_anthropic_usage(self._merged)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = True


def _fast_text_bytes(raw: bytes) -> int:
    """Generated text in a content line: the common compact keys by substring search, else the regex."""
    for key in (b'"content":"', b'"delta":"', b'"text":"'):
        pos = raw.find(key)
        if pos < 0:
            continue
        n = 0
        while pos >= 0:
            match = _JSON_STRING.match(raw, pos + len(key) - 1)
            if match is None:
                break
            n += match.end() - match.start() - 2
            pos = raw.find(key, match.end())
        return n
    return sum(len(text) for text in _TEXT.findall(raw))


def _strip_usage_null(raw: bytes, obj: dict[str, Any] | None = None) -> bytes:
    """`raw` without its top-level `"usage":null` member, touching no other byte when possible."""
    if raw.count(b'"usage"') == 1:  # the key is nowhere else (nested, or as a string value)
        at = raw.find(b',"usage":null')  # the compact form OpenAI sends: no regex needed
        if at >= 0 and raw[at + 13 : at + 14] in (b"}", b","):
            return raw[:at] + raw[at + 13 :]
        new, n = _USAGE_NULL_AFTER.subn(b"", raw)
        if n != 1:
            new, n = _USAGE_NULL_FIRST.subn(b"", raw)
        if n == 1:
            return new
    # Unusual spacing, or `"usage"` also elsewhere in the chunk: re-serialize this one chunk.
    if obj is None:
        try:
            obj = json.loads(raw[5:])
        except ValueError:
            return raw
        if not isinstance(obj, dict) or "usage" not in obj or obj["usage"] is not None:
            return raw
    return _reserialized_without_usage(raw, obj)


def _strip_usage_object(raw: bytes, obj: dict[str, Any]) -> bytes:
    """`raw` (a parsed chunk whose top-level `usage` is an object) without that member, touching no
    other byte when possible."""
    if raw.count(b'"usage"') == 1:  # the top-level key is the only one
        key = raw.find(b'"usage"')
        match = _USAGE_KEY.match(raw, key)
        if match is not None:
            brace = match.end() - 1
            # The line parsed, so it is valid UTF-8; the decoder finds where the object ends.
            text = raw[brace:].decode("utf-8", "surrogateescape")
            try:
                value, end = _DECODER.raw_decode(text)
            except ValueError:  # pragma: no cover - the whole line parsed
                value, end = None, -1
            if end > 0 and value == obj["usage"]:  # (not a nested one, were the top key spelled oddly)
                cut = _cut_member(raw, key, brace + len(text[:end].encode("utf-8", "surrogateescape")))
                if cut is not None:
                    return cut
    return _reserialized_without_usage(raw, obj)


def _cut_member(raw: bytes, start: int, end: int) -> bytes | None:
    """`raw` without the object member at `raw[start:end]` and the comma that joins it, as
    `_USAGE_NULL_AFTER`/`_USAGE_NULL_FIRST` cut `"usage":null`; None when it is not delimited as one."""
    before = start
    while before > 0 and raw[before - 1] in b" \t":
        before -= 1
    after = end
    while after < len(raw) and raw[after] in b" \t":
        after += 1
    prev, nxt = raw[before - 1 : before], raw[after : after + 1]
    if prev == b"," and nxt in (b",", b"}"):  # not the first member: cut from the comma before it
        return raw[: before - 1] + raw[end:]
    if prev == b"{" and nxt == b",":  # the first member: cut through the comma after it
        after += 1
        while after < len(raw) and raw[after] in b" \t":
            after += 1
        return raw[:before] + raw[after:]
    return None  # (never the only member: a chunk of nothing but usage is dropped whole)


def _reserialized_without_usage(raw: bytes, obj: dict[str, Any]) -> bytes:
    """The chunk re-serialized (compactly) without its top-level `usage`: the fallback for unusual bytes."""
    rest = {k: v for k, v in obj.items() if k != "usage"}
    line_end = b"\r" if raw.endswith(b"\r") else b""
    return b"data: " + json.dumps(rest, separators=(",", ":"), ensure_ascii=False).encode() + line_end


def _carries_nothing(obj: dict[str, Any]) -> bool:
    """A chunk with a `usage` object has nothing else for the client: no choices, or only choices whose
    every member but `index` is empty (LiteLLM's `{"index": 0, "delta": {}}`, an empty legacy `text`)."""
    choices = obj.get("choices")
    if choices is None:
        return True
    if type(choices) is not list:
        return False
    for choice in choices:
        if type(choice) is not dict:
            return False
        for key, value in choice.items():
            if key != "index" and not _is_empty(value):
                return False
    return True


def _is_empty(value: Any) -> bool:
    """null, `""`, `[]`, or an object of only such members: nothing a client would accumulate."""
    if value is None or value == "" or value == []:
        return True
    return type(value) is dict and all(_is_empty(v) for v in value.values())


class JSONTap:
    """Reads usage from a non-stream JSON body, in bounded memory and without parsing the whole body.

    It keeps the body's chunks up to `cap` bytes (past that, only a rolling window of the last
    `JSON_TAIL_BYTES`). At `close()` it decodes just the last `"usage": {...}` object (OpenAI puts it after
    the payload) and reads `model` from the head, so a multi-megabyte embeddings answer costs the same as
    a short chat one. Only when there is no usage (an estimate is coming) is a body within the cap parsed
    whole, to count its generated text.

    Attributes (after `close()`): usage, model, output_bytes (generated text; counted only when there
    is no usage), error (`{"error": ...}` body without usage), overflowed, size (bytes seen).
    """

    __slots__ = (
        "_chunks",
        "_parse_usage",
        "_tail",
        "cap",
        "error",
        "model",
        "output_bytes",
        "overflowed",
        "size",
        "usage",
    )

    def __init__(self, *, cap: int = DEFAULT_JSON_CAP, anthropic: bool = False) -> None:
        self.cap = cap
        self._parse_usage = parse_anthropic_usage if anthropic else parse_usage
        self._chunks: list[bytes] = []
        self._tail = bytearray()
        self.size = 0
        self.overflowed = False
        self.usage: ReportedUsage | None = None
        self.model: str | None = None
        self.output_bytes = 0
        self.error = False

    def feed(self, chunk: bytes) -> None:
        """Observe `chunk` (forwarded unchanged by the caller)."""
        if not chunk:
            return
        self.size += len(chunk)
        if not self.overflowed:
            self._chunks.append(chunk)
            if self.size <= self.cap:
                return
            self.overflowed = True
            self._tail = bytearray(b"".join(self._chunks)[-JSON_TAIL_BYTES:])
            self._chunks = []
            return
        self._tail += chunk
        if len(self._tail) > JSON_TAIL_BYTES:
            del self._tail[: len(self._tail) - JSON_TAIL_BYTES]

    def close(self) -> None:
        """Find usage (and model) in what was kept."""
        buf = bytes(self._tail) if self.overflowed else b"".join(self._chunks)
        self._chunks = []
        self._tail = bytearray()
        model = _MODEL.search(buf, 0, 4096)
        if model is not None:
            self.model = model.group(1).decode("utf-8", "replace")
        self.usage = _last_usage(buf, max(0, len(buf) - JSON_TAIL_BYTES), self._parse_usage)
        if self.usage is not None or self.overflowed:
            return
        try:  # no usage: the whole (capped) body, for the text an estimate needs
            obj = json.loads(buf)
        except ValueError:
            return
        if isinstance(obj, dict):
            self.output_bytes = output_text_bytes(obj)
            self.error = obj.get("error") is not None


def _last_usage(
    buf: bytes, start: int, parse: Callable[[Any], ReportedUsage | None] = parse_usage
) -> ReportedUsage | None:
    """The last `"usage": {...}` object at or after `start` that `parse` reads as usage."""
    # Backwards from the end: each `"usage"` (last first) that starts a `"usage": {` match.
    at = len(buf)
    while (at := buf.rfind(b'"usage"', start, at)) >= 0:
        match = _USAGE_KEY.match(buf, at)
        if match is None:
            continue
        brace = match.end() - 1
        try:
            value, _ = _DECODER.raw_decode(buf[brace:].decode("utf-8", "replace"))
        except ValueError:
            continue
        parsed = parse(value)
        if parsed is not None:
            return parsed
    return None
