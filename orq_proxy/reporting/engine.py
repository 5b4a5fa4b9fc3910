"""Answers a `ReportQuery` from a `ReportSource` (the event store), in no particular SQL dialect.

The engine plans the query (the metric's measures, the scalar order, the time zone's UTC offsets over the
window), hands the plan to the store, which writes and runs the SQL (`reporting/source.py` states what it
must compute), and shapes what comes back: dimensions as strings, sums as ints, nano-USD as USD, floats
rounded to `ROUND_DIGITS`, day buckets mapped from local dates to the UTC instant of local midnight.
Bucket timestamps are reported in UTC. Evaluator and guardrail metrics are answered here, with no rows
and a warning (this gateway records no such results), without asking the store.

Queries run in a worker thread (`asyncio.to_thread`), so the event loop never blocks.
Failure policy: a failing query raises (`ReportSourceError`: the API answers 500); nothing here retries
or degrades.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

from orq_proxy.reporting.query import ReportQuery
from orq_proxy.reporting.source import Measure, ReportData, ReportPlan, ReportScope, ReportSource
from orq_proxy.usage.money import nanos_to_usd

__all__ = [
    "METRIC_MEASURES",
    "NO_QUALITY_EVENTS_WARNING",
    "ROUND_DIGITS",
    "TOTALS_UNAVAILABLE",
    "ReportEngine",
    "ReportResult",
    "ReportRow",
    "offset_segments",
    "plan_report",
]

ROUND_DIGITS = 10

NO_QUALITY_EVENTS_WARNING = (
    "{metric}: this gateway records no evaluator or guardrail results yet, so the report has no rows"
)
TOTALS_UNAVAILABLE = "totals_unavailable"


def _count(key: str) -> Measure:
    return Measure(key, "count")


def _errors(key: str) -> Measure:
    return Measure(key, "errors")


def _sum(key: str, event_field: str) -> Measure:
    return Measure(key, "sum", event_field)


def _usd(key: str, event_field: str) -> Measure:
    return Measure(key, "sum", event_field, kind="usd")


def _quantile(key: str, event_field: str, fraction: float, *, streams_only: bool = False) -> Measure:
    return Measure(key, "quantile", event_field, fraction, streams_only=streams_only, kind="float")


# Metric -> its entries in `metrics`, in order (the `genai.usage` bundle: spec §4.3's field order).
METRIC_MEASURES: dict[str, tuple[Measure, ...]] = {
    "genai.requests": (_count("genai.requests"),),
    "genai.tokens": (_sum("genai.tokens", "total_tokens"),),
    "genai.cost": (_usd("genai.cost", "total_cost_nanos"),),
    "genai.errors": (_errors("genai.errors"),),
    "genai.error_rate": (Measure("genai.error_rate", "error_rate", kind="float"),),
    "genai.latency.p50": (_quantile("genai.latency.p50", "latency_ms", 0.5),),
    "genai.latency.p95": (_quantile("genai.latency.p95", "latency_ms", 0.95),),
    "genai.latency.p99": (_quantile("genai.latency.p99", "latency_ms", 0.99),),
    "genai.ttft.avg": (Measure("genai.ttft.avg", "avg", "ttft_ms", streams_only=True, kind="float"),),
    "genai.ttft.p50": (_quantile("genai.ttft.p50", "ttft_ms", 0.5, streams_only=True),),
    "genai.ttft.p95": (_quantile("genai.ttft.p95", "ttft_ms", 0.95, streams_only=True),),
    "genai.usage": (
        _count("request_count"),
        _sum("input_tokens", "input_tokens"),
        _sum("output_tokens", "output_tokens"),
        _sum("total_tokens", "total_tokens"),
        _usd("input_cost", "input_cost_nanos"),
        _usd("output_cost", "output_cost_nanos"),
        _usd("total_cost", "total_cost_nanos"),
        _sum("cached_input_tokens", "cached_input_tokens"),
        _usd("cached_cost", "cached_cost_nanos"),
        _sum("reasoning_tokens", "reasoning_tokens"),
        _usd("reasoning_cost", "reasoning_cost_nanos"),
        _sum("audio_input_tokens", "audio_input_tokens"),
        _sum("audio_output_tokens", "audio_output_tokens"),
        _errors("error_count"),
    ),
}
# Scalar rows are ordered by these metric entries (the bundle: by total cost, then request count); any
# other metric by its one entry.
_ORDER_BY: dict[str, tuple[str, ...]] = {"genai.usage": ("total_cost", "request_count")}


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One `data` entry. `timestamp` is the bucket start (aware UTC), None in scalar mode."""

    timestamp: datetime | None
    dimensions: dict[str, str]
    metrics: dict[str, int | float]


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What the engine found. `totals` is None unless the query asked for totals."""

    rows: list[ReportRow]
    has_more: bool
    effective_grain: str
    totals: dict[str, int | float] | None = None
    warnings: list[str] = field(default_factory=list)


def offset_segments(zone: tzinfo, start: datetime, end: datetime) -> list[tuple[datetime, timedelta]]:
    """The zone's UTC offsets over `[start, end)`: `[(utc_from, offset), ...]`, each in force until the next.

    The first segment starts at `start`. Offsets are sampled hourly and each change is narrowed down to the
    second (tz database transitions fall on whole seconds).
    """

    def offset_at(seconds: float) -> timedelta:
        moment = datetime.fromtimestamp(seconds, UTC)
        value = moment.astimezone(zone).utcoffset()
        return value if value is not None else timedelta(0)

    start_s, end_s = start.timestamp(), end.timestamp()
    segments = [(start.astimezone(UTC), offset_at(start_s))]
    t = start_s
    while t < end_s:
        nxt = min(t + 3600, end_s)
        if offset_at(nxt) != segments[-1][1]:
            lo, hi = math.floor(t), math.ceil(nxt)
            while hi - lo > 1:  # offset_at(lo) is the old offset, offset_at(hi) the new one
                mid = (lo + hi) // 2
                if offset_at(mid) == segments[-1][1]:
                    lo = mid
                else:
                    hi = mid
            segments.append((datetime.fromtimestamp(hi, UTC), offset_at(hi)))
        t = nxt
    return segments


def plan_report(query: ReportQuery, scope: ReportScope) -> ReportPlan:
    """What a `ReportSource` needs for a usage metric's `query` in `scope`."""
    measures = METRIC_MEASURES[query.metric]
    segments = () if query.mode == "scalar" else tuple(offset_segments(query.zone, query.start, query.end))
    order_by = _ORDER_BY.get(query.metric, (measures[0].key,))
    return ReportPlan(query=query, scope=scope, measures=measures, order_by=order_by, segments=segments)


def _convert(measure: Measure, value: Any) -> int | float | None:
    if value is None:
        return None
    if measure.kind == "int":
        return int(value)
    if measure.kind == "usd":
        return nanos_to_usd(int(value))
    return round(float(value), ROUND_DIGITS)


def _metrics(measures: Sequence[Measure], values: Sequence[Any]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for measure, value in zip(measures, values, strict=True):
        converted = _convert(measure, value)
        if converted is not None:
            out[measure.key] = converted
    return out


def _local_midnight(zone: tzinfo) -> Callable[[date], datetime]:
    def local_midnight(day: date) -> datetime:
        return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)

    return local_midnight


class ReportEngine:
    """Runs reporting queries against a `ReportSource` (the event store).

    Example:
        engine = ReportEngine(store)
        result = await engine.run(parse_report_query(body, now=clock.now()), ReportScope("default"))
    """

    def __init__(self, store: ReportSource) -> None:
        self.store = store

    async def run(self, query: ReportQuery, scope: ReportScope) -> ReportResult:
        """Answer `query` for `scope` in a worker thread."""
        return await asyncio.to_thread(self.run_sync, query, scope)

    def run_sync(self, query: ReportQuery, scope: ReportScope) -> ReportResult:
        """Answer `query` for `scope` (blocking)."""
        if not query.is_usage:
            warnings = [NO_QUALITY_EVENTS_WARNING.format(metric=query.metric)]
            if query.include_totals:
                warnings.append(TOTALS_UNAVAILABLE)
            return ReportResult(
                rows=[],
                has_more=False,
                effective_grain=query.effective_grain,
                totals={} if query.include_totals else None,
                warnings=warnings,
            )
        plan = plan_report(query, scope)
        data = self.store.report(plan)
        rows, has_more = self._rows(plan, data)
        totals = None
        if query.include_totals:
            totals = _metrics(plan.measures, data.totals) if data.totals is not None else {}
        warnings = []
        if totals is not None and not totals:
            warnings.append(TOTALS_UNAVAILABLE)
        return ReportResult(
            rows=rows,
            has_more=has_more,
            effective_grain=query.effective_grain,
            totals=totals,
            warnings=warnings,
        )

    def _rows(self, plan: ReportPlan, data: ReportData) -> tuple[list[ReportRow], bool]:
        query = plan.query
        scalar = query.mode == "scalar"
        fetched, bucket = data.rows, data.bucket
        day_start = _local_midnight(query.zone) if not scalar and query.effective_grain == "day" else None
        has_more = len(fetched) > query.limit
        rows: list[ReportRow] = []
        offset = 0 if scalar else 1
        first_measure = offset + len(query.group_by)
        for record in fetched[: query.limit]:
            dimensions = {}
            for i, name in enumerate(query.group_by):
                value = record[offset + i]
                if value is not None and value != "":
                    dimensions[name] = str(value)
            metrics = _metrics(plan.measures, record[first_measure:])
            timestamp = None
            if not scalar:
                start: Any = record[0] if bucket is None else bucket(record[0])
                timestamp = start if day_start is None else day_start(start)
            rows.append(ReportRow(timestamp=timestamp, dimensions=dimensions, metrics=metrics))
        return rows, has_more
