"""Reporting request validation: every rule, each 400 naming the field and the rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orq_proxy.reporting import query as query_module
from orq_proxy.reporting.query import (
    GROUP_BY_VALUES,
    METRICS,
    ReportQueryError,
    parse_report_query,
)
from orq_proxy.timefmt import rfc3339

NOW = datetime(2026, 10, 30, 12, 0, tzinfo=UTC)
BASE = {"metric": "genai.cost", "from": "2026-10-21T00:00:00Z", "to": "2026-10-28T00:00:00Z"}


def problems(body: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(ReportQueryError) as info:
        parse_report_query(body, now=NOW, **kwargs)
    return str(info.value)


def test_sdk_enums_match() -> None:
    """The metric, group_by and filter-field catalogues are exactly the SDK's literals."""
    from typing import get_args

    from orq_ai_sdk.models import filter_, queryreportrequest

    assert set(METRICS) == set(get_args(queryreportrequest.Metric)) and len(METRICS) == 18
    assert list(GROUP_BY_VALUES) == list(get_args(queryreportrequest.GroupBy))
    assert set(query_module.FILTER_FIELDS) == set(get_args(filter_.FieldT))


def test_defaults() -> None:
    """Defaults: auto grain, timeseries, desc, limit 1000, UTC, no totals; the echo keeps only sent keys."""
    q = parse_report_query(BASE, now=NOW)
    assert (q.grain, q.effective_grain, q.mode, q.sort, q.limit, q.zone_name, q.include_totals) == (
        "auto",
        "hour",
        "timeseries",
        "desc",
        1000,
        "UTC",
        False,
    )
    assert q.start == datetime(2026, 10, 21, tzinfo=UTC)
    assert q.echo == BASE


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("2026-10-21T00:00:00", datetime(2026, 10, 21, tzinfo=UTC)),
        ("2026-10-21T02:00:00+02:00", datetime(2026, 10, 21, tzinfo=UTC)),
        ("2026-10-21 00:00:00.123456789z", datetime(2026, 10, 21, 0, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_times_naive_is_utc_offsets_converted(raw: str, want: datetime) -> None:
    """A naive `from` is UTC; offsets are converted; fractions beyond microseconds are dropped."""
    q = parse_report_query({**BASE, "from": raw}, now=NOW)
    assert q.start == want
    assert q.echo["from"] == rfc3339(want)


@pytest.mark.parametrize(
    ("span", "want"),
    [
        (timedelta(hours=6), "minute"),
        (timedelta(hours=6, seconds=1), "hour"),
        (timedelta(days=7), "hour"),
        (timedelta(days=7, seconds=1), "day"),
        (timedelta(days=90), "day"),
    ],
)
def test_auto_grain(span: timedelta, want: str) -> None:
    """`auto`: minute up to 6 hours, hour up to 7 days, day beyond."""
    start = datetime(2026, 8, 5, tzinfo=UTC)
    body = {**BASE, "from": rfc3339(start), "to": rfc3339(start + span), "grain": "auto"}
    assert parse_report_query(body, now=NOW).effective_grain == want


@pytest.mark.parametrize(("grain", "limit"), [("minute", timedelta(days=1)), ("hour", timedelta(days=31))])
def test_grain_limits_exact_edges(grain: str, limit: timedelta) -> None:
    """An explicit grain is allowed up to its limit and refused one second past it, naming the limit."""
    start = datetime(2026, 9, 1, tzinfo=UTC)
    body = {**BASE, "from": rfc3339(start), "grain": grain}
    assert parse_report_query({**body, "to": rfc3339(start + limit)}, now=NOW).effective_grain == grain
    message = problems({**body, "to": rfc3339(start + limit + timedelta(seconds=1))})
    assert f"grain: '{grain}' is too fine" in message
    assert f"{grain} buckets allow a range of at most" in message


BAD_CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({"from": BASE["from"], "to": BASE["to"]}, ["metric: required"]),
    ({**BASE, "metric": "genai.bogus"}, ["metric: unknown metric 'genai.bogus'", "genai.requests"]),
    ({**BASE, "metric": ["genai.cost", "genai.tokens"]}, ["metric: takes one metric name, not a list"]),
    ({"metric": "genai.cost"}, ["from: required", "to: required"]),
    ({**BASE, "from": "yesterday"}, ["from: 'yesterday' is not an RFC 3339 date-time"]),
    ({**BASE, "to": "2026-10-21"}, ["to: '2026-10-21' is not an RFC 3339 date-time"]),
    ({**BASE, "to": "2026-02-30T00:00:00Z"}, ["to: '2026-02-30T00:00:00Z' is not a valid date-time"]),
    ({**BASE, "from": 1700000000}, ["from: must be an RFC 3339 date-time string"]),
    ({**BASE, "to": BASE["from"]}, ["from must be before to"]),
    ({**BASE, "from": "2026-10-29T00:00:00Z"}, ["from must be before to"]),
    (
        {**BASE, "from": "2026-08-01T00:00:00Z", "to": "2026-10-30T00:00:01Z"},
        ["range: from..to spans 90", "at most 90 days"],
    ),
    (
        {**BASE, "from": "2026-07-30T00:00:00Z", "to": "2026-08-01T00:00:00Z"},
        [
            "from: 2026-07-30T00:00:00Z is older than the retention window",
            "kept 90 days",
            "2026-08-01T12:00:00Z",
        ],
    ),
    ({**BASE, "grain": "week"}, ["grain: must be one of auto, minute, hour, day, got 'week'"]),
    (
        {**BASE, "grain": "minute"},
        ["grain: 'minute' is too fine for a 7 days range", "use grain 'hour' or 'day'"],
    ),
    ({**BASE, "group_by": "identity"}, ["group_by: must be a list"]),
    ({**BASE, "group_by": ["color"]}, ["group_by[0]: unknown dimension 'color'", "result_label"]),
    ({**BASE, "group_by": ["billing_billable"]}, ["'billing_billable' is filter-only"]),
    ({**BASE, "group_by": ["model", "model"]}, ["group_by[1]: 'model' is listed more than once"]),
    (
        {**BASE, "group_by": ["agent"]},
        ["group_by[0]: 'agent' is not recorded by this gateway; supported dimensions: project, identity"],
    ),
    ({**BASE, "group_by": ["evaluator_name"]}, ["'evaluator_name' is not valid for metric genai.cost"]),
    ({**BASE, "metric": "genai.ttft.p50", "group_by": ["tool"]}, ["'tool' is not valid for genai.ttft.p50"]),
    ({**BASE, "metric": "genai.guardrail.runs", "group_by": ["model"]}, ["'model' is not valid for metric"]),
    ({**BASE, "filters": {"field": "model"}}, ["filters: must be a list"]),
    ({**BASE, "filters": ["model"]}, ["filters[0]: must be an object"]),
    (
        {**BASE, "filters": [{}]},
        ["filters[0].field: required", "filters[0].op: required", "filters[0].values: required"],
    ),
    (
        {**BASE, "filters": [{"field": "model", "op": "like", "values": ["x"]}]},
        ["filters[0].op: must be one of eq, neq, in, not_in, got 'like'"],
    ),
    (
        {**BASE, "filters": [{"field": "model", "op": "eq", "values": ["a", "b"]}]},
        ["filters[0].values: op 'eq' takes exactly 1 value, got 2"],
    ),
    (
        {**BASE, "filters": [{"field": "model", "op": "neq", "values": []}]},
        ["op 'neq' takes exactly 1 value, got 0"],
    ),
    (
        {**BASE, "filters": [{"field": "model", "op": "in", "values": []}]},
        ["filters[0].values: op 'in' takes 1 to 100 values, got 0"],
    ),
    (
        {**BASE, "filters": [{"field": "model", "op": "not_in", "values": [str(i) for i in range(101)]}]},
        ["op 'not_in' takes 1 to 100 values, got 101"],
    ),
    (
        {**BASE, "filters": [{"field": "model", "op": "in", "values": [1]}]},
        ["filters[0].values: must be a list of strings"],
    ),
    ({**BASE, "filters": [{"field": "model", "op": "eq", "values": [""]}]}, ["each value must be 1 to 1024"]),
    (
        {**BASE, "filters": [{"field": "model", "op": "eq", "values": ["x"], "negate": True}]},
        ["filters[0]: unknown key 'negate'"],
    ),
    (
        {**BASE, "filters": [{"field": "colour", "op": "eq", "values": ["x"]}]},
        ["filters[0].field: unknown field 'colour'"],
    ),
    (
        {**BASE, "filters": [{"field": "agent", "op": "eq", "values": ["x"]}]},
        ["filters[0].field: 'agent' is not recorded"],
    ),
    (
        {**BASE, "filters": [{"field": "billing_billable", "op": "eq", "values": ["yes"]}]},
        ["billing_billable takes 'true' or 'false', got 'yes'"],
    ),
    (
        {
            **BASE,
            "metric": "genai.evaluator.runs",
            "filters": [{"field": "billing_billable", "op": "eq", "values": ["true"]}],
        },
        ["billing_billable applies to usage metrics only"],
    ),
    (
        {**BASE, "filters": [{"field": "http_status_code", "op": "eq", "values": ["OK"]}]},
        ["http_status_code takes HTTP status codes like '200', got 'OK'"],
    ),
    (
        {**BASE, "filters": [{"field": "status_code", "op": "eq", "values": ["ok"]}]},
        ["status_code takes 'OK' or 'ERROR', got 'ok'"],
    ),
    (
        {**BASE, "filters": [{"field": "model", "op": "eq", "values": ["x"]}] * 21},
        ["filters: at most 20 filters, got 21"],
    ),
    ({**BASE, "limit": 0}, ["limit: must be from 1 to 5000, got 0"]),
    ({**BASE, "limit": 5001}, ["limit: must be from 1 to 5000, got 5001"]),
    ({**BASE, "limit": 10.5}, ["limit: must be an integer from 1 to 5000, got 10.5"]),
    ({**BASE, "limit": True}, ["limit: must be an integer"]),
    ({**BASE, "time_zone": "Mars/Olympus"}, ["time_zone: 'Mars/Olympus' is not an IANA time zone name"]),
    ({**BASE, "time_zone": "europe/amsterdam"}, ["did you mean 'Europe/Amsterdam'?"]),
    ({**BASE, "time_zone": "localtime"}, ["time_zone: 'localtime' is not an IANA time zone name"]),
    ({**BASE, "time_zone": 1}, ["time_zone: must be an IANA time zone name"]),
    ({**BASE, "include_totals": "yes"}, ["include_totals: must be true or false, got 'yes'"]),
    ({**BASE, "mode": "table"}, ["mode: must be one of timeseries, scalar, got 'table'"]),
    ({**BASE, "sort": "up"}, ["sort: must be one of desc, asc, got 'up'"]),
    ({**BASE, "groupBy": ["model"]}, ["groupBy: unknown field; the request takes metric, from, to"]),
]


@pytest.mark.parametrize(("body", "needles"), BAD_CASES)
def test_invalid_requests_name_field_and_rule(body: dict[str, Any], needles: list[str]) -> None:
    """Each invalid request is refused with a message naming the field and the rule."""
    message = problems(body)
    for needle in needles:
        assert needle in message


def test_every_problem_is_reported_at_once() -> None:
    """Several wrong fields: one error listing each of them."""
    body = {**BASE, "grain": "week", "limit": 0, "time_zone": "Nowhere", "group_by": ["agent"], "mode": "x"}
    with pytest.raises(ReportQueryError) as info:
        parse_report_query(body, now=NOW)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "grain",
        "group_by[0]",
        "limit",
        "time_zone",
        "mode",
    ]


def test_retention_is_configurable() -> None:
    """`retention_days` moves the oldest allowed `from`."""
    body = {**BASE, "from": "2026-10-20T00:00:00Z"}
    assert "kept 7 days" in problems(body, retention_days=7)
    assert parse_report_query(body, now=NOW, retention_days=11).start.day == 20


def test_quality_metrics_accept_their_dimensions() -> None:
    """Evaluator/guardrail metrics take their own dimensions (the report will be empty)."""
    body = {**BASE, "metric": "genai.evaluator.pass_rate", "group_by": ["evaluator_name", "identity"]}
    q = parse_report_query(body, now=NOW)
    assert not q.is_usage and q.group_by == ("evaluator_name", "identity")


def test_echo_normalizes_values() -> None:
    """The echo has the keys sent, with canonical UTC times, integral limit and normalized filters."""
    body = {
        **BASE,
        "from": "2026-10-21T02:00:00+02:00",
        "limit": 10.0,
        "grain": None,
        "time_zone": "",
        "filters": [{"values": ["a"], "op": "eq", "field": "identity"}],
    }
    q = parse_report_query(body, now=NOW)
    assert q.echo == {
        "metric": "genai.cost",
        "from": "2026-10-21T00:00:00Z",
        "to": "2026-10-28T00:00:00Z",
        "filters": [{"field": "identity", "op": "eq", "values": ["a"]}],
        "limit": 10,
        "time_zone": "",
    }
    assert q.zone_name == "UTC"
