"""Strict JSON for request bodies, shared by the proxied surface and the management API.

`parse_json_body(raw)` accepts what RFC 8259 calls JSON and that every later step can handle, and
raises `JSONBodyError` (a `ValueError` naming the rule and, where there is one, the field) for the rest:

- bytes that are not UTF-8 (RFC 8259 §8.1; a leading byte order mark is ignored), or not JSON at all;
- `NaN`, `Infinity` and `-Infinity` (not JSON; they could not be rendered back in a JSON response);
- numbers too large for a float (`1e999`) or with more digits than Python converts (4300);
- nesting deeper than `MAX_DEPTH` (a bomb like `[[[[...]]]]` would otherwise exhaust the recursion limit
  here or in any recursive code further on: estimates, re-serialization, rendering);
- strings (keys or values) with an unpaired UTF-16 surrogate escape such as `"\\ud800"`: they parse, but
  cannot be encoded as UTF-8, so forwarding, storing or rendering them would fail later (RFC 7493 I-JSON
  forbids them too).

The checks after parsing walk the parsed value (iteratively) only when the text makes a problem possible:
more brackets than `MAX_DEPTH`, or a `\\uD...` escape. A typical request pays for two `str.count`s and
two substring tests.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_DEPTH", "JSONBodyError", "parse_json_body"]

# Deep enough for any real request (JSON schemas in tools / response_format nest a few dozen levels at
# most), shallow enough for recursive code (json.dumps, pydantic) far below Python's recursion limit.
MAX_DEPTH = 128


class JSONBodyError(ValueError):
    """A body that is not acceptable JSON. `path` names the offending field (`messages[0].content`)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def _reject_constant(name: str) -> Any:
    raise JSONBodyError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONBodyError(f"the number {text[:32]} is out of range")
    return value


# Built once: `json.loads(text, **hooks)` would build a new decoder (and scanner) on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_JSON_SPACE = " \t\n\r"


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path(trail: tuple[Any, ...] | None) -> str:
    """`(key, parent_trail)` links -> `a.b[0].c` (built only when an error is reported)."""
    keys: list[str | int] = []
    while trail is not None:
        key, trail = trail
        keys.append(key)
    out = ""
    for key in reversed(keys):
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            shown = key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            out += f".{shown}" if out else shown
    return out


def _too_deep(value: Any, limit: int) -> bool:
    """True when `value` nests containers more than `limit` levels deep (breadth first, no recursion)."""
    level = [value]
    depth = 1
    while level:
        if depth > limit:
            return True
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                kind = type(child)
                if kind is dict or kind is list:
                    below.append(child)
        level = below
        depth += 1
    return False


def _check_depth(data: Any) -> None:
    if type(data) is dict:
        # Per top-level field, so the error can name it (`tools: JSON nested deeper than ...`).
        for key, child in data.items():
            if type(child) in (dict, list) and _too_deep(child, MAX_DEPTH - 1):
                where = _path((key, None))
                raise JSONBodyError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels", where)
    elif type(data) is list and _too_deep(data, MAX_DEPTH):
        raise JSONBodyError(f"JSON nested deeper than {MAX_DEPTH} levels")


def _check_strings(data: Any) -> None:
    """Every key and string must be encodable as UTF-8 (no unpaired surrogate); the error names the field."""
    if isinstance(data, str) and _has_surrogate(data):
        raise JSONBodyError("the body is a string with an unpaired UTF-16 surrogate escape")
    # Each entry: (container, trail); a trail is a linked list (key, parent_trail) for the error's path.
    stack: list[tuple[Any, tuple[Any, ...] | None]] = [(data, None)]
    while stack:
        node, trail = stack.pop()
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        for key, child in items:
            if isinstance(key, str) and _has_surrogate(key):
                where = _path((key, trail))
                raise JSONBodyError(
                    f"{where}: the key has an unpaired UTF-16 surrogate escape (not valid Unicode)", where
                )
            if isinstance(child, str):
                if _has_surrogate(child):
                    where = _path((key, trail))
                    raise JSONBodyError(
                        f"{where}: the string has an unpaired UTF-16 surrogate escape (not valid Unicode)",
                        where,
                    )
            elif isinstance(child, dict | list):
                stack.append((child, (key, trail)))


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of a request body (see the module docstring for what is refused).

    Raises:
        JSONBodyError: with a message naming the rule (and `path` naming the field, when there is one).
    """
    try:
        # Decoded here, strictly: `json.loads(bytes)` would also take UTF-16/32 and UTF-8-encoded
        # surrogates (it decodes with "surrogatepass"). RFC 8259 §8.1: JSON between systems is UTF-8.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONBodyError(f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if text.startswith("\ufeff"):  # a byte order mark may be ignored (RFC 8259 §8.1)
        text = text[1:]
    try:
        if text[:1] in ("{", "["):  # the usual body: no leading space, nothing after the value
            data, end = _DECODER.raw_decode(text)
            if end != len(text) and text[end:].strip(_JSON_SPACE):
                data = _DECODER.decode(text)  # raises the "Extra data" error, with its position
        else:
            data = _DECODER.decode(text)
    except JSONBodyError:
        raise
    except RecursionError:
        raise JSONBodyError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # json.JSONDecodeError, and int() beyond its digit limit
        message = str(exc)
        if "integer string conversion" in message:
            message = "a number has more than 4300 digits"
        raise JSONBodyError(message) from None
    # Only a body with more brackets than MAX_DEPTH can nest deeper than it, and only one with a `\\uD...`
    # escape can hold a surrogate: most bodies skip both walks.
    if text.count("[") + text.count("{") > MAX_DEPTH:
        _check_depth(data)
    if "\\ud" in text or "\\uD" in text:
        _check_strings(data)
    return data
