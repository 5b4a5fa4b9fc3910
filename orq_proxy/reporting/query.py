"""The reporting request (`POST /v2/reporting`): parsing and every validation rule, in one place.

`parse_report_query(body, now=..., retention_days=...)` turns the JSON body into a `ReportQuery` or raises
`ReportQueryError` listing every problem, each naming the field and the rule (the API answers 400, code 3).
Nothing here touches the database or the web framework.

Rules (the wire contract is spec §4; the choices below are this gateway's and are documented in README):
- `metric`: exactly one of the 18 SDK metrics. Evaluator and guardrail metrics are accepted and answer
  with no rows and a warning (this gateway records none).
- `from` (inclusive) / `to` (exclusive): RFC 3339 date-times; without an offset they are UTC.
  `from < to`, `to - from <= 90 days`, and `from` no older than the retention window (`retention_days`).
- `grain`: `auto` picks minute up to 6 hours, hour up to 7 days, day beyond. An explicit grain may not be
  too fine for the range: minute at most 1 day, hour at most 31 days, day at most 90 days.
- `group_by`: the 34 SDK dimensions. Each must be valid for the metric; for usage metrics it must also be
  one this gateway records (`SUPPORTED_DIMENSIONS`). No repeats.
- `filters`: at most 20, ANDed; `eq`/`neq` take exactly one value, `in`/`not_in` 1 to 100; same field
  rules as `group_by`, plus `billing_billable` (filter-only, values `true`/`false`).
- `limit`: 1..5000, default 1000. `time_zone`: an IANA name, empty = UTC. `mode`: `timeseries` | `scalar`.
  `sort`: `desc` | `asc` (orders scalar rows by value). `include_totals`: boolean.
- Unknown keys are rejected (a typo like `groupBy` would otherwise be silently ignored).
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from orq_proxy.timefmt import rfc3339

__all__ = [
    "AUTO_GRAIN_LIMITS",
    "BUNDLE_FIELDS",
    "DEFAULT_LIMIT",
    "FILTER_FIELDS",
    "GRAINS",
    "GRAIN_MAX_RANGE",
    "GROUP_BY_VALUES",
    "MAX_FILTERS",
    "MAX_FILTER_VALUES",
    "MAX_FILTER_VALUE_CHARS",
    "MAX_LIMIT",
    "MAX_RANGE",
    "METRICS",
    "MODES",
    "OPS",
    "QUALITY_METRICS",
    "SORTS",
    "SUPPORTED_DIMENSIONS",
    "USAGE_METRICS",
    "Filter",
    "ReportQuery",
    "ReportQueryError",
    "parse_report_query",
]

USAGE_METRICS: tuple[str, ...] = (
    "genai.requests",
    "genai.tokens",
    "genai.cost",
    "genai.errors",
    "genai.error_rate",
    "genai.latency.p50",
    "genai.latency.p95",
    "genai.latency.p99",
    "genai.ttft.avg",
    "genai.ttft.p50",
    "genai.ttft.p95",
    "genai.usage",
)
QUALITY_METRICS: tuple[str, ...] = (
    "genai.evaluator.runs",
    "genai.evaluator.pass_rate",
    "genai.evaluator.score.avg",
    "genai.guardrail.runs",
    "genai.guardrail.block_rate",
    "genai.guardrail.triggered",
)
METRICS: tuple[str, ...] = USAGE_METRICS + QUALITY_METRICS

# The `genai.usage` bundle: one metric entry per field, in this order (spec §4.3).
BUNDLE_FIELDS: tuple[str, ...] = (
    "request_count",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "input_cost",
    "output_cost",
    "total_cost",
    "cached_input_tokens",
    "cached_cost",
    "reasoning_tokens",
    "reasoning_cost",
    "audio_input_tokens",
    "audio_output_tokens",
    "error_count",
)

GRAINS: tuple[str, ...] = ("auto", "minute", "hour", "day")
MODES: tuple[str, ...] = ("timeseries", "scalar")
SORTS: tuple[str, ...] = ("desc", "asc")
OPS: tuple[str, ...] = ("eq", "neq", "in", "not_in")

# Core usage dimensions: recorded on every event.
_CORE_DIMENSIONS: tuple[str, ...] = (
    "project",
    "identity",
    "provider",
    "model",
    "product",
    "api_key",
    "status_code",
    "http_status_code",
    "credential_type",
)
# Entity dimensions: valid for usage metrics (orq routes them through entity attribution).
_ENTITY_DIMENSIONS: tuple[str, ...] = (
    "dimension",
    "dimension_type",
    "tag",
    "agent",
    "tool",
    "deployment",
    "evaluator",
    "dataset",
    "prompt",
    "policy",
    "conversation",
    "thread",
    "memory_store",
    "knowledge",
    "sheet",
)
# Evaluator and guardrail dimensions: valid only for the evaluator/guardrail metrics.
_QUALITY_ONLY_DIMENSIONS: tuple[str, ...] = (
    "guardrail_origin",
    "evaluator_name",
    "evaluator_type",
    "evaluator_version",
    "result_type",
    "evaluation_stage",
    "guardrail_stage",
    "evaluator_stage",
    "guardrail_action",
    "result_label",
)
# The SDK's `GroupBy` literal, in its order (34 values).
GROUP_BY_VALUES: tuple[str, ...] = (
    *_CORE_DIMENSIONS,
    *_ENTITY_DIMENSIONS,
    *_QUALITY_ONLY_DIMENSIONS,
)
FILTER_FIELDS: tuple[str, ...] = (*GROUP_BY_VALUES, "billing_billable")

# What this gateway records and can group or filter usage metrics by.
SUPPORTED_DIMENSIONS: tuple[str, ...] = (*_CORE_DIMENSIONS, "tag")

_USAGE_VALID = frozenset(_CORE_DIMENSIONS) | frozenset(_ENTITY_DIMENSIONS)
_QUALITY_VALID = frozenset(
    ("project", "identity", "api_key", "policy", "evaluator", *_QUALITY_ONLY_DIMENSIONS)
)
# orq: time to first token is not attributed to these entities (400 for that combination).
_TTFT_INVALID = frozenset(("agent", "tool", "deployment"))

MAX_FILTERS = 20
MAX_FILTER_VALUES = 100
MAX_FILTER_VALUE_CHARS = 1024
DEFAULT_LIMIT = 1000
MAX_LIMIT = 5000
MAX_RANGE = timedelta(days=90)

# An explicit grain may cover at most this range (buckets per group: 1440, 744, 90).
GRAIN_MAX_RANGE: dict[str, timedelta] = {
    "minute": timedelta(days=1),
    "hour": timedelta(days=31),
    "day": MAX_RANGE,
}
# `auto` takes the first grain whose limit covers the range (at most 360, 168 or 90 buckets).
AUTO_GRAIN_LIMITS: tuple[tuple[str, timedelta], ...] = (
    ("minute", timedelta(hours=6)),
    ("hour", timedelta(days=7)),
    ("day", MAX_RANGE),
)

_KNOWN_KEYS: tuple[str, ...] = (
    "metric",
    "from",
    "to",
    "grain",
    "group_by",
    "filters",
    "limit",
    "time_zone",
    "include_totals",
    "mode",
    "sort",
)

_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$",
)


class ReportQueryError(ValueError):
    """The request is invalid; `problems` holds one `field: rule` sentence per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Filter:
    """One predicate: `field op values` (values are the strings the client sent)."""

    field: str
    op: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """A validated reporting request.

    Attributes:
        start, end: the window `[start, end)` as aware UTC datetimes.
        grain: the grain as requested (`auto` included); `effective_grain` is the one used.
        zone_name: the IANA zone for bucket boundaries (`UTC` when none was given).
        echo: the request as the response's `request` field (normalized values, keys as sent).
    """

    metric: str
    start: datetime
    end: datetime
    grain: str
    effective_grain: str
    group_by: tuple[str, ...]
    filters: tuple[Filter, ...]
    limit: int
    zone_name: str
    include_totals: bool
    mode: str
    sort: str
    echo: dict[str, Any]

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.zone_name)

    @property
    def is_usage(self) -> bool:
        """True for metrics computed from usage events (not evaluator/guardrail metrics)."""
        return self.metric in USAGE_METRICS


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(values)


def _duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 86400:
        days = seconds / 86400
        return f"{days:g} day" + ("" if days == 1 else "s")
    hours = seconds / 3600
    return f"{hours:g} hour" + ("" if hours == 1 else "s")


@functools.cache
def _zone_names() -> frozenset[str]:
    # `localtime` is the host's zone under an alias, not an IANA name.
    return frozenset(zoneinfo.available_timezones() - {"localtime"})


def _parse_time(field: str, raw: Any, problems: list[str]) -> datetime | None:
    if raw is None:
        problems.append(f"{field}: required (an RFC 3339 date-time such as 2026-05-01T00:00:00Z)")
        return None
    if not isinstance(raw, str):
        problems.append(f"{field}: must be an RFC 3339 date-time string, got {type(raw).__name__}")
        return None
    match = _RFC3339.match(raw.strip())
    if not match:
        problems.append(f"{field}: {raw!r} is not an RFC 3339 date-time (e.g. 2026-05-01T00:00:00Z)")
        return None
    date, clock, fraction, offset = match.groups()
    fraction = (fraction or "")[:7]  # Python keeps microseconds; finer digits are dropped
    offset = (offset or "").upper().replace("Z", "+00:00")
    try:
        value = datetime.fromisoformat(f"{date}T{clock}{fraction}{offset}")
    except ValueError as exc:
        problems.append(f"{field}: {raw!r} is not a valid date-time ({exc})")
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # spec §1.3: a naive date-time is UTC
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        problems.append(f"{field}: {raw!r} is out of range (years 1 to 9999 in UTC)")
        return None


def _parse_enum(field: str, raw: Any, allowed: tuple[str, ...], default: str, problems: list[str]) -> str:
    if raw is None:
        return default
    if not isinstance(raw, str) or raw not in allowed:
        problems.append(f"{field}: must be one of {_choices(allowed)}, got {raw!r}")
        return default
    return raw


def _dimension_problem(where: str, name: str, metric: str | None) -> str | None:
    """Why `name` can't be used with `metric` (None when it can; also when the metric itself is invalid)."""
    if metric is None:
        return None
    if metric in USAGE_METRICS:
        if name not in _USAGE_VALID:
            return (
                f"{where}: {name!r} is not valid for metric {metric}: it applies to the evaluator and "
                "guardrail metrics only"
            )
        if metric.startswith("genai.ttft.") and name in _TTFT_INVALID:
            return f"{where}: {name!r} is not valid for {metric}: time to first token is not attributed to it"
        if name not in SUPPORTED_DIMENSIONS:
            return (
                f"{where}: {name!r} is not recorded by this gateway; supported dimensions: "
                f"{_choices(SUPPORTED_DIMENSIONS)}"
            )
        return None
    if name not in _QUALITY_VALID:
        return (
            f"{where}: {name!r} is not valid for metric {metric}; valid dimensions for evaluator and "
            f"guardrail metrics: {_choices(tuple(d for d in GROUP_BY_VALUES if d in _QUALITY_VALID))}"
        )
    return None


def _parse_group_by(raw: Any, metric: str | None, problems: list[str]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("group_by: must be a list of dimension names")
        return ()
    out: list[str] = []
    for i, name in enumerate(raw):
        where = f"group_by[{i}]"
        if name == "billing_billable":
            problems.append(f"{where}: 'billing_billable' is filter-only; group by credential_type instead")
            continue
        if not isinstance(name, str) or name not in GROUP_BY_VALUES:
            problems.append(
                f"{where}: unknown dimension {name!r}; must be one of {_choices(GROUP_BY_VALUES)}"
            )
            continue
        if name in out:
            problems.append(f"{where}: {name!r} is listed more than once")
            continue
        problem = _dimension_problem(where, name, metric)
        if problem:
            problems.append(problem)
            continue
        out.append(name)
    return tuple(out)


def _check_filter_values(where: str, field: str, values: list[str], problems: list[str]) -> None:
    if field == "billing_billable":
        bad = [v for v in values if v not in ("true", "false")]
        if bad:
            problems.append(f"{where}.values: billing_billable takes 'true' or 'false', got {bad[0]!r}")
    elif field == "http_status_code":
        bad = [v for v in values if not (v.isascii() and v.isdigit() and len(v) == 3)]
        if bad:
            problems.append(
                f"{where}.values: http_status_code takes HTTP status codes like '200', got {bad[0]!r}"
            )
    elif field == "status_code":
        bad = [v for v in values if v not in ("OK", "ERROR")]
        if bad:
            problems.append(f"{where}.values: status_code takes 'OK' or 'ERROR', got {bad[0]!r}")


def _parse_filter(i: int, raw: Any, metric: str | None, problems: list[str]) -> Filter | None:
    where = f"filters[{i}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an object {{field, op, values}}")
        return None
    before = len(problems)
    extra = sorted(set(raw) - {"field", "op", "values"})
    if extra:
        problems.append(f"{where}: unknown key {extra[0]!r}; a filter has field, op and values")
    field, op, values = raw.get("field"), raw.get("op"), raw.get("values")
    if field is None:
        problems.append(f"{where}.field: required; one of the group_by dimensions or billing_billable")
    elif not isinstance(field, str) or field not in FILTER_FIELDS:
        problems.append(f"{where}.field: unknown field {field!r}; must be one of {_choices(FILTER_FIELDS)}")
    elif field == "billing_billable":
        if metric is not None and metric not in USAGE_METRICS:
            problems.append(f"{where}.field: billing_billable applies to usage metrics only, not {metric}")
    else:
        problem = _dimension_problem(f"{where}.field", field, metric)
        if problem:
            problems.append(problem)
    if op is None:
        problems.append(f"{where}.op: required; one of {_choices(OPS)}")
    elif not isinstance(op, str) or op not in OPS:
        problems.append(f"{where}.op: must be one of {_choices(OPS)}, got {op!r}")
    if values is None:
        problems.append(f"{where}.values: required; a list of strings")
    elif not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        problems.append(f"{where}.values: must be a list of strings")
    else:
        if op in ("eq", "neq") and len(values) != 1:
            problems.append(f"{where}.values: op {op!r} takes exactly 1 value, got {len(values)}")
        elif op in ("in", "not_in") and not 1 <= len(values) <= MAX_FILTER_VALUES:
            problems.append(
                f"{where}.values: op {op!r} takes 1 to {MAX_FILTER_VALUES} values, got {len(values)}"
            )
        too_long = [v for v in values if not v or len(v) > MAX_FILTER_VALUE_CHARS]
        if too_long:
            problems.append(f"{where}.values: each value must be 1 to {MAX_FILTER_VALUE_CHARS} characters")
        elif isinstance(field, str):
            _check_filter_values(where, field, values, problems)
    if len(problems) > before or not (
        isinstance(field, str) and isinstance(op, str) and isinstance(values, list)
    ):
        return None
    return Filter(field=field, op=op, values=tuple(values))


def _parse_filters(raw: Any, metric: str | None, problems: list[str]) -> tuple[Filter, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("filters: must be a list of {field, op, values} objects")
        return ()
    if len(raw) > MAX_FILTERS:
        problems.append(f"filters: at most {MAX_FILTERS} filters, got {len(raw)}")
        return ()
    parsed = [_parse_filter(i, item, metric, problems) for i, item in enumerate(raw)]
    return tuple(f for f in parsed if f is not None)


def _parse_limit(raw: Any, problems: list[str]) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    # The SDK may send integral values as floats (spec §1.3); booleans are not numbers here.
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or (isinstance(raw, float) and not raw.is_integer())  # also NaN and infinities
    ):
        problems.append(f"limit: must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
        return DEFAULT_LIMIT
    if not 1 <= raw <= MAX_LIMIT:
        problems.append(f"limit: must be from 1 to {MAX_LIMIT}, got {int(raw)}")
        return DEFAULT_LIMIT
    return int(raw)


def _parse_time_zone(raw: Any, problems: list[str]) -> str:
    if raw is None or raw == "":
        return "UTC"
    if not isinstance(raw, str):
        problems.append("time_zone: must be an IANA time zone name such as Europe/Amsterdam")
        return "UTC"
    if raw in _zone_names():
        return raw
    hint = next((name for name in _zone_names() if name.lower() == raw.lower()), None)
    suffix = f" (did you mean {hint!r}?)" if hint else " such as Europe/Amsterdam"
    problems.append(f"time_zone: {raw!r} is not an IANA time zone name{suffix}")
    return "UTC"


def _check_window(
    start: datetime,
    end: datetime,
    *,
    grain: str,
    now: datetime,
    retention_days: int,
    problems: list[str],
) -> str:
    """Range rules; returns the effective grain."""
    if start >= end:
        problems.append(f"from must be before to (from {rfc3339(start)} is not before to {rfc3339(end)})")
        return "day"
    span = end - start
    if span > MAX_RANGE:
        problems.append(
            f"range: from..to spans {_duration(span)}; at most {_duration(MAX_RANGE)} per request"
        )
    oldest = now - timedelta(days=retention_days)
    if start < oldest:
        problems.append(
            f"from: {rfc3339(start)} is older than the retention window: events are kept "
            f"{retention_days} days, so from must be at or after {rfc3339(oldest)}"
        )
    if grain == "auto":
        return next((g for g, limit in AUTO_GRAIN_LIMITS if span <= limit), "day")
    if span > GRAIN_MAX_RANGE[grain]:
        coarser = [g for g in ("hour", "day") if span <= GRAIN_MAX_RANGE[g]]
        advice = " or ".join(f"'{g}'" for g in [*coarser, "auto"])
        problems.append(
            f"grain: '{grain}' is too fine for a {_duration(span)} range: {grain} buckets allow a range of at "
            f"most {_duration(GRAIN_MAX_RANGE[grain])}; use grain {advice}"
        )
    return grain


def parse_report_query(body: Mapping[str, Any], *, now: datetime, retention_days: int = 90) -> ReportQuery:
    """Validate a reporting request body.

    Args:
        body: the JSON object the client sent.
        now: the current time (aware), for the retention rule.
        retention_days: how far back `from` may reach.

    Raises:
        ReportQueryError: listing every problem, each naming its field.
    """
    problems: list[str] = []
    unknown = [k for k in body if k not in _KNOWN_KEYS]
    for key in unknown:
        problems.append(f"{key}: unknown field; the request takes {_choices(_KNOWN_KEYS)}")

    raw_metric = body.get("metric")
    metric: str | None = None
    if raw_metric is None:
        problems.append("metric: required (one metric per request)")
    elif isinstance(raw_metric, list):
        problems.append("metric: takes one metric name, not a list (send one request per metric)")
    elif not isinstance(raw_metric, str) or raw_metric not in METRICS:
        problems.append(f"metric: unknown metric {raw_metric!r}; must be one of {_choices(METRICS)}")
    else:
        metric = raw_metric

    start = _parse_time("from", body.get("from"), problems)
    end = _parse_time("to", body.get("to"), problems)
    grain = _parse_enum("grain", body.get("grain"), GRAINS, "auto", problems)
    group_by = _parse_group_by(body.get("group_by"), metric, problems)
    filters = _parse_filters(body.get("filters"), metric, problems)
    limit = _parse_limit(body.get("limit"), problems)
    zone_name = _parse_time_zone(body.get("time_zone"), problems)
    include_totals = body.get("include_totals")
    if include_totals is not None and not isinstance(include_totals, bool):
        problems.append(f"include_totals: must be true or false, got {include_totals!r}")
    mode = _parse_enum("mode", body.get("mode"), MODES, "timeseries", problems)
    sort = _parse_enum("sort", body.get("sort"), SORTS, "desc", problems)

    effective = "day"
    if start is not None and end is not None:
        # A scalar report is one bucket over the whole window: its grain buckets nothing, so no grain is too
        # fine for it, and `meta.effective_grain` names the grain the client gave, or `day`.
        window_grain = "auto" if mode == "scalar" else grain
        effective = _check_window(
            start,
            end,
            grain=window_grain,
            now=now.astimezone(UTC),
            retention_days=retention_days,
            problems=problems,
        )
        if mode == "scalar":
            effective = "day" if grain == "auto" else grain
    if problems or metric is None or start is None or end is None:
        raise ReportQueryError(problems)

    echo: dict[str, Any] = {}
    for key in _KNOWN_KEYS:
        if body.get(key) is None:
            continue
        if key == "from":
            echo[key] = rfc3339(start)
        elif key == "to":
            echo[key] = rfc3339(end)
        elif key == "filters":
            echo[key] = [{"field": f.field, "op": f.op, "values": list(f.values)} for f in filters]
        elif key == "group_by":
            echo[key] = list(group_by)
        elif key == "limit":
            echo[key] = limit
        else:
            echo[key] = body[key]

    return ReportQuery(
        metric=metric,
        start=start,
        end=end,
        grain=grain,
        effective_grain=effective,
        group_by=group_by,
        filters=filters,
        limit=limit,
        zone_name=zone_name,
        include_totals=bool(include_totals),
        mode=mode,
        sort=sort,
        echo=echo,
    )
