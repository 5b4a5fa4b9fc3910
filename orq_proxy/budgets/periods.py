"""Budget periods as calendar windows: UTC by default, or a budget's IANA time zone.

DAILY starts at midnight, WEEKLY on Monday at midnight, MONTHLY on the 1st, YEARLY on January 1st;
ONE_TIME is a single window that never ends. Windows are half-open: `start <= t < end`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo

from orq_proxy.budgets.models import Period

__all__ = ["ONE_TIME_START", "window", "zone"]

# The start of the ONE_TIME window (it never resets, so any fixed instant works as its key).
ONE_TIME_START = datetime(1970, 1, 1, tzinfo=UTC)


@lru_cache(maxsize=512)
def zone(name: str | None) -> tzinfo:
    """The `tzinfo` for an IANA name (None = UTC); cached because it is looked up per request."""
    return UTC if name is None else ZoneInfo(name)


def _local_midnight(tz: tzinfo, year: int, month: int, day: int) -> datetime:
    # Through UTC so a zone whose midnight is skipped by DST still yields a real instant.
    local = datetime(year, month, day, tzinfo=tz)
    return local.astimezone(UTC)


def window(period: Period, now: datetime, time_zone: str | None = None) -> tuple[datetime, datetime | None]:
    """The `[start, end)` window of `period` that contains `now`, in UTC; `end` is None for ONE_TIME.

    Example:
        window(Period.MONTHLY, datetime(2024, 2, 29, 12, tzinfo=UTC))
        # -> (2024-02-01T00:00Z, 2024-03-01T00:00Z)
    """
    if period is Period.ONE_TIME:
        return ONE_TIME_START, None
    tz = zone(time_zone)
    local = now.astimezone(tz)
    y, m = local.year, local.month
    if period is Period.DAILY:
        start_date = local.date()
        end_date = start_date + timedelta(days=1)
    elif period is Period.WEEKLY:
        start_date = local.date() - timedelta(days=local.weekday())
        end_date = start_date + timedelta(days=7)
    elif period is Period.MONTHLY:
        return _local_midnight(tz, y, m, 1), _local_midnight(tz, y + m // 12, m % 12 + 1, 1)
    elif period is Period.YEARLY:
        return _local_midnight(tz, y, 1, 1), _local_midnight(tz, y + 1, 1, 1)
    else:  # pragma: no cover - Period is closed
        raise ValueError(f"unknown period {period!r}")
    return (
        _local_midnight(tz, start_date.year, start_date.month, start_date.day),
        _local_midnight(tz, end_date.year, end_date.month, end_date.day),
    )
