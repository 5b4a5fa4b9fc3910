"""`POST /v2/reporting` over a real socket: auth, scoping, the envelope, the 400s, as the SDK sees them
(against each event store: DuckDB and PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from orq_ai_sdk import Orq, models
from starlette.applications import Starlette

from orq_proxy.auth import KeyRing, Principal, hash_key
from orq_proxy.eventstore.duckdb import DuckDBEventStore
from orq_proxy.eventstore.postgres import PostgresEventStore
from orq_proxy.reporting.api import routes
from orq_proxy.reporting.query import QUALITY_METRICS
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.servers import ServerThread, serve_in_thread
from orq_proxy.usage.events import UsageEvent

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
DAY = datetime(2026, 5, 30, tzinfo=UTC)
KEYS = {
    "admin": Principal(workspace="acme", project="default", key_id="k_admin", admin=True),
    "user": Principal(workspace="acme", project="default", key_id="k_user", admin=False),
    "alpha": Principal(workspace="acme", project="alpha", key_id="k_alpha", admin=True),
    "other": Principal(workspace="globex", project="*", key_id="k_other", admin=True),
}
WINDOW: dict[str, Any] = {"from_": DAY, "to": DAY + timedelta(days=1)}
BODY = {"metric": "genai.requests", "from": "2026-05-30T00:00:00Z", "to": "2026-05-31T00:00:00Z"}


def event(i: int, **kwargs: Any) -> UsageEvent:
    data: dict[str, Any] = {
        "event_id": f"e{i}",
        "timestamp": DAY + timedelta(hours=(i * 5 + 2) % 24),
        "workspace": "acme",
        "project": "default",
        "api_key_id": "k_user",
        "identity": f"user_{i % 3}",
        "model": "openai/gpt-4o",
        "provider": "openai",
        "total_cost_nanos": 1_000 * i,
        "latency_ms": 100.0 + i,
    }
    data.update(kwargs)
    return UsageEvent(**data)


AnyStore = DuckDBEventStore | PostgresEventStore


@pytest.fixture(params=["duckdb", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[AnyStore]:
    """The test's events in each store (PostgreSQL: in a database of the test's own)."""
    store: AnyStore = (
        DuckDBEventStore()
        if request.param == "duckdb"
        else PostgresEventStore(request.getfixturevalue("pg_url"))
    )
    store.insert(
        [event(i) for i in range(10)]
        + [event(100 + i, project="alpha") for i in range(4)]
        + [event(200 + i, workspace="globex") for i in range(3)]
    )
    yield store
    store.close()


@pytest.fixture
def server(store: AnyStore) -> Iterator[ServerThread]:
    keyring = KeyRing((hash_key(f"sk-{name}"), principal) for name, principal in KEYS.items())
    app = Starlette(
        routes=routes(keyring=keyring, event_store=store, clock=FakeClock(NOW), retention_days=30)
    )
    with serve_in_thread(app) as server:
        yield server


def client(server: ServerThread, key: str = "admin") -> Orq:
    return Orq(api_key=f"sk-{key}", server_url=server.url, timeout_ms=10_000)


def error_body(exc: models.APIDefaultError) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


def test_envelope_and_request_id_header(server: ServerThread) -> None:
    """200 application/json with object, echo, data, has_more and meta; X-Request-Id = meta.request_id."""
    response = httpx.post(
        server.url + "/v2/reporting",
        json={**BODY, "grain": "hour", "group_by": ["identity"], "include_totals": True},
        headers={"Authorization": "Bearer sk-admin"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["object", "request", "data", "totals", "has_more", "meta"]
    assert body["object"] == "report" and body["has_more"] is False
    assert body["request"] == {**BODY, "grain": "hour", "group_by": ["identity"], "include_totals": True}
    assert body["meta"] == {
        "effective_grain": "hour",
        "row_count": 10,
        "request_id": response.headers["x-request-id"],
        "currency": "USD",
        "warnings": [],
    }
    assert body["meta"]["request_id"].startswith("req_")
    assert body["data"][0] == {
        "timestamp": "2026-05-30T02:00:00Z",
        "dimensions": {"identity": "user_0"},
        "metrics": {"genai.requests": 1},
    }
    assert body["totals"] == {"metrics": {"genai.requests": 14}}  # 10 in project default, 4 in alpha
    assert "null" not in response.text


def test_sdk_parses_everything(server: ServerThread) -> None:
    """The SDK validates the echo, rows and meta; a naive `from_` goes out without offset and means UTC."""
    with client(server) as orq:
        report = orq.reporting.query(
            metric="genai.cost",
            from_=DAY.replace(tzinfo=None),
            to=DAY + timedelta(days=1),
            grain="day",
            group_by=["model", "identity"],
            filters=[{"field": "identity", "op": "in", "values": ["user_1", "user_2"]}],
            limit=100,
            time_zone="Europe/Amsterdam",
            include_totals=True,
            mode="timeseries",
            sort="desc",
        )
    assert (
        report.request is not None
        and report.request.from_ == DAY
        and report.request.time_zone == "Europe/Amsterdam"
    )
    assert report.meta is not None and report.meta.effective_grain == "day"
    # 2026-05-30T00:00Z is 02:00 in Amsterdam: the first local day starts at 22:00 UTC the day before.
    assert {row.timestamp for row in report.data or []} == {
        datetime(2026, 5, 29, 22, tzinfo=UTC),
        datetime(2026, 5, 30, 22, tzinfo=UTC),
    }
    cost = sum(1_000 * i for i in [*range(10), 100, 101, 102, 103] if i % 3 in (1, 2)) / 1e9
    assert report.totals is not None and report.totals.metrics == {"genai.cost": pytest.approx(cost, abs=0)}


def test_missing_or_unknown_key_is_401_typed(server: ServerThread) -> None:
    """No key or an unknown key: 401 `{"message","code":16}`, which the SDK raises as ErrorResponse."""
    for key in ("nope", None):
        with Orq(api_key=key, server_url=server.url) as orq, pytest.raises(models.ErrorResponse) as info:
            orq.reporting.query(metric="genai.requests", **WINDOW)
        assert info.value.data.code == 16
        assert "Authorization: Bearer" in info.value.data.message


def test_non_admin_key_is_403(server: ServerThread) -> None:
    """A key without admin may not query reports: 403 code 7."""
    with client(server, "user") as orq, pytest.raises(models.APIDefaultError) as info:
        orq.reporting.query(metric="genai.requests", **WINDOW)
    assert info.value.status_code == 403
    assert error_body(info.value)["code"] == 7


@pytest.mark.parametrize(
    ("key", "want"),
    [("admin", 14), ("alpha", 4), ("other", 3)],
)
def test_keys_see_their_workspace_and_project(server: ServerThread, key: str, want: int) -> None:
    """Workspace-wide keys (project default or *) see all projects; a project key only its own."""
    with client(server, key) as orq:
        report = orq.reporting.query(metric="genai.requests", mode="scalar", group_by=["project"], **WINDOW)
    assert sum(row.metrics["genai.requests"] for row in report.data or []) == want
    if key == "alpha":
        assert [row.dimensions for row in report.data or []] == [{"project": "alpha"}]


def test_project_key_filtering_another_project_is_403(server: ServerThread) -> None:
    """A project-scoped key naming another project in a filter: 403 naming both projects."""
    with client(server, "alpha") as orq:
        ok = orq.reporting.query(
            metric="genai.requests",
            filters=[{"field": "project", "op": "eq", "values": ["alpha"]}],
            mode="scalar",
            **WINDOW,
        )
        assert ok.data is not None and ok.data[0].metrics == {"genai.requests": 4}
        with pytest.raises(models.APIDefaultError) as info:
            orq.reporting.query(
                metric="genai.requests",
                filters=[{"field": "project", "op": "in", "values": ["alpha", "default"]}],
                **WINDOW,
            )
    assert info.value.status_code == 403
    body = error_body(info.value)
    assert (
        body["code"] == 7
        and "scoped to project 'alpha'" in body["message"]
        and "'default'" in body["message"]
    )


SDK_BAD: list[tuple[dict[str, Any], str]] = [
    ({"from_": DAY, "to": DAY}, "from must be before to"),
    (
        {"from_": DAY - timedelta(days=31), "to": DAY},
        "older than the retention window: events are kept 30 days",
    ),
    ({"from_": DAY - timedelta(days=20), "to": DAY + timedelta(days=80)}, "at most 90 days"),
    (
        {**WINDOW, "grain": "minute", "to": DAY + timedelta(days=2)},
        "minute buckets allow a range of at most 1 day",
    ),
    (
        {**WINDOW, "time_zone": "Europe/Atlantis"},
        "time_zone: 'Europe/Atlantis' is not an IANA time zone name",
    ),
    ({**WINDOW, "group_by": ["deployment"]}, "supported dimensions: project, identity, provider, model"),
    ({**WINDOW, "group_by": ["result_label"]}, "'result_label' is not valid for metric genai.requests"),
    ({**WINDOW, "filters": [{"field": "model", "op": "eq", "values": ["a", "b"]}]}, "takes exactly 1 value"),
    ({**WINDOW, "filters": [{"field": "model", "op": "in"}]}, "filters[0].values: required"),
    ({**WINDOW, "filters": [{"field": "model", "op": "eq", "values": ["x"]}] * 21}, "at most 20 filters"),
    ({**WINDOW, "limit": 5001}, "limit: must be from 1 to 5000"),
]


@pytest.mark.parametrize(("kwargs", "needle"), SDK_BAD)
def test_invalid_requests_through_sdk_are_400_code_3(
    server: ServerThread, kwargs: dict[str, Any], needle: str
) -> None:
    """What the SDK lets through but the server refuses: 400 `{"message","code":3}` naming the rule."""
    with client(server) as orq, pytest.raises(models.APIDefaultError) as info:
        orq.reporting.query(metric="genai.requests", **kwargs)
    assert info.value.status_code == 400
    body = error_body(info.value)
    assert body["code"] == 3 and needle in body["message"]
    assert info.value.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"not json", "request body is not valid JSON"),
        (b"[1]", "request body must be a JSON object"),
        (json.dumps({**BODY, "metric": "genai.bogus"}).encode(), "metric: unknown metric 'genai.bogus'"),
        (json.dumps({**BODY, "group_by": ["billing_billable"]}).encode(), "filter-only"),
    ],
)
def test_invalid_bodies_the_sdk_cannot_send(server: ServerThread, raw: bytes, needle: str) -> None:
    """Bodies the SDK would refuse client-side still get a precise 400 from the server."""
    response = httpx.post(
        server.url + "/v2/reporting",
        content=raw,
        headers={"Authorization": "Bearer sk-admin", "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["code"] == 3 and needle in response.json()["message"]


@pytest.mark.parametrize("metric", QUALITY_METRICS)
def test_quality_metrics_are_empty_with_a_warning(server: ServerThread, metric: Any) -> None:
    """Evaluator and guardrail metrics: a valid, empty report whose warning says none are recorded."""
    with client(server) as orq:
        report = orq.reporting.query(metric=metric, group_by=["identity"], include_totals=True, **WINDOW)
    assert report.data == [] and report.has_more is False
    assert report.totals is not None and report.totals.metrics == {}
    assert report.meta is not None and report.meta.warnings is not None
    assert f"{metric}: this gateway records no evaluator or guardrail results" in report.meta.warnings[0]
    assert report.meta.warnings[1:] == ["totals_unavailable"]


def test_new_events_are_visible_at_once(server: ServerThread, store: AnyStore) -> None:
    """An event inserted into the store shows up in the very next report."""
    with client(server) as orq:
        before = orq.reporting.query(metric="genai.requests", mode="scalar", **WINDOW)
        store.insert([event(999)])
        after = orq.reporting.query(metric="genai.requests", mode="scalar", **WINDOW)
    assert before.data is not None and after.data is not None
    assert after.data[0].metrics["genai.requests"] == before.data[0].metrics["genai.requests"] + 1


def test_store_failure_is_500_code_13_with_request_id(server: ServerThread, store: AnyStore) -> None:
    """A failing query answers 500 `{"message","code":13}` quoting the request id (also in the header)."""
    store.close()
    response = httpx.post(
        server.url + "/v2/reporting", json=BODY, headers={"Authorization": "Bearer sk-admin"}
    )
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == 13 and response.headers["x-request-id"] in body["message"]


def test_retention_days_must_be_positive(store: AnyStore) -> None:
    """A zero retention is a configuration error."""
    with pytest.raises(ValueError, match="retention_days"):
        routes(keyring=KeyRing(), event_store=store, clock=FakeClock(NOW), retention_days=0)


def test_readme_example_runs(store: AnyStore) -> None:
    """The README's Reporting snippet runs as written against a server (only the URL changed)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Reporting\n", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    app = Starlette(routes=routes(keyring=KeyRing(), event_store=store, clock=FakeClock(NOW)))
    with serve_in_thread(app) as server:
        namespace: dict[str, Any] = {}
        exec(snippet.replace("http://127.0.0.1:8080", server.url), namespace)
    report = namespace["report"]
    assert report.object == "report" and report.meta.effective_grain == "day"
    assert report.totals.metrics == {"genai.cost": 0}


def test_scalar_reports_name_no_bucket_grain(server: ServerThread) -> None:
    """A scalar report is one bucket over the window: over one hour it does not claim `minute` buckets
    (auto gives `day`), an explicit grain is echoed, and no grain is too fine for a scalar."""
    hour = {"from_": DAY, "to": DAY + timedelta(hours=1)}
    with client(server, "admin") as orq:
        auto = orq.reporting.query(metric="genai.requests", mode="scalar", **hour)
        assert auto.meta is not None and auto.meta.effective_grain == "day"
        hourly = orq.reporting.query(metric="genai.requests", mode="scalar", grain="hour", **hour)
        assert hourly.meta is not None and hourly.meta.effective_grain == "hour"
        # 'minute' over two days is refused for a time series, but a scalar has no minute buckets.
        two_days = {"from_": DAY, "to": DAY + timedelta(days=2)}
        with pytest.raises(models.APIDefaultError):
            orq.reporting.query(metric="genai.requests", grain="minute", **two_days)
        scalar = orq.reporting.query(metric="genai.requests", mode="scalar", grain="minute", **two_days)
        assert scalar.data is not None and scalar.data[0].metrics == {"genai.requests": 14}
        series = orq.reporting.query(metric="genai.requests", grain="hour", **hour)
        assert series.meta is not None and series.meta.effective_grain == "hour"
