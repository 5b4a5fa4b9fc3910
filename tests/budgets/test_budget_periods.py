"""Calendar windows of budget periods: UTC and IANA zones, month and year ends, leap years."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from orq_proxy.budgets.models import Period
from orq_proxy.budgets.periods import ONE_TIME_START, window


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        # daily: midnight to midnight, including month/year ends and Feb 29
        (Period.DAILY, utc(2026, 3, 5, 13, 7), utc(2026, 3, 5), utc(2026, 3, 6)),
        (Period.DAILY, utc(2026, 3, 5), utc(2026, 3, 5), utc(2026, 3, 6)),
        (Period.DAILY, utc(2026, 3, 5, 23, 59, 59, 999999), utc(2026, 3, 5), utc(2026, 3, 6)),
        (Period.DAILY, utc(2026, 1, 31, 23, 59), utc(2026, 1, 31), utc(2026, 2, 1)),
        (Period.DAILY, utc(2026, 12, 31, 12), utc(2026, 12, 31), utc(2027, 1, 1)),
        (Period.DAILY, utc(2024, 2, 28, 22), utc(2024, 2, 28), utc(2024, 2, 29)),
        (Period.DAILY, utc(2024, 2, 29, 22), utc(2024, 2, 29), utc(2024, 3, 1)),
        (Period.DAILY, utc(2023, 2, 28, 22), utc(2023, 2, 28), utc(2023, 3, 1)),
        # weekly: Monday 00:00 to the next Monday
        (Period.WEEKLY, utc(2026, 1, 1, 9), utc(2025, 12, 29), utc(2026, 1, 5)),  # a Thursday
        (Period.WEEKLY, utc(2026, 1, 5), utc(2026, 1, 5), utc(2026, 1, 12)),  # a Monday at midnight
        (Period.WEEKLY, utc(2026, 1, 4, 23, 59), utc(2025, 12, 29), utc(2026, 1, 5)),  # a Sunday night
        (Period.WEEKLY, utc(2024, 2, 29), utc(2024, 2, 26), utc(2024, 3, 4)),
        # monthly: month ends of every length, December -> January
        (Period.MONTHLY, utc(2026, 1, 31, 23, 59), utc(2026, 1, 1), utc(2026, 2, 1)),
        (Period.MONTHLY, utc(2026, 2, 1), utc(2026, 2, 1), utc(2026, 3, 1)),
        (Period.MONTHLY, utc(2024, 2, 29, 23), utc(2024, 2, 1), utc(2024, 3, 1)),
        (Period.MONTHLY, utc(2026, 4, 30, 23), utc(2026, 4, 1), utc(2026, 5, 1)),
        (Period.MONTHLY, utc(2026, 12, 31, 23, 59, 59), utc(2026, 12, 1), utc(2027, 1, 1)),
        # yearly
        (Period.YEARLY, utc(2026, 12, 31, 23, 59), utc(2026, 1, 1), utc(2027, 1, 1)),
        (Period.YEARLY, utc(2027, 1, 1), utc(2027, 1, 1), utc(2028, 1, 1)),
        (Period.YEARLY, utc(2024, 2, 29), utc(2024, 1, 1), utc(2025, 1, 1)),
        # one time: never ends
        (Period.ONE_TIME, utc(2026, 5, 5), ONE_TIME_START, None),
        (Period.ONE_TIME, utc(2099, 12, 31), ONE_TIME_START, None),
    ],
)
def test_utc_windows(period: Period, now: datetime, start: datetime, end: datetime | None) -> None:
    """Each period's [start, end) window in UTC contains now and starts where the calendar says."""
    got_start, got_end = window(period, now)
    assert (got_start, got_end) == (start, end)
    assert got_start <= now and (got_end is None or now < got_end)


@pytest.mark.parametrize(
    ("period", "now", "zone", "start", "end"),
    [
        # 03:00 UTC on the 1st is still the previous day (and month, and year) in New York
        (Period.DAILY, utc(2026, 1, 1, 3), "America/New_York", utc(2025, 12, 31, 5), utc(2026, 1, 1, 5)),
        (Period.MONTHLY, utc(2026, 1, 1, 3), "America/New_York", utc(2025, 12, 1, 5), utc(2026, 1, 1, 5)),
        (Period.YEARLY, utc(2026, 1, 1, 3), "America/New_York", utc(2025, 1, 1, 5), utc(2026, 1, 1, 5)),
        # a DST day is 23 hours long
        (Period.DAILY, utc(2026, 3, 8, 12), "America/New_York", utc(2026, 3, 8, 5), utc(2026, 3, 9, 4)),
        # Santiago moves its clocks at midnight: a skipped midnight starts the day at 01:00 local (-03),
        # a repeated hour makes the day before 25 hours long and midnight happens once, at -04
        (Period.DAILY, utc(2024, 9, 8, 3, 59), "America/Santiago", utc(2024, 9, 7, 4), utc(2024, 9, 8, 4)),
        (Period.DAILY, utc(2024, 9, 8, 4), "America/Santiago", utc(2024, 9, 8, 4), utc(2024, 9, 9, 3)),
        (Period.DAILY, utc(2024, 4, 7, 3, 30), "America/Santiago", utc(2024, 4, 6, 3), utc(2024, 4, 7, 4)),
        # east of UTC: Monday in Tokyo starts on Sunday 15:00 UTC
        (Period.WEEKLY, utc(2026, 1, 4, 16), "Asia/Tokyo", utc(2026, 1, 4, 15), utc(2026, 1, 11, 15)),
        (Period.ONE_TIME, utc(2026, 1, 4, 16), "Asia/Tokyo", ONE_TIME_START, None),
    ],
)
def test_zoned_windows(
    period: Period, now: datetime, zone: str, start: datetime, end: datetime | None
) -> None:
    """With a time zone, boundaries are local midnights, returned in UTC."""
    assert window(period, now, zone) == (start, end)
