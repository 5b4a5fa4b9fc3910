"""Request ids: ULIDs made cheaply on the hot path.

`str(ulid.ULID())` costs about 5 µs (one `os.urandom` syscall and a base-32 encoding loop in Python).
Here the 10-character time part is encoded once per millisecond and the 16-character random part is 80
bits from `random.getrandbits` encoded by `base64.b32encode` and mapped to Crockford's alphabet with one
`bytes.translate`, both in C. Request ids identify, they do not authorise, so a non-cryptographic
generator is enough; identity and budget ids use `ulid` / `MonotonicIds`.
"""

from __future__ import annotations

import base64
import random
import time

__all__ = ["new_request_id"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())
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
    tail = base64.b32encode(_random.getrandbits(80).to_bytes(10, "big")).translate(_TO_CROCKFORD)
    return _cached_prefix + tail.decode("ascii")
