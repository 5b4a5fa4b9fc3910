"""Prometheus text exposition: series, histogram buckets, identity labels, cardinality cap, escaping."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from orq_proxy.metering.prometheus import CONTENT_TYPE, PrometheusMetrics, prometheus_route
from orq_proxy.sinks.base import EventBus
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.usage.events import UsageEvent


def event(**kw: Any) -> UsageEvent:
    data: dict[str, Any] = {
        "event_id": "e",
        "timestamp": datetime(2026, 1, 1, tzinfo=UTC),
        "workspace": "w",
        "project": "p",
        "api_key_id": "k",
        "provider": "openai",
        "model": "openai/gpt-4o",
        "identity": "user_1",
        "input_tokens": 10,
        "output_tokens": 5,
        "cached_input_tokens": 2,
        "reasoning_tokens": 1,
        "total_cost_nanos": 1_500_000_000,
        "latency_ms": 300.0,
        "ttft_ms": 40.0,
    }
    data.update(kw)
    return UsageEvent.model_validate(data)


def test_counters_and_histograms() -> None:
    """Requests by status, tokens by type, cost in USD, cumulative latency and ttft buckets."""
    prom = PrometheusMetrics(buckets=(0.1, 0.5))
    prom.observe(event())
    prom.observe(event(status="ERROR", latency_ms=2000.0, ttft_ms=None))
    text = prom.render()
    assert 'orq_proxy_requests_total{provider="openai",model="gpt-4o",product="other",status="OK"} 1' in text
    assert (
        'orq_proxy_requests_total{provider="openai",model="gpt-4o",product="other",status="ERROR"} 1' in text
    )
    for kind, n in (("input", 20), ("output", 10), ("cached_input", 4), ("reasoning", 2)):
        assert f'orq_proxy_tokens_total{{provider="openai",model="gpt-4o",type="{kind}"}} {n}' in text
    assert 'orq_proxy_cost_usd_total{provider="openai",model="gpt-4o"} 3' in text
    lat = "orq_proxy_request_duration_seconds"
    assert f'{lat}_bucket{{provider="openai",model="gpt-4o",le="0.1"}} 0' in text
    assert f'{lat}_bucket{{provider="openai",model="gpt-4o",le="0.5"}} 1' in text
    assert f'{lat}_bucket{{provider="openai",model="gpt-4o",le="+Inf"}} 2' in text
    assert f'{lat}_sum{{provider="openai",model="gpt-4o"}} 2.3' in text
    assert 'orq_proxy_time_to_first_token_seconds_count{provider="openai",model="gpt-4o"} 1' in text
    assert "# TYPE orq_proxy_request_duration_seconds histogram" in text and text.endswith("\n")
    assert "user_1" not in text  # identity is off by default


def test_identity_labels_when_enabled() -> None:
    """`identity_labels=True` adds the identity to request, token and cost series."""
    prom = PrometheusMetrics(identity_labels=True)
    prom.observe(event())
    assert (
        'orq_proxy_requests_total{provider="openai",model="gpt-4o",identity="user_1",product="other",status="OK"} 1'
        in (prom.render())
    )


def test_cardinality_cap_folds_new_models() -> None:
    """Past `max_series`, new models are counted under `__other__`."""
    prom = PrometheusMetrics(max_series=2)
    for i in range(5):
        prom.observe(event(model=f"openai/m{i}"))
    text = prom.render()
    assert 'model="m0"' in text and 'model="m1"' in text and 'model="m2"' not in text
    assert (
        'orq_proxy_requests_total{provider="openai",model="__other__",product="other",status="OK"} 3' in text
    )


def test_label_values_escaped() -> None:
    """Quotes, backslashes and newlines in label values are escaped."""
    prom = PrometheusMetrics()
    prom.observe(event(provider=None, model='we"ird\\mo\ndel'))
    assert 'model="we\\"ird\\\\mo\\ndel"' in prom.render()


@pytest.mark.parametrize("kwargs", [{"max_series": 0}, {"buckets": ()}, {"buckets": (1.0, 0.5)}])
def test_bad_settings(kwargs: dict[str, Any]) -> None:
    """Nonsense settings fail at construction."""
    with pytest.raises(ValueError):
        PrometheusMetrics(**kwargs)


async def test_route_serves_text_with_bus_stats() -> None:
    """The route answers Prometheus text including the sink queue and drop counters."""
    prom = PrometheusMetrics()
    prom.observe(event(price_source="unknown", total_cost_nanos=0))
    bus = EventBus([MemorySink()], max_queue=1)
    bus.put_nowait(event())
    bus.put_nowait(event())
    app = Starlette(routes=[prometheus_route(prom, bus)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"] == CONTENT_TYPE
    assert 'orq_proxy_sink_queue_depth{sink="memory"} 1' in resp.text
    assert 'orq_proxy_sink_events_dropped_total{sink="memory",reason="queue_full"} 1' in resp.text
    assert 'orq_proxy_unpriced_requests_total{provider="openai",model="gpt-4o"} 1' in resp.text


ADMIN = "sk-metrics-admin"
MEMBER = "sk-metrics-member"
KEYS = [{"key": ADMIN, "admin": True}, {"key": MEMBER}]


@pytest.mark.parametrize(
    ("server", "key", "status"),
    [
        ({}, None, 401),
        ({}, "sk-unknown", 401),
        ({}, MEMBER, 403),
        ({}, ADMIN, 200),
        ({"metrics": "admin"}, MEMBER, 403),
        ({"metrics": "open"}, None, 200),
        ({"metrics": "open"}, MEMBER, 200),
    ],
    ids=["no-key", "unknown-key", "member", "admin", "admin-explicit", "open", "open-member"],
)
def test_metrics_access(proxy_factory: Any, server: dict[str, Any], key: str | None, status: int) -> None:
    """With keys configured `/metrics` is for admin keys by default (401 plain text without a valid key, with
    `WWW-Authenticate: Bearer`; 403 for a non-admin key); `metrics = "open"` serves anyone."""
    _, proxy = proxy_factory({"api_keys": KEYS, "server": server})
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(proxy.url + "/metrics", headers=headers)
    assert r.status_code == status, r.text
    if status == 200:
        assert r.headers["content-type"] == CONTENT_TYPE and "orq_proxy_requests_total" in r.text
    else:
        assert r.headers["content-type"].startswith("text/plain") and "orq_proxy" not in r.text
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_metrics_open_without_keys(proxy_factory: Any) -> None:
    """In open mode (no `[[api_keys]]`) every caller is admin, so `/metrics` answers anyone."""
    _, proxy = proxy_factory()
    assert httpx.get(proxy.url + "/metrics").status_code == 200


def test_metrics_access_must_be_known() -> None:
    """A policy other than `admin` or `open` is refused when the route is built."""
    with pytest.raises(ValueError, match="access"):
        prometheus_route(PrometheusMetrics(), access="public")  # type: ignore[arg-type]


def test_product_labels_name_every_api_the_proxy_meters() -> None:
    """Anthropic's Messages API, compaction and retrievals have their own `product` label (not `other`)."""
    prom = PrometheusMetrics(buckets=(0.1, 0.5))
    for product in ("messages", "responses.compact", "responses.stored", "messages.batches", "nonsense"):
        prom.observe(event(product=product))
    text = prom.render()
    for product in ("messages", "responses.compact", "responses.stored", "messages.batches"):
        assert f'model="gpt-4o",product="{product}",status="OK"}} 1' in text
    assert 'model="gpt-4o",product="other",status="OK"} 1' in text  # the unknown one
