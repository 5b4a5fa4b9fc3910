"""Token estimates for when usage is not known yet (budget reservations) or never arrives (disconnects,
upstreams that omit usage). A conservative ~4 bytes per token, rounded up, as OpenAI's rule of thumb."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["BYTES_PER_TOKEN", "estimate_input_tokens", "estimate_tokens_from_bytes", "max_output_tokens"]

BYTES_PER_TOKEN = 4
_OUTPUT_CAP_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def estimate_tokens_from_bytes(n: int) -> int:
    """Tokens in `n` bytes of text (rounded up; 0 for nothing)."""
    return -(-n // BYTES_PER_TOKEN) if n > 0 else 0


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v) for k, v in value.items() if k not in ("role", "type", "name", "image_url"))
    return 0


def estimate_input_tokens(body: dict[str, Any] | None, raw_len: int = 0) -> int:
    """Input tokens of a request: the text of `messages` / `input` / `prompt` (+4 per message for framing),
    else the raw body length."""
    if body is None:
        return estimate_tokens_from_bytes(raw_len)
    tokens = 0
    found = False
    for key in ("messages", "input", "prompt", "instructions", "tools"):
        if key in body:
            found = True
            value = body[key]
            tokens += estimate_tokens_from_bytes(
                _text_bytes(value) if key != "tools" else len(json.dumps(value).encode())
            )
            if key == "messages" and isinstance(value, list):
                tokens += 4 * len(value)
    return tokens if found else estimate_tokens_from_bytes(raw_len)


def max_output_tokens(body: dict[str, Any] | None, default: int) -> int:
    """The output cap the client set (`max_completion_tokens`, `max_tokens`, `max_output_tokens`), else `default`."""
    if body:
        for key in _OUTPUT_CAP_KEYS:
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                return int(value)
    return default
