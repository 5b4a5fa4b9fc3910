"""Reporting correctness: a seeded set of events, every answer computed independently in Python and compared
with what `orq.reporting.query(...)` gets from a real server (counts and sums exactly, quantiles exactly), for
each event store (DuckDB, PostgreSQL)."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from orq_ai_sdk import Orq
from starlette.applications import Starlette

from orq_proxy.auth import KeyRing
from orq_proxy.eventstore.duckdb import DuckDBEventStore
from orq_proxy.eventstore.postgres import PostgresEventStore
from orq_proxy.reporting.api import routes
from orq_proxy.reporting.engine import ReportEngine, offset_segments
from orq_proxy.reporting.query import BUNDLE_FIELDS, USAGE_METRICS, parse_report_query
from orq_proxy.reporting.source import ReportScope
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.servers import ServerThread, serve_in_thread
from orq_proxy.timefmt import rfc3339
from orq_proxy.usage.events import UsageEvent
from tests.conftest import fresh_database

NOW = datetime(2026, 10, 30, 12, 0, tzinfo=UTC)
# Ten days around the end of European summer time (2026-10-25 01:00 UTC).
DATA_START = datetime(2026, 10, 20, tzinfo=UTC)
DATA_END = datetime(2026, 10, 30, tzinfo=UTC)
IDENTITIES = [f"user_{i:02d}" for i in range(12)]
MODELS = ["openai/gpt-4o", "openai/gpt-4o-mini", "anthropic/claude-3-5-sonnet", "mistral/small"]
TAGS = ["beta", "eu", "pro", "us"]
ZONES = ["UTC", "Europe/Amsterdam", "Asia/Kolkata", "America/St_Johns"]


def _quarter(rng: random.Random, low: int, high: int) -> float:
    """A value that is a multiple of 0.25, so sums are exact in binary floating point."""
    return rng.randint(low * 4, high * 4) / 4


def make_events(seed: int = 6, n: int = 3000) -> list[UsageEvent]:
    """Events over several days: many identities, models, statuses, latencies, streams, tags, projects."""
    rng = random.Random(seed)
    span = int((DATA_END - DATA_START).total_seconds())
    events = []
    for i in range(n):
        if i < 40:  # some exactly on boundaries: UTC/Amsterdam midnights, the DST hour, Kolkata :30
            base = [
                datetime(2026, 10, 24, 22, tzinfo=UTC),
                datetime(2026, 10, 25, 0, tzinfo=UTC),
                datetime(2026, 10, 25, 1, tzinfo=UTC),
                datetime(2026, 10, 25, 23, tzinfo=UTC),
                datetime(2026, 10, 26, 18, 30, tzinfo=UTC),
            ][i % 5]
            ts = base - timedelta(microseconds=1) if i % 2 else base
        else:
            ts = DATA_START + timedelta(seconds=rng.randrange(span), microseconds=rng.randrange(1_000_000))
        model = rng.choice(MODELS)
        error = rng.random() < 0.1
        stream = rng.random() < 0.4
        inp, out = rng.randint(0, 3000), rng.randint(0, 900)
        cached, reasoning = rng.randint(0, inp), rng.randint(0, out)
        free = rng.random() < 0.1
        in_cost = 0 if free else inp * rng.choice([150, 2500])
        out_cost = 0 if free else out * rng.choice([600, 10000])
        events.append(
            UsageEvent(
                event_id=f"ev{i:05d}",
                timestamp=ts,
                workspace="other" if i % 97 == 0 else "default",
                project=rng.choice(["default", "default", "alpha", "beta"]),
                api_key_id=rng.choice(["key_a", "key_b", "key_c"]),
                identity=None if rng.random() < 0.1 else rng.choice(IDENTITIES),
                identity_source="body",
                identity_tags=rng.sample(TAGS, rng.randint(0, 2)),
                provider=model.split("/")[0],
                model=model,
                product=rng.choice(["chat.completions", "responses", "embeddings"]),
                status="ERROR" if error else "OK",
                http_status=rng.choice([429, 500, 502]) if error else 200,
                credential_type=rng.choice(["api_key", "byok"]),
                stream=stream,
                input_tokens=inp,
                output_tokens=out,
                total_tokens=inp + out,
                cached_input_tokens=cached,
                reasoning_tokens=reasoning,
                audio_input_tokens=rng.randint(0, 5),
                audio_output_tokens=rng.randint(0, 5),
                input_cost_nanos=in_cost,
                output_cost_nanos=out_cost,
                cached_cost_nanos=cached * 75,
                reasoning_cost_nanos=reasoning * 5000,
                total_cost_nanos=in_cost + out_cost,
                latency_ms=_quarter(rng, 20, 9000),
                ttft_ms=_quarter(rng, 5, 800) if stream and rng.random() < 0.95 else None,
            )
        )
    return events


EVENTS = make_events()


# ---------------------------------------------------------------- the oracle (plain Python, no SQL)


@dataclass
class Expected:
    rows: list[tuple[datetime | None, dict[str, str], dict[str, float]]]
    has_more: bool
    totals: dict[str, float]


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _usd(nanos: int) -> float:
    return round(nanos / 1e9, 10)


def _metric_values(metric: str, group: list[UsageEvent]) -> dict[str, float]:
    errors = sum(1 for e in group if e.status == "ERROR")
    latencies = [e.latency_ms for e in group]
    ttfts = [e.ttft_ms for e in group if e.stream and e.ttft_ms is not None]
    out: dict[str, float | None] = {}
    if metric == "genai.requests":
        out[metric] = len(group)
    elif metric == "genai.tokens":
        out[metric] = sum(e.total_tokens for e in group)
    elif metric == "genai.cost":
        out[metric] = _usd(sum(e.total_cost_nanos for e in group))
    elif metric == "genai.errors":
        out[metric] = errors
    elif metric == "genai.error_rate":
        out[metric] = round(errors / len(group), 10) if group else None
    elif metric.startswith("genai.latency.p"):
        q = int(metric.rsplit("p", 1)[1]) / 100
        out[metric] = round(_quantile(latencies, q), 10) if latencies else None
    elif metric == "genai.ttft.avg":
        out[metric] = round(sum(ttfts) / len(ttfts), 10) if ttfts else None
    elif metric.startswith("genai.ttft.p"):
        q = int(metric.rsplit("p", 1)[1]) / 100
        out[metric] = round(_quantile(ttfts, q), 10) if ttfts else None
    else:
        assert metric == "genai.usage"
        out = {
            "request_count": len(group),
            "input_tokens": sum(e.input_tokens for e in group),
            "output_tokens": sum(e.output_tokens for e in group),
            "total_tokens": sum(e.total_tokens for e in group),
            "input_cost": _usd(sum(e.input_cost_nanos for e in group)),
            "output_cost": _usd(sum(e.output_cost_nanos for e in group)),
            "total_cost": _usd(sum(e.total_cost_nanos for e in group)),
            "cached_input_tokens": sum(e.cached_input_tokens for e in group),
            "cached_cost": _usd(sum(e.cached_cost_nanos for e in group)),
            "reasoning_tokens": sum(e.reasoning_tokens for e in group),
            "reasoning_cost": _usd(sum(e.reasoning_cost_nanos for e in group)),
            "audio_input_tokens": sum(e.audio_input_tokens for e in group),
            "audio_output_tokens": sum(e.audio_output_tokens for e in group),
            "error_count": errors,
        }
    return {k: float(v) for k, v in out.items() if v is not None}


def _dimension(event: UsageEvent, name: str) -> str | None:
    value: Any = {
        "project": event.project,
        "identity": event.identity,
        "provider": event.provider,
        "model": event.model,
        "product": event.product,
        "api_key": event.api_key_id,
        "status_code": event.status,
        "http_status_code": str(event.http_status),
        "credential_type": event.credential_type,
    }[name]
    return value if value else None


def _matches(event: UsageEvent, flt: dict[str, Any], tag: str | None, tag_unnested: bool) -> bool:
    field, op, values = flt["field"], flt["op"], flt["values"]
    if field == "tag" and not tag_unnested:
        has = any(v in event.identity_tags for v in values)
        return has if op in ("eq", "in") else not has
    if field == "tag":
        value: str | None = tag
    elif field == "billing_billable":
        value = "true" if event.total_cost_nanos > 0 else "false"
    else:
        value = _dimension(event, field)
    inside = value in values
    return inside if op in ("eq", "in") else not inside


def _bucket(ts: datetime, grain: str, zone: ZoneInfo) -> datetime:
    """The start (UTC) of the bucket holding `ts`, worked out with zoneinfo on the event itself."""
    local = ts.astimezone(zone)
    if grain == "minute":
        return ts - timedelta(seconds=local.second, microseconds=local.microsecond)
    if grain == "hour":
        return ts - timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond)
    return datetime.combine(local.date(), time(0), tzinfo=zone).astimezone(UTC)


def _sort_key(dims: tuple[str | None, ...]) -> tuple[tuple[int, str], ...]:
    return tuple((0, "") if d is None else (1, d) for d in dims)


def oracle(
    *,
    metric: str,
    start: datetime,
    end: datetime,
    grain: str,
    zone: str = "UTC",
    group_by: tuple[str, ...] = (),
    filters: tuple[dict[str, Any], ...] = (),
    mode: str = "timeseries",
    sort: str = "desc",
    limit: int = 1000,
    workspace: str = "default",
    project: str | None = None,
) -> Expected:
    tz = ZoneInfo(zone)
    tag_unnested = "tag" in group_by
    scoped = [
        e
        for e in EVENTS
        if e.workspace == workspace
        and (project is None or e.project == project)
        and start <= e.timestamp < end
    ]
    totals_events = [e for e in scoped if all(_matches(e, f, None, False) for f in filters)]
    groups: dict[tuple[Any, ...], list[UsageEvent]] = defaultdict(list)
    if mode == "scalar" and not group_by:
        groups[(None,)] = []
    for event in scoped:
        tags: list[str | None] = [*event.identity_tags] if tag_unnested and event.identity_tags else [None]
        for tag in tags:
            if not all(_matches(event, f, tag, tag_unnested) for f in filters):
                continue
            dims = tuple(tag if name == "tag" else _dimension(event, name) for name in group_by)
            bucket = None if mode == "scalar" else _bucket(event.timestamp, grain, tz)
            groups[(bucket, *dims)].append(event)
    rows: list[tuple[Any, dict[str, str], dict[str, float], tuple[str | None, ...]]] = []
    for key, group in groups.items():
        values = _metric_values(metric, group)
        if not values:
            continue
        shown = {name: v for name, v in zip(group_by, key[1:], strict=False) if v is not None}
        rows.append((key[0], shown, values, key[1:]))
    if mode == "scalar":
        sort_fields = ["total_cost", "request_count"] if metric == "genai.usage" else [metric]
        rows.sort(key=lambda r: _sort_key(r[3]))
        rows.sort(key=lambda r: tuple(r[2][f] for f in sort_fields), reverse=(sort == "desc"))
    else:
        rows.sort(key=lambda r: (r[0], _sort_key(r[3])))
    return Expected(
        rows=[(r[0], r[1], r[2]) for r in rows[:limit]],
        has_more=len(rows) > limit,
        totals=_metric_values(metric, totals_events),
    )


# ---------------------------------------------------------------- fixtures and the comparison


AnyStore = DuckDBEventStore | PostgresEventStore


@contextmanager
def open_store(backend: str, request: pytest.FixtureRequest) -> Iterator[AnyStore]:
    """An empty store of `backend` (PostgreSQL: in a database of its own, dropped afterwards)."""
    if backend == "duckdb":
        duck = DuckDBEventStore()
        try:
            yield duck
        finally:
            duck.close()
        return
    with fresh_database(request.getfixturevalue("pg_server")) as url:
        pg = PostgresEventStore(url)
        try:
            yield pg
        finally:
            pg.close()


@pytest.fixture(scope="module", params=["duckdb", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[AnyStore]:
    """The events in each store, shared by the module's tests (which only read)."""
    with open_store(request.param, request) as store:
        store.insert(EVENTS)
        yield store


@pytest.fixture(scope="module")
def server(store: AnyStore) -> Iterator[ServerThread]:
    app = Starlette(routes=routes(keyring=KeyRing(), event_store=store, clock=FakeClock(NOW)))
    with serve_in_thread(app) as server:
        yield server


@pytest.fixture(scope="module")
def orq(server: ServerThread) -> Iterator[Orq]:
    with Orq(api_key="sk-open", server_url=server.url, timeout_ms=20_000) as client:
        yield client


def compare(orq: Orq, **kwargs: Any) -> Any:
    """Query through the SDK and check every row, the totals and has_more against the oracle."""
    start, end = kwargs["from_"], kwargs["to"]
    response = orq.reporting.query(include_totals=True, **kwargs)
    assert response.meta is not None
    grain = response.meta.effective_grain
    expected = oracle(
        metric=kwargs["metric"],
        start=start,
        end=end,
        grain=grain or "",
        zone=kwargs.get("time_zone") or "UTC",
        group_by=tuple(kwargs.get("group_by") or ()),
        filters=tuple(kwargs.get("filters") or ()),
        mode=kwargs.get("mode") or "timeseries",
        sort=kwargs.get("sort") or "desc",
        limit=kwargs.get("limit") or 1000,
    )
    got = [(d.timestamp, d.dimensions, d.metrics) for d in response.data or []]
    assert len(got) == len(expected.rows)
    for index, (have, want) in enumerate(zip(got, expected.rows, strict=True)):
        assert have == want, f"row {index}"
    assert response.has_more is expected.has_more
    assert response.totals is not None and response.totals.metrics == expected.totals
    assert response.meta.row_count == len(got)
    return response


WEEK = {"from_": datetime(2026, 10, 21, tzinfo=UTC), "to": datetime(2026, 10, 28, tzinfo=UTC)}


# ---------------------------------------------------------------- tests


def test_dataset_is_rich_enough() -> None:
    """The generated events cover what the comparisons need (else a test could pass vacuously)."""
    assert len({e.identity for e in EVENTS}) == len(IDENTITIES) + 1
    assert sum(e.status == "ERROR" for e in EVENTS) > 100
    assert sum(e.stream for e in EVENTS) > 500
    assert sum(e.total_cost_nanos == 0 for e in EVENTS) > 50
    assert sum(e.workspace == "other" for e in EVENTS) > 10
    assert sum(not e.identity_tags for e in EVENTS) > 100


@pytest.mark.parametrize("metric", USAGE_METRICS)
def test_every_metric_timeseries(orq: Orq, metric: str) -> None:
    """Each usage metric per day and model matches the independent computation, totals included."""
    response = compare(orq, metric=metric, grain="day", group_by=["model"], **WEEK)
    assert response.data, "a comparison over no rows proves nothing"


@pytest.mark.parametrize("metric", USAGE_METRICS)
@pytest.mark.parametrize("sort", ["desc", "asc"])
def test_every_metric_scalar(orq: Orq, metric: str, sort: Any) -> None:
    """Scalar mode: one row per identity over the window, ordered by value, no timestamp."""
    response = compare(orq, metric=metric, mode="scalar", sort=sort, group_by=["identity"], **WEEK)
    assert len(response.data) == len(IDENTITIES) + 1
    assert all(row.timestamp is None for row in response.data)


def test_usage_bundle_has_every_field(orq: Orq) -> None:
    """`genai.usage` carries exactly the 14 spec fields, and its scalar top row is the top spender."""
    response = compare(orq, metric="genai.usage", mode="scalar", group_by=["api_key"], **WEEK)
    assert list(response.data[0].metrics) == list(BUNDLE_FIELDS)
    costs = [row.metrics["total_cost"] for row in response.data]
    assert costs == sorted(costs, reverse=True)


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize(
    ("grain", "start", "end"),
    [
        ("minute", datetime(2026, 10, 24, 12, tzinfo=UTC), datetime(2026, 10, 25, 12, tzinfo=UTC)),
        ("hour", datetime(2026, 10, 23, 0, 30, tzinfo=UTC), datetime(2026, 10, 27, tzinfo=UTC)),
        ("day", DATA_START, DATA_END),
        ("auto", datetime(2026, 10, 25, 0, tzinfo=UTC), datetime(2026, 10, 25, 6, tzinfo=UTC)),
        ("auto", datetime(2026, 10, 22, tzinfo=UTC), datetime(2026, 10, 29, tzinfo=UTC)),
        ("auto", DATA_START, DATA_END),
    ],
)
def test_grains_and_time_zones(orq: Orq, zone: str, grain: Any, start: datetime, end: datetime) -> None:
    """Buckets start at the zone's :00 / midnight (DST and half-hour zones included), reported in UTC."""
    response = compare(orq, metric="genai.requests", grain=grain, time_zone=zone, from_=start, to=end)
    assert response.data
    if grain == "auto":
        span = end - start
        want = "minute" if span <= timedelta(hours=6) else "hour" if span <= timedelta(days=7) else "day"
        assert response.meta.effective_grain == want
    if grain == "day":
        starts = {row.timestamp for row in response.data}
        assert all(t.astimezone(ZoneInfo(zone)).time() == time(0) for t in starts)


def test_amsterdam_day_of_dst_end_is_25_hours(orq: Orq) -> None:
    """Local 25 October 2026 in Amsterdam starts 22:00 UTC the day before and lasts 25 hours."""
    response = compare(orq, metric="genai.requests", grain="day", time_zone="Europe/Amsterdam", **WEEK)
    starts = [row.timestamp for row in response.data]
    i = starts.index(datetime(2026, 10, 24, 22, tzinfo=UTC))
    assert starts[i + 1] == datetime(2026, 10, 25, 23, tzinfo=UTC)


def test_hour_buckets_in_half_hour_zone_start_at_half_past(orq: Orq) -> None:
    """Asia/Kolkata (+05:30): hour buckets start at :30 UTC."""
    response = compare(
        orq,
        metric="genai.latency.p50",
        grain="hour",
        time_zone="Asia/Kolkata",
        from_=datetime(2026, 10, 26, tzinfo=UTC),
        to=datetime(2026, 10, 27, tzinfo=UTC),
    )
    assert {row.timestamp.minute for row in response.data} == {30}


@pytest.mark.parametrize(
    "dimension",
    [
        "project",
        "identity",
        "provider",
        "model",
        "product",
        "api_key",
        "status_code",
        "http_status_code",
        "credential_type",
        "tag",
    ],
)
def test_every_supported_dimension(orq: Orq, dimension: Any) -> None:
    """Grouping by each recorded dimension; empty values (no identity, no tag) are omitted, never null."""
    response = compare(orq, metric="genai.usage", grain="day", group_by=[dimension], **WEEK)
    names = {name for row in response.data for name in row.dimensions}
    assert names == {dimension}
    if dimension in ("identity", "tag"):
        assert any(not row.dimensions for row in response.data)


def test_two_dimensions_and_tag_unnesting(orq: Orq) -> None:
    """Grouping by tag and model: an event with two tags counts in both tag rows."""
    response = compare(orq, metric="genai.requests", mode="scalar", group_by=["tag", "model"], **WEEK)
    total = sum(row.metrics["genai.requests"] for row in response.data)
    assert response.totals is not None
    assert total > response.totals.metrics["genai.requests"]


FILTER_CASES: list[list[dict[str, Any]]] = [
    [{"field": "identity", "op": "eq", "values": ["user_03"]}],
    [{"field": "identity", "op": "neq", "values": ["user_03"]}],
    [{"field": "identity", "op": "in", "values": ["user_01", "user_02", "nobody"]}],
    [{"field": "identity", "op": "not_in", "values": ["user_01", "user_02"]}],
    [{"field": "model", "op": "in", "values": ["openai/gpt-4o", "mistral/small"]}],
    [{"field": "provider", "op": "neq", "values": ["openai"]}],
    [{"field": "status_code", "op": "eq", "values": ["ERROR"]}],
    [{"field": "http_status_code", "op": "in", "values": ["429", "502"]}],
    [{"field": "http_status_code", "op": "not_in", "values": ["200"]}],
    [{"field": "billing_billable", "op": "eq", "values": ["false"]}],
    [{"field": "billing_billable", "op": "neq", "values": ["false"]}],
    [{"field": "tag", "op": "eq", "values": ["beta"]}],
    [{"field": "tag", "op": "neq", "values": ["beta"]}],
    [{"field": "tag", "op": "in", "values": ["eu", "us"]}],
    [{"field": "tag", "op": "not_in", "values": ["eu", "us"]}],
    [
        {"field": "project", "op": "in", "values": ["alpha", "default"]},
        {"field": "api_key", "op": "neq", "values": ["key_b"]},
        {"field": "credential_type", "op": "eq", "values": ["byok"]},
        {"field": "product", "op": "not_in", "values": ["embeddings"]},
    ],
]


@pytest.mark.parametrize("filters", FILTER_CASES)
@pytest.mark.parametrize("group_by", [["identity"], ["tag"]])
def test_filters(orq: Orq, filters: Any, group_by: Any) -> None:
    """Every operator on every kind of field, ANDed; a tag filter applies to the row's tag when grouped."""
    response = compare(orq, metric="genai.cost", grain="day", group_by=group_by, filters=filters, **WEEK)
    assert response.data


def test_limit_and_has_more(orq: Orq) -> None:
    """`limit` caps the rows in order; `has_more` says more exist."""
    compare(orq, metric="genai.tokens", grain="hour", group_by=["identity"], limit=7, **WEEK)
    response = compare(orq, metric="genai.tokens", mode="scalar", group_by=["identity"], limit=3, **WEEK)
    assert response.has_more is True and len(response.data) == 3
    response = compare(orq, metric="genai.tokens", mode="scalar", group_by=["model"], limit=4, **WEEK)
    assert response.has_more is False


def test_scalar_without_group_by_is_one_row(orq: Orq) -> None:
    """Scalar mode without group_by: a single row, even over a window without events (count 0)."""
    response = compare(orq, metric="genai.requests", mode="scalar", **WEEK)
    assert len(response.data) == 1 and response.data[0].dimensions == {}
    empty = {"from_": datetime(2026, 10, 5, tzinfo=UTC), "to": datetime(2026, 10, 6, tzinfo=UTC)}
    response = compare(orq, metric="genai.requests", mode="scalar", **empty)
    assert response.data[0].metrics == {"genai.requests": 0}


def test_no_value_rows_are_left_out(orq: Orq) -> None:
    """TTFT where a group has no streamed request has no value: that row is absent (not 0, not null)."""
    day = {"from_": datetime(2026, 10, 26, tzinfo=UTC), "to": datetime(2026, 10, 27, tzinfo=UTC)}
    ttft = compare(orq, metric="genai.ttft.avg", grain="hour", group_by=["identity"], **day)
    requests = compare(orq, metric="genai.requests", grain="hour", group_by=["identity"], **day)
    assert 0 < len(ttft.data) < len(requests.data)
    empty = orq.reporting.query(
        metric="genai.ttft.p95",
        from_=datetime(2026, 10, 5, tzinfo=UTC),
        to=datetime(2026, 10, 6, tzinfo=UTC),
        include_totals=True,
    )
    assert empty.data == []
    assert empty.totals is not None and empty.totals.metrics == {}
    assert empty.meta is not None and empty.meta.warnings == ["totals_unavailable"]


def test_offset_segments_find_dst_end_to_the_second() -> None:
    """Amsterdam's offset changes from +2h to +1h exactly at 2026-10-25 01:00:00 UTC."""
    segments = offset_segments(ZoneInfo("Europe/Amsterdam"), DATA_START, DATA_END)
    assert segments == [
        (DATA_START, timedelta(hours=2)),
        (datetime(2026, 10, 25, 1, tzinfo=UTC), timedelta(hours=1)),
    ]
    assert offset_segments(ZoneInfo("UTC"), DATA_START, DATA_END) == [(DATA_START, timedelta(0))]


async def test_engine_scopes_workspace_and_project(store: AnyStore) -> None:
    """The engine sees only the scope's workspace, and only its project when one is given."""
    engine = ReportEngine(store)
    body = {"metric": "genai.requests", "from": "2026-10-21T00:00:00Z", "to": "2026-10-28T00:00:00Z"}
    query = parse_report_query({**body, "mode": "scalar", "include_totals": True}, now=NOW)
    start, end = WEEK["from_"], WEEK["to"]
    cases: list[tuple[ReportScope, Callable[[UsageEvent], bool]]] = [
        (ReportScope("default"), lambda e: e.workspace == "default"),
        (ReportScope("other"), lambda e: e.workspace == "other"),
        (ReportScope("default", "alpha"), lambda e: e.workspace == "default" and e.project == "alpha"),
        (ReportScope("nobody"), lambda e: False),
    ]
    for scope, keep in cases:
        result = await engine.run(query, scope)
        want = sum(1 for e in EVENTS if keep(e) and start <= e.timestamp < end)
        assert result.rows[0].metrics == {"genai.requests": want}
        assert result.totals == {"genai.requests": want}


@pytest.mark.parametrize(
    ("zone", "grain", "start"),
    [
        # -02:30 -> -03:30 at 2026-11-01 04:30 UTC: hour buckets stay at :30 UTC.
        ("America/St_Johns", "hour", datetime(2026, 10, 31, 20, tzinfo=UTC)),
        ("America/St_Johns", "day", datetime(2026, 10, 31, 20, tzinfo=UTC)),
        # +10:30 -> +11:00 at 2026-10-03 15:30 UTC: hour buckets move from :30 to :00 UTC.
        ("Australia/Lord_Howe", "hour", datetime(2026, 10, 3, 9, tzinfo=UTC)),
        # -04:00 -> -03:00 at local midnight (2026-09-06 04:00 UTC): that local day starts at 01:00.
        ("America/Santiago", "day", datetime(2026, 9, 5, 20, tzinfo=UTC)),
        ("America/Santiago", "hour", datetime(2026, 9, 5, 20, tzinfo=UTC)),
    ],
)
@pytest.mark.parametrize("backend", ["duckdb", "postgres"])
def test_buckets_across_transitions(
    zone: str, grain: str, start: datetime, backend: str, request: pytest.FixtureRequest
) -> None:
    """Across DST transitions (sub-hour zones, a 30-minute shift, a midnight one) each event lands in the
    bucket zoneinfo gives for it."""
    events = [
        UsageEvent(
            event_id=f"t{i}",
            timestamp=start + timedelta(minutes=7 * i),
            workspace="w",
            project="p",
            api_key_id="k",
        )
        for i in range(140)
    ]
    with open_store(backend, request) as store:
        store.insert(events)
        body = {
            "metric": "genai.requests",
            "from": rfc3339(start),
            "to": rfc3339(start + timedelta(hours=17)),
            "grain": grain,
            "time_zone": zone,
        }
        query = parse_report_query(body, now=start + timedelta(days=2))
        result = ReportEngine(store).run_sync(query, ReportScope("w"))
    want: dict[datetime, int] = defaultdict(int)
    for e in events:
        want[_bucket(e.timestamp, grain, ZoneInfo(zone))] += 1
    assert [(row.timestamp, row.metrics["genai.requests"]) for row in result.rows] == sorted(want.items())
