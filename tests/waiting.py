"""`wait_for`: poll a condition the proxy reaches asynchronously (an event written, a notification seen)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_for"]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> float:
    """Seconds until `condition()` held, polled every 5 ms; an AssertionError naming `what` after `timeout`."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.005)
    return time.monotonic() - t0
