"""Token estimates for when usage is not known yet (budget reservations) or never arrives (disconnects,
upstreams that omit usage). A conservative ~4 bytes per token, rounded up, as OpenAI's rule of thumb."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = [
    "BYTES_PER_TOKEN",
    "IMAGE_TOKENS",
    "MAX_OUTPUT_TOKENS",
    "MAX_RESERVED_OUTPUT_TOKENS",
    "estimate_input_tokens",
    "estimate_tokens_from_bytes",
    "max_output_tokens",
    "output_multiplier",
]

BYTES_PER_TOKEN = 4
_OUTPUT_CAP_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Keys whose values are not text the model reads as tokens (`source` is looked at: an Anthropic image).
_NOT_TEXT_KEYS = frozenset({"role", "type", "name", "image_url", "source"})
# What one image in Anthropic's Messages API counts as (in bytes of text, 4 per token): Anthropic bills
# width x height / 750 tokens and scales an image down to fit 1.15 megapixels (1,092 x 1,092 is 1,590
# tokens) first, so 1,600 tokens bounds any image it accepts, whatever the size of its base64 `data`,
# which bytes/4 would count as a quarter million tokens a megabyte (and refuse under a small budget).
IMAGE_TOKENS = 1_600
_IMAGE_BYTES = IMAGE_TOKENS * 4
# The largest output cap an estimate takes at face value (OpenAI's own limit is a 32-bit integer). A
# client's `max_tokens: 1e300` is capped here, so a budget reservation stays a sane 64-bit number.
MAX_OUTPUT_TOKENS = 2**31 - 1
# The most output a reservation counts (cap x multiplier): a client's `n: 1e9` makes a huge reservation that
# any budget refuses, while the nano-USD amount (tokens x the dearest per-token rate) stays far below 2**63,
# which the Redis counters' integer arithmetic needs.
MAX_RESERVED_OUTPUT_TOKENS = 2**40


def estimate_tokens_from_bytes(n: int) -> int:
    """Tokens in `n` bytes of text (rounded up; 0 for nothing)."""
    return -(-n // BYTES_PER_TOKEN) if n > 0 else 0


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text in `value` (strings, nested in lists and objects, minus framing keys).

    Iterative, so no nesting depth can exhaust the recursion limit; an unpaired surrogate counts as the
    3 bytes `surrogatepass` gives it instead of failing the estimate.
    """
    total = 0
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node) if node.isascii() else len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, child in node.items():  # (strings counted here: most of a body's values are)
                if key in _NOT_TEXT_KEYS:
                    if key == "source":  # Anthropic's image or document: what it counts, not its bytes
                        if node.get("type") == "image":
                            total += _IMAGE_BYTES
                        else:
                            stack.append(child)
                    continue
                if type(child) is str:
                    total += len(child) if child.isascii() else len(child.encode("utf-8", "surrogatepass"))
                else:
                    stack.append(child)
    return total


def _json_bytes(value: Any) -> int:
    """Length of `value` as JSON; never raises (a value json cannot encode counts as its text)."""
    try:
        return len(json.dumps(value).encode())
    except (ValueError, TypeError, RecursionError):
        return _text_bytes(value)


def estimate_input_tokens(body: dict[str, Any] | None, raw_len: int = 0) -> int:
    """Input tokens of a request: the text of `messages` / `input` / `prompt` / `instructions` / `system`
    (Anthropic's) (+4 per message for framing) and the JSON of `tools`, else the raw body length."""
    if body is None:
        return estimate_tokens_from_bytes(raw_len)
    tokens = 0
    found = False
    for key in ("messages", "input", "prompt", "instructions", "system", "tools"):
        if key in body:
            found = True
            value = body[key]
            tokens += estimate_tokens_from_bytes(_text_bytes(value) if key != "tools" else _json_bytes(value))
            if key == "messages" and isinstance(value, list):
                tokens += 4 * len(value)
    return tokens if found else estimate_tokens_from_bytes(raw_len)


def max_output_tokens(body: dict[str, Any] | None, default: int) -> int:
    """The output cap the client set (`max_completion_tokens`, `max_tokens`, `max_output_tokens`), else `default`."""
    if body:
        for key in _OUTPUT_CAP_KEYS:
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                # min() first: a float too large for int() (or inf) never reaches the conversion.
                return int(min(value, MAX_OUTPUT_TOKENS))
    return default


def _count(value: Any) -> int:
    """A count from a body field (`n`, `best_of`), rounded up, at least 1. A string holding a number counts
    as that number: lenient upstreams (pydantic's lax mode, as vLLM's) read `"8"` as 8."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return 1
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 1:
        # min() first: inf and huge floats never reach the conversion (nan compares false: counted as 1).
        return math.ceil(min(value, MAX_RESERVED_OUTPUT_TOKENS))
    return 1


def _prompts(value: Any) -> int:
    """How many prompts a legacy completions `prompt` holds: a list of strings or of token arrays is one
    each (the server completes every one), a list of integers is one tokenized prompt; anything else is 1."""
    if type(value) is not list or not value:
        return 1
    first = value[0]
    if isinstance(first, int) and not isinstance(first, bool):
        return 1  # one prompt, as token ids
    return min(len(value), MAX_RESERVED_OUTPUT_TOKENS)


def output_multiplier(body: dict[str, Any] | None) -> int:
    """How many outputs of the cap's size one request can be billed for: `n` (choices, images), and for
    legacy completions `best_of` (the server generates `best_of` candidates and returns `n` of them, and
    `best_of >= n`, so the larger of the two is what is billed; a value that is not a number counts as 1),
    times the prompts of a `prompt` list (each one is completed `n` / `best_of` times)."""
    if not body:
        return 1
    n = _count(body.get("n"))
    best_of = _count(body.get("best_of"))
    per_prompt = n if n >= best_of else best_of
    prompt = body.get("prompt")
    return per_prompt if prompt is None else per_prompt * _prompts(prompt)
