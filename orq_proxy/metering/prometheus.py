"""`/metrics`: Prometheus text exposition (format 0.0.4) of requests, tokens, cost, latency and the sink bus.

Written by hand (the format is a few lines of text) rather than adding a client library. Labels stay
low-cardinality: provider, model and status, plus the product (which API) on the request counter, from a
fixed list (anything else is `other`); the identity label is off unless asked for. Label sets
beyond `max_series` per metric fold into `model="__other__"` (and `identity="__other__"`), so a client
sending random model names cannot grow memory without bound.

Updated synchronously from the metering `finally` (`observe`), never raises there (the middleware guards
it), and rendered on each scrape.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from orq_proxy.auth import KeyRing, bearer_token
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.money import nanos_to_usd

# Returns the upstream pool's (open, idle) connection counts (`UpstreamApp.connection_counts`).
ConnectionCounts = Callable[[], tuple[int, int]]

if TYPE_CHECKING:
    from orq_proxy.sinks.base import EventBus

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "ESTIMATE_RATIO_BUCKETS",
    "OTHER",
    "ConnectionCounts",
    "PrometheusMetrics",
    "prometheus_route",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# actual / estimated input tokens (the estimate is ~4 bytes per token): below 1 the estimate was high.
ESTIMATE_RATIO_BUCKETS: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0)
OTHER = "__other__"
_TOKEN_KINDS = ("input", "output", "cached_input", "reasoning")
# The `product` label's values (the API a path belongs to); a client-chosen path outside them is `other`.
_PRODUCTS = frozenset(
    {
        "chat.completions",
        "chat.completions.stored",
        "responses",
        "responses.compact",
        "responses.stored",
        "messages",
        "messages.count_tokens",
        "messages.batches",
        "embeddings",
        "completions",
        "moderations",
        "rerank",
        "models",
        "images",
        "audio",
        "files",
        "batches",
        "uploads",
        "fine_tuning",
        "vector_stores",
        "assistants",
        "threads",
        "realtime",
        "videos",
    }
)

_LabelKey = tuple[str, ...]
# The usage event's metadata key the budget gate sets when it let an unpriced model through a cost budget
# (`budgets.middleware.UNPRICED_ALLOWED_KEY`; a slice does not import another slice's middleware).
_UNPRICED_ALLOWED = "unpriced_allowed"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self, n_buckets: int) -> None:
        self.counts = [0] * (n_buckets + 1)  # the last one is +Inf
        self.sum = 0.0


class PrometheusMetrics:
    """Counters and histograms fed with every `UsageEvent`, rendered as Prometheus text.

    Args:
        identity_labels: add an `identity` label to the request, token and cost series.
        max_series: label sets kept per metric before new models fold into `__other__`.
        buckets: latency histogram bucket bounds, seconds.
    """

    def __init__(
        self,
        *,
        identity_labels: bool = False,
        max_series: int = 1000,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if max_series < 1:
            raise ValueError("max_series must be at least 1")
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("buckets must be a non-empty increasing sequence")
        self.identity_labels = identity_labels
        self.max_series = max_series
        self.buckets = tuple(float(b) for b in buckets)
        self.base_labels: tuple[str, ...] = ("provider", "model", *(("identity",) if identity_labels else ()))
        self.requests: dict[_LabelKey, int] = {}  # base labels + product + status
        self.tokens: dict[_LabelKey, list[int]] = {}  # base labels -> per _TOKEN_KINDS
        self.cost_nanos: dict[_LabelKey, int] = {}
        self.estimated: dict[_LabelKey, int] = {}
        self.unpriced: dict[tuple[str, str], int] = {}
        self.unpriced_allowed: dict[tuple[str, str], int] = {}
        self.latency: dict[tuple[str, str], _Histogram] = {}
        self.ttft: dict[tuple[str, str], _Histogram] = {}
        self.estimate_ratio: dict[tuple[str, str], _Histogram] = {}

    def _key(self, event: UsageEvent) -> _LabelKey:
        provider = event.provider or ""
        model = event.model or ""
        if provider and model.startswith(provider + "/"):
            model = model[len(provider) + 1 :]
        if self.identity_labels:
            return (provider, model, event.identity or "")
        return (provider, model)

    def _bounded(self, table: Mapping[_LabelKey, object], key: _LabelKey) -> _LabelKey:
        if key in table or len(table) < self.max_series:
            return key
        return (key[0], OTHER, *(OTHER for _ in key[2:]))

    def observe(self, event: UsageEvent, estimated_input_tokens: int | None = None) -> None:
        """Count one settled request; `estimated_input_tokens`: the proxy's estimate of its input, when
        the upstream reported the actual count (for the estimate-error histogram)."""
        base = self._bounded(self.tokens, self._key(event))
        product = event.product if event.product in _PRODUCTS else "other"
        req_key = (*base, product, event.status)
        self.requests[req_key] = self.requests.get(req_key, 0) + 1
        tokens = self.tokens.get(base)
        if tokens is None:
            tokens = self.tokens[base] = [0, 0, 0, 0]
        tokens[0] += event.input_tokens
        tokens[1] += event.output_tokens
        tokens[2] += event.cached_input_tokens
        tokens[3] += event.reasoning_tokens
        self.cost_nanos[base] = self.cost_nanos.get(base, 0) + event.total_cost_nanos
        pm = (base[0], base[1])
        if event.usage_source == "estimated":
            self.estimated[base] = self.estimated.get(base, 0) + 1
        if event.price_source == "unknown" and (event.input_tokens or event.output_tokens):
            self.unpriced[pm] = self.unpriced.get(pm, 0) + 1
        metadata = event.metadata
        if metadata and metadata.get(_UNPRICED_ALLOWED) == "1":
            self.unpriced_allowed[pm] = self.unpriced_allowed.get(pm, 0) + 1
        self._observe(self.latency, pm, event.latency_ms / 1000.0)
        if estimated_input_tokens and event.input_tokens:
            ratio = self.estimate_ratio.get(pm)
            if ratio is None:
                ratio = self.estimate_ratio[pm] = _Histogram(len(ESTIMATE_RATIO_BUCKETS))
            value = event.input_tokens / estimated_input_tokens
            ratio.counts[bisect.bisect_left(ESTIMATE_RATIO_BUCKETS, value)] += 1
            ratio.sum += value
        if event.ttft_ms is not None:
            self._observe(self.ttft, pm, event.ttft_ms / 1000.0)

    def _observe(
        self, table: dict[tuple[str, str], _Histogram], key: tuple[str, str], seconds: float
    ) -> None:
        hist = table.get(key)
        if hist is None:
            hist = table[key] = _Histogram(len(self.buckets))
        hist.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        hist.sum += seconds

    # -- rendering -----------------------------------------------------------------------------------
    def render(self, bus: EventBus | None = None, connections: ConnectionCounts | None = None) -> str:
        """The exposition text (ends with a newline). `connections` gives the upstream pool's (open, idle)."""
        lines: list[str] = []
        base = self.base_labels

        def head(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        head("orq_proxy_requests_total", "counter", "Proxied requests, by outcome.")
        for key, n in sorted(self.requests.items()):
            lines.append(f"orq_proxy_requests_total{_labels((*base, 'product', 'status'), key)} {n}")
        head("orq_proxy_tokens_total", "counter", "Tokens used (input includes cached, output reasoning).")
        for key, counts in sorted(self.tokens.items()):
            for kind, n in zip(_TOKEN_KINDS, counts, strict=True):
                labels = _labels(base, key, 'type="' + kind + '"')
                lines.append(f"orq_proxy_tokens_total{labels} {n}")
        head("orq_proxy_cost_usd_total", "counter", "Cost in USD, from genai-prices or config overrides.")
        for key, nanos in sorted(self.cost_nanos.items()):
            lines.append(f"orq_proxy_cost_usd_total{_labels(base, key)} {_num(nanos_to_usd(nanos))}")
        head(
            "orq_proxy_estimated_usage_total", "counter", "Requests whose usage was estimated, not reported."
        )
        for key, n in sorted(self.estimated.items()):
            lines.append(f"orq_proxy_estimated_usage_total{_labels(base, key)} {n}")
        head("orq_proxy_unpriced_requests_total", "counter", "Requests with tokens but no known price.")
        for pm, n in sorted(self.unpriced.items()):
            lines.append(f"orq_proxy_unpriced_requests_total{_labels(('provider', 'model'), pm)} {n}")
        head(
            "orq_proxy_budget_unpriced_allowed_total",
            "counter",
            'Requests with an unpriced model let through a cost budget ([budgets] unpriced = "allow").',
        )
        for pm, n in sorted(self.unpriced_allowed.items()):
            lines.append(f"orq_proxy_budget_unpriced_allowed_total{_labels(('provider', 'model'), pm)} {n}")
        self._render_histogram(
            lines,
            "orq_proxy_request_duration_seconds",
            "Request latency, arrival to last byte.",
            self.latency,
        )
        self._render_histogram(
            lines, "orq_proxy_time_to_first_token_seconds", "Streams: arrival to first body byte.", self.ttft
        )
        self._render_histogram(
            lines,
            "orq_proxy_input_tokens_actual_over_estimate",
            "Upstream-reported input tokens / the proxy's estimate (~4 bytes per token), per request.",
            self.estimate_ratio,
            ESTIMATE_RATIO_BUCKETS,
        )
        if bus is not None:
            stats = bus.stats()
            head("orq_proxy_sink_queue_depth", "gauge", "Usage events waiting for a sink.")
            for s in stats:
                lines.append(f"orq_proxy_sink_queue_depth{_labels(('sink',), (s.name,))} {s.queued}")
            head("orq_proxy_sink_events_written_total", "counter", "Usage events written by a sink.")
            for s in stats:
                lines.append(
                    f"orq_proxy_sink_events_written_total{_labels(('sink',), (s.name,))} {s.written}"
                )
            head("orq_proxy_sink_failed_batches_total", "counter", "Sink writes that failed or timed out.")
            for s in stats:
                lines.append(
                    f"orq_proxy_sink_failed_batches_total{_labels(('sink',), (s.name,))} {s.failed_batches}"
                )
            head(
                "orq_proxy_sink_events_dropped_total", "counter", "Usage events a sink never got, by reason."
            )
            for s in stats:
                for reason, n in (
                    ("queue_full", s.dropped_full),
                    ("write_failed", s.dropped_failed),
                    ("shutdown", s.dropped_shutdown),
                ):
                    labels = _labels(("sink", "reason"), (s.name, reason))
                    lines.append(f"orq_proxy_sink_events_dropped_total{labels} {n}")
        if connections is not None:
            open_now, idle = connections()
            head(
                "orq_proxy_upstream_connections",
                "gauge",
                "Upstream connections: all open, and idle in the pool.",
            )
            lines.append(f'orq_proxy_upstream_connections{{state="open"}} {open_now}')
            lines.append(f'orq_proxy_upstream_connections{{state="idle"}} {idle}')
        return "\n".join(lines) + "\n"

    def _render_histogram(
        self,
        lines: list[str],
        name: str,
        help_text: str,
        table: dict[tuple[str, str], _Histogram],
        buckets: Sequence[float] | None = None,
    ) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} histogram")
        names = ("provider", "model")
        for key, hist in sorted(table.items()):
            cumulative = 0
            for bound, n in zip((*(buckets or self.buckets), float("inf")), hist.counts, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else _num(bound)
                labels = _labels(names, key, 'le="' + le + '"')
                lines.append(f"{name}_bucket{labels} {cumulative}")
            lines.append(f"{name}_sum{_labels(names, key)} {_num(hist.sum)}")
            lines.append(f"{name}_count{_labels(names, key)} {cumulative}")


def prometheus_route(
    prom: PrometheusMetrics,
    bus: EventBus | None = None,
    path: str = "/metrics",
    connections: ConnectionCounts | None = None,
    *,
    keyring: KeyRing | None = None,
    access: Literal["open", "admin"] = "admin",
) -> Route:
    """A Starlette `Route` answering `GET path` with `prom.render(bus, connections)`.

    Args:
        keyring: the proxy's keys; None is open mode (no keys: every caller is admin).
        access: `"admin"`: only an admin key, sent as `Authorization: Bearer <key>` (Prometheus'
            `authorization` / `bearer_token` setting), may read it: 401 without a valid key, 403 for a
            non-admin one, both plain text. `"open"`: anyone.
    """
    if access not in ("admin", "open"):
        raise ValueError(f"access must be 'admin' or 'open', got {access!r}")
    ring = keyring if keyring is not None else KeyRing()
    guarded = access == "admin"  # in open mode `authenticate` makes every caller admin

    async def metrics(request: Request) -> Response:
        if guarded:
            principal = ring.authenticate(bearer_token(request.headers.get("authorization")))
            if principal is None:
                return PlainTextResponse(
                    "missing or invalid API key: send Authorization: Bearer <admin key>\n",
                    status_code=401,
                    headers={"www-authenticate": 'Bearer realm="orq-proxy metrics"'},
                )
            if not principal.admin:
                return PlainTextResponse(
                    f'{path} needs an admin key ([server] metrics = "admin")\n', status_code=403
                )
        return Response(prom.render(bus, connections), media_type=CONTENT_TYPE)

    return Route(path, metrics, methods=["GET"])
