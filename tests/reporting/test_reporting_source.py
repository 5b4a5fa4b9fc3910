"""The engine against its `ReportSource` protocol, with no database: what it asks the store for (the plan)
and how it shapes the raw rows it gets back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from orq_proxy.auth import Principal
from orq_proxy.reporting.engine import METRIC_MEASURES, ReportEngine, offset_segments
from orq_proxy.reporting.query import BUNDLE_FIELDS, USAGE_METRICS, parse_report_query
from orq_proxy.reporting.source import ReportData, ReportPlan, ReportScope, ReportSource

NOW = datetime(2026, 10, 30, 12, tzinfo=UTC)
# Across the end of European summer time (2026-10-25 01:00 UTC).
WINDOW = {"from": "2026-10-23T00:00:00Z", "to": "2026-10-27T00:00:00Z"}


class FakeSource:
    """Answers with canned raw rows and keeps every plan it was given."""

    def __init__(
        self,
        rows: list[tuple[Any, ...]],
        totals: tuple[Any, ...] | None = None,
        bucket: Callable[[Any], datetime | date] | None = None,
    ) -> None:
        self.rows = rows
        self.totals = totals
        self.bucket = bucket
        self.plans: list[ReportPlan] = []

    def report(self, plan: ReportPlan) -> ReportData:
        self.plans.append(plan)
        return ReportData(self.rows, self.totals if plan.query.include_totals else None, self.bucket)


def test_every_usage_metric_has_measures_and_the_bundle_its_fields() -> None:
    """Each usage metric maps to measures; the bundle's keys are spec §4.3's fields, in order."""
    assert set(METRIC_MEASURES) == set(USAGE_METRICS)
    assert tuple(m.key for m in METRIC_MEASURES["genai.usage"]) == BUNDLE_FIELDS


def test_the_plan_carries_measures_order_and_zone_offsets() -> None:
    """A timeseries plan carries the zone's offsets over the window (DST change included); a scalar one
    none, and its order: the bundle by total cost then request count, another metric by its entry."""
    source = FakeSource([])
    assert isinstance(source, ReportSource)
    engine = ReportEngine(source)
    scope = ReportScope("acme", "alpha")
    series = parse_report_query({"metric": "genai.cost", "time_zone": "Europe/Amsterdam", **WINDOW}, now=NOW)
    engine.run_sync(series, scope)
    bundle = parse_report_query({"metric": "genai.usage", "mode": "scalar", **WINDOW}, now=NOW)
    engine.run_sync(bundle, scope)
    p95 = parse_report_query({"metric": "genai.latency.p95", "mode": "scalar", **WINDOW}, now=NOW)
    engine.run_sync(p95, scope)
    first, second, third = source.plans
    assert (first.query, first.scope, first.measures) == (series, scope, METRIC_MEASURES["genai.cost"])
    assert first.segments == tuple(offset_segments(ZoneInfo("Europe/Amsterdam"), series.start, series.end))
    assert [offset for _, offset in first.segments] == [timedelta(hours=2), timedelta(hours=1)]
    assert (second.segments, second.order_by) == ((), ("total_cost", "request_count"))
    assert third.order_by == ("genai.latency.p95",)


def test_raw_rows_are_shaped_for_the_response() -> None:
    """Local day labels become the UTC instant of local midnight, nano-USD become USD, dimensions strings
    (unset ones left out), and one row more than the limit says `has_more`."""
    rows = [
        (date(2026, 10, 25), "user_1", 1_234_567_890),
        (date(2026, 10, 25), None, 5),
        (date(2026, 10, 26), "", 0),
    ]
    source = FakeSource(rows, totals=(1_234_567_895,))
    body = {
        "metric": "genai.cost",
        "grain": "day",
        "group_by": ["identity"],
        "time_zone": "Europe/Amsterdam",
        "limit": 2,
        "include_totals": True,
        **WINDOW,
    }
    result = ReportEngine(source).run_sync(parse_report_query(body, now=NOW), ReportScope("acme"))
    # Amsterdam's 2026-10-25 starts at 00:00 +02:00 (summer time ends later that night).
    midnight = datetime(2026, 10, 24, 22, tzinfo=UTC)
    assert [(r.timestamp, r.dimensions, r.metrics) for r in result.rows] == [
        (midnight, {"identity": "user_1"}, {"genai.cost": 1.23456789}),
        (midnight, {}, {"genai.cost": 0.000000005}),
    ]
    assert result.has_more is True
    assert result.totals == {"genai.cost": 1.234567895} and result.warnings == []


def test_a_store_may_hand_over_its_own_bucket_values() -> None:
    """With `ReportData.bucket` the rows keep the store's bucket values (days since 1970 here), which the
    engine converts before mapping a local day to its midnight in UTC."""
    source = FakeSource([(20_751, 3)], bucket=lambda days: date(1970, 1, 1) + timedelta(days=days))
    body = {"metric": "genai.requests", "grain": "day", "time_zone": "Asia/Kolkata", **WINDOW}
    result = ReportEngine(source).run_sync(parse_report_query(body, now=NOW), ReportScope("acme"))
    # Day 20,751 is 2026-10-25; Kolkata's midnight is 18:30 UTC the day before.
    assert [(r.timestamp, r.metrics) for r in result.rows] == [
        (datetime(2026, 10, 24, 18, 30, tzinfo=UTC), {"genai.requests": 3})
    ]


def test_hour_buckets_pass_through_and_missing_values_are_left_out() -> None:
    """Minute/hour buckets arrive as aware UTC starts; a float with no value is left out, a value is
    rounded to 10 decimals; totals with no values are flagged unavailable."""
    start = datetime(2026, 10, 25, 1, tzinfo=UTC)
    source = FakeSource([(start, "openai/gpt-4o", 12.123456789012), (start, "mistral/small", None)], (None,))
    body = {
        "metric": "genai.ttft.p50",
        "grain": "hour",
        "group_by": ["model"],
        "include_totals": True,
        **WINDOW,
    }
    result = ReportEngine(source).run_sync(parse_report_query(body, now=NOW), ReportScope("acme"))
    assert [(r.timestamp, r.dimensions, r.metrics) for r in result.rows] == [
        (start, {"model": "openai/gpt-4o"}, {"genai.ttft.p50": 12.123456789}),
        (start, {"model": "mistral/small"}, {}),
    ]
    assert result.totals == {} and result.warnings == ["totals_unavailable"]


def test_quality_metrics_never_reach_the_store() -> None:
    """Evaluator and guardrail metrics are answered by the engine itself, without a plan."""
    source = FakeSource([])
    body = {"metric": "genai.evaluator.runs", "include_totals": True, **WINDOW}
    result = ReportEngine(source).run_sync(parse_report_query(body, now=NOW), ReportScope("acme"))
    assert source.plans == [] and result.rows == [] and result.totals == {}


@pytest.mark.parametrize(
    ("project", "scope"),
    [("default", ReportScope("acme")), ("*", ReportScope("acme")), ("alpha", ReportScope("acme", "alpha"))],
)
def test_scope_of_a_key(project: str, scope: ReportScope) -> None:
    """A `default` or `*` key sees its whole workspace; any other project scopes it to that project."""
    principal = Principal(workspace="acme", project=project, key_id="k", admin=True)
    assert ReportScope.of(principal) == scope
