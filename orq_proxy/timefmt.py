"""Timestamps on the wire: one formatter per format the APIs speak.

- `rfc3339`: budgets, reporting and alerts (`2026-01-01T00:00:00Z`, microseconds only when non-zero).
- `rfc3339_millis`: identities (`2026-01-01T00:00:00.000Z`, fixed width, as orq's Identities API sends).
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["rfc3339", "rfc3339_millis"]


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def rfc3339(value: datetime) -> str:
    """An aware (or naive-UTC) datetime as RFC 3339 UTC with `Z`; microseconds only when non-zero."""
    return _naive_utc(value).isoformat() + "Z"


def rfc3339_millis(value: datetime) -> str:
    """An aware (or naive-UTC) datetime as RFC 3339 UTC with `Z`, millisecond precision, fixed width."""
    return _naive_utc(value).isoformat(timespec="milliseconds") + "Z"
