"""Request ids: ULIDs made cheaply on the hot path.

`str(ulid.ULID())` costs about 5 µs (one `os.urandom` syscall and a base-32 encoding loop in Python).
Here the 10-character time part is encoded once per millisecond and the 16-character random part is 80
bits from `random.getrandbits`, encoded ten bits at a time from a table of the 1,024 two-character
pairs (eight lookups and one join; `base64.b32encode` loops in Python and took twice as long). Request ids
identify, they do not authorise, so a non-cryptographic generator is enough. Identity `_id`s come from
`MonotonicIds` (creation order, from the injected clock, `os.urandom` bits); budget ids from `python-ulid`.
One encoder (`encode_ulid`) serves both kinds made here.
"""

from __future__ import annotations

import os
import random
import time
from datetime import datetime

from ulid import ULID

from orq_proxy.clock import Clock

__all__ = ["MonotonicIds", "encode_ulid", "new_request_id"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # _PAIRS[n] encodes the 10-bit n
_random = random.Random()
_cached_ms = -1
_cached_prefix = ""


def encode_ulid(value: int) -> str:
    """128 bits as 26 Crockford base-32 characters (the ULID text form), ten bits at a time."""
    p = _PAIRS
    # The top 8 bits make the first two characters (the first is at most '7'), then twelve 10-bit pairs.
    return p[value >> 120] + "".join([p[(value >> shift) & 1023] for shift in range(110, -1, -10)])


def _encode_time(millis: int) -> str:
    """The 10-character time part of a ULID for `millis`."""
    return encode_ulid(millis << 80)[:10]


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


class MonotonicIds:
    """ULIDs from a clock that never repeat and never go backwards within one process.

    The timestamp part comes from the injected clock (so `_id` order agrees with `created`); when two ids
    fall in the same millisecond, or the clock stands still (a FakeClock), the next id is the previous one
    plus one, so `_id` order is exactly creation order. Encoded here rather than through `ulid.ULID`
    because creating identities in bulk spent most of its time there.
    """

    __slots__ = ("_clock", "_last")

    def __init__(self, clock: Clock, last: str | None = None) -> None:
        self._clock = clock
        self._last = int(ULID.from_str(last)) if last else 0

    def next(self, now: datetime | None = None) -> str:
        when = now or self._clock.now()
        millis = int(when.timestamp() * 1000)
        # A new millisecond starts from fresh random bits; within the same one (or if the clock went
        # back) the id counts up from the last, as the ULID spec's monotonic mode does.
        fresh = millis > self._last >> 80
        self._last = value = (millis << 80) | int.from_bytes(os.urandom(10)) if fresh else self._last + 1
        return encode_ulid(value)
