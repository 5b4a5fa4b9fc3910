"""Request ids: ULIDs made cheaply on the hot path.

`str(ulid.ULID())` costs about 5 µs (one `os.urandom` syscall and a base-32 encoding loop in Python).
Here the 10-character time part is encoded once per millisecond and the 16-character random part is 80
bits from `random.getrandbits`, encoded ten bits at a time from a table of the 1,024 two-character
pairs (eight lookups and one join; `base64.b32encode` loops in Python and took twice as long). Request ids
identify, they do not authorise, so a non-cryptographic generator is enough; identity and budget ids use
`ulid` / `MonotonicIds`.
"""

from __future__ import annotations

import random
import time

__all__ = ["new_request_id"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # _PAIRS[n] encodes the 10-bit n
_random = random.Random()
_cached_ms = -1
_cached_prefix = ""


def _encode_time(millis: int) -> str:
    chars = []
    for _ in range(10):
        chars.append(_CROCKFORD[millis & 31])
        millis >>= 5
    return "".join(reversed(chars))


def new_request_id() -> str:
    """A 26-character ULID for the current millisecond."""
    global _cached_ms, _cached_prefix
    millis = time.time_ns() // 1_000_000
    if millis != _cached_ms:
        _cached_ms, _cached_prefix = millis, _encode_time(millis)
    r = _random.getrandbits(80)
    p = _PAIRS
    return "".join(
        (
            _cached_prefix,
            p[r >> 70],
            p[(r >> 60) & 1023],
            p[(r >> 50) & 1023],
            p[(r >> 40) & 1023],
            p[(r >> 30) & 1023],
            p[(r >> 20) & 1023],
            p[(r >> 10) & 1023],
            p[r & 1023],
        )
    )
