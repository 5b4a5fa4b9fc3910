"""`MeteringMiddleware`: exactly one `UsageEvent` per proxied request, whatever its ending.

It sits just outside the upstream app and wraps `send`: every chunk is forwarded at once while a usage tap
reads it on the side (`taps.py`, bounded memory). For a chat or legacy-completions stream whose client did
not ask for usage, it sets `stream_options.include_usage` upstream and hides what that adds (the usage on
whatever chunk carries it, the chunks left with nothing else, the `"usage":null` fields), so the client gets
the bytes the upstream would have sent it.

Settlement happens once, in `finally`, on success, upstream error, exception, or client disconnect: the
event (exact usage, or an estimate flagged `usage_source="estimated"` with the reason in `usage_note`)
goes to every `ctx.settle_hooks` callback (the budget layer's), then to `listeners` (identity metrics),
then to the Prometheus counters, then onto the sink bus with `put_nowait`. That `finally` does only
synchronous work that cannot raise out of it; sinks run later in the bus's own tasks.

Statuses: `http_status` is the status the client got; a client that went away before the end of the
response is recorded as 499 (nginx's "client closed request"), since it got no complete answer. `status`
is ERROR when `http_status >= 400`, when the request raised, or when the stream carried an error event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orq_proxy.clock import Clock
from orq_proxy.context import RequestContext, get_context
from orq_proxy.metering.taps import AnthropicSSETap, JSONTap, ReportedUsage, SSETap
from orq_proxy.proxy.request import STORED_SUFFIX
from orq_proxy.usage.estimate import estimate_input_tokens, estimate_tokens_from_bytes
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.pricing import Pricer, TokenUsage

if TYPE_CHECKING:
    from orq_proxy.metering.prometheus import PrometheusMetrics

__all__ = ["CLIENT_CLOSED_STATUS", "TOKEN_PRODUCTS", "EventQueue", "MeteringMiddleware", "billed_product"]

logger = logging.getLogger(__name__)

CLIENT_CLOSED_STATUS = 499
# APIs whose answers carry token usage; for others a missing `usage` is not estimated.
TOKEN_PRODUCTS = frozenset(
    {"chat.completions", "responses", "responses.compact", "completions", "embeddings", "messages"}
)
# APIs whose streams only carry usage when `stream_options.include_usage` is set.
_INJECT_PRODUCTS = frozenset({"chat.completions", "completions"})


# APIs whose answers may carry usage that is not billed: counting tokens, and batches (whose results
# repeat the usage the provider bills for the batch, which the proxy does not meter).
_UNBILLED_PRODUCTS = frozenset({"messages.count_tokens", "batches", "messages.batches"})


def billed_product(product: str) -> bool:
    """Whether usage in an answer of `product` is billed: not for what only repeats a usage already
    charged (`GET /responses/{id}`, `{product}.stored`) or is never billed (counting tokens, batches)."""
    return product not in _UNBILLED_PRODUCTS and not product.endswith(STORED_SUFFIX)


class EventQueue(Protocol):
    """Where settled events go (an `EventBus`): must never block or raise."""

    def put_nowait(self, event: UsageEvent) -> None: ...


def _inject_include_usage(ctx: RequestContext) -> bool:
    """Ask the upstream for usage on a stream whose client did not; True when the body was changed."""
    body = ctx.body
    if not ctx.stream or ctx.product not in _INJECT_PRODUCTS or body is None:
        return False
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
    elif isinstance(options, dict):
        if options.get("include_usage") is True:
            return False
        body["stream_options"] = {**options, "include_usage": True}
    else:  # not an object: let the upstream reject it as it would without us
        return False
    ctx.body_changed = True
    return True


_Tap = SSETap | AnthropicSSETap | JSONTap


class _Meter:
    """Per-request state of one metered response (the responder object)."""

    __slots__ = (
        "anthropic",
        "billed",
        "client_gone",
        "complete",
        "content_type",
        "error",
        "first_byte_at",
        "hide_usage",
        "started",
        "status",
        "tap",
    )

    def __init__(self, hide_usage: bool, anthropic: bool = False, billed: bool = True) -> None:
        self.hide_usage = hide_usage
        self.anthropic = anthropic  # Anthropic's Messages API: its usage shape and stream events
        self.billed = billed  # False: no tap, so no usage (`billed_product`)
        self.started = False
        self.complete = False
        self.status = 0
        self.content_type = b""
        self.tap: _Tap | None = None
        self.first_byte_at: float | None = None
        self.client_gone = False
        self.error: BaseException | None = None


class MeteringMiddleware:
    """Meters every proxied request into one `UsageEvent` (see the module docstring).

    Args:
        app: the next ASGI app (the upstream).
        bus: where events go (`EventBus`); `put_nowait` must never block or raise.
        pricer: prices usage (`Pricer`).
        clock: time source; `ctx.started` must come from the same clock's `monotonic()`.
        listeners: sync callables given each event after the settle hooks (e.g. identity metrics).
        prom: Prometheus counters to update, if any.

    Example:
        app = MeteringMiddleware(upstream, bus=bus, pricer=Pricer(), clock=SystemClock(),
                                 listeners=[identity_metrics.record])
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        bus: EventQueue,
        pricer: Pricer,
        clock: Clock,
        listeners: Iterable[Callable[[UsageEvent], None]] = (),
        prom: PrometheusMetrics | None = None,
    ) -> None:
        self.app = app
        self.bus = bus
        self.pricer = pricer
        self.clock = clock
        self.listeners = tuple(listeners)
        self.prom = prom

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        meter = _Meter(
            hide_usage=_inject_include_usage(ctx),
            anthropic=ctx.api == "anthropic",
            billed=billed_product(ctx.product),
        )
        clock = self.clock

        async def send_and_meter(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                body: bytes = message.get("body", b"")
                more = bool(message.get("more_body", False))
                tap = meter.tap
                if tap is not None:
                    if isinstance(tap, SSETap) and tap.hide_usage:
                        body = tap.rewrite(body, final=not more)
                        if not body and more:
                            return  # only a held-back partial line: nothing to forward yet
                        message = {**message, "body": body}
                    else:
                        tap.feed(body)
                if body and meter.first_byte_at is None:
                    meter.first_byte_at = clock.monotonic()
                try:
                    await send(message)
                except BaseException:
                    meter.client_gone = True
                    raise
                if not more:
                    meter.complete = True
                return
            if kind == "http.response.start":
                message = self._on_start(meter, message)
            await send(message)

        try:
            await self.app(scope, receive, send_and_meter)
        except BaseException as exc:  # recorded, then re-raised untouched (cancellation included)
            meter.error = exc
            raise
        finally:
            self._settle(ctx, meter)

    def _on_start(self, meter: _Meter, message: Message) -> Message:
        meter.started = True
        meter.status = int(message["status"])
        headers: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
        encoded = False
        for key, value in headers:
            lowered = key.lower()
            if lowered == b"content-type":
                meter.content_type = value.lower()
            elif lowered == b"content-encoding" and value.lower() not in (b"identity", b""):
                encoded = True
        # Compressed: unreadable on the side, so usage will be estimated. Not billed: nothing to read.
        if encoded or not meter.billed:
            meter.hide_usage = False
            return message
        if meter.content_type.startswith(b"text/event-stream"):
            if meter.anthropic:
                meter.tap = AnthropicSSETap()
                return message
            rewrite = meter.hide_usage and meter.status < 400
            meter.hide_usage = rewrite
            meter.tap = SSETap(hide_usage=rewrite)
            if rewrite:  # the body gets shorter: its length is no longer known up front
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                return {**message, "headers": headers}
        elif b"json" in meter.content_type:
            meter.tap = JSONTap(anthropic=meter.anthropic)
        return message

    def record_unforwarded(self, ctx: RequestContext, http_status: int) -> None:
        """Record a request an outer layer answered itself (the budget gate's 429 or 503): one event with
        that status, no usage and no cost. Sync, never raises."""
        meter = _Meter(hide_usage=False)
        meter.started = meter.complete = True
        meter.status = http_status
        self._settle(ctx, meter)

    # -- settlement (sync, never raises) ----------------------------------------------------------
    def _settle(self, ctx: RequestContext, meter: _Meter) -> None:
        try:
            event = self._build_event(ctx, meter)
        except Exception:  # a bug here must not turn a served request into an error
            logger.exception("request %s: could not build its usage event", ctx.request_id)
            return
        for hook in ctx.settle_hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("request %s: settle hook %r failed", ctx.request_id, hook)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("request %s: usage listener %r failed", ctx.request_id, listener)
        if self.prom is not None:
            try:
                estimated = None
                if event.usage_source == "exact" and event.input_tokens and ctx.product in TOKEN_PRODUCTS:
                    estimated = estimate_input_tokens(ctx.body, len(ctx.raw_body))  # for the error histogram
                self.prom.observe(event, estimated)
            except Exception:
                logger.exception("request %s: prometheus update failed", ctx.request_id)
        try:
            self.bus.put_nowait(event)
        except Exception:  # the bus promises not to raise; belt and braces
            logger.exception("request %s: could not queue its usage event", ctx.request_id)

    def _build_event(self, ctx: RequestContext, meter: _Meter) -> UsageEvent:
        now = self.clock.monotonic()
        tap = meter.tap
        if tap is not None:
            tap.close()
        client_gone = (meter.client_gone or ctx.client_disconnected) and not meter.complete
        if client_gone:
            http_status = CLIENT_CLOSED_STATUS
        elif meter.started:
            http_status = meter.status
        else:
            http_status = 500  # nothing was sent: the request layer answers 500
        stream_error = tap is not None and tap.error
        failed = http_status >= 400 or meter.error is not None or stream_error

        reported, usage_note = self._usage(ctx, meter, tap, client_gone)
        usage = reported.tokens if reported else TokenUsage()
        price_model = ctx.model
        if tap is not None and tap.model and not self.pricer.is_known(ctx.provider, ctx.model):
            price_model = tap.model  # the requested name is unpriced: try the one that answered
        cost = self.pricer.cost(ctx.provider, price_model, usage)

        is_stream = ctx.stream or isinstance(tap, SSETap | AnthropicSSETap)
        ttft_ms = None
        if is_stream and meter.first_byte_at is not None:
            ttft_ms = round((meter.first_byte_at - ctx.started) * 1000.0, 3)
        principal = ctx.principal
        identity = ctx.identity
        model_ref = ctx.model_ref
        if ctx.model is not None:
            model_ref = f"{ctx.provider}/{ctx.model}" if ctx.provider else ctx.model
        # Every field, in declaration order, computed here: no validation needed (see `UsageEvent.trusted`).
        return UsageEvent.trusted(
            {
                "event_id": ctx.request_id,
                "timestamp": ctx.received_at,
                "workspace": principal.workspace if principal else "default",
                "project": principal.project if principal else "default",
                "api_key_id": principal.key_id if principal else "none",
                "identity": identity.external_id if identity else None,
                "identity_source": identity.source if identity else None,
                "identity_tags": list(identity.tags) if identity else [],
                "provider": ctx.provider,
                "model": model_ref,
                "product": ctx.product,
                "status": "ERROR" if failed else "OK",
                "http_status": http_status,
                "credential_type": "api_key",
                "stream": is_stream,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "total_tokens": reported.total_tokens if reported else 0,
                "cached_input_tokens": usage.cached_input_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
                "cache_write_1h_tokens": usage.cache_write_1h_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
                "audio_input_tokens": usage.audio_input_tokens,
                "audio_output_tokens": usage.audio_output_tokens,
                "input_cost_nanos": cost.input_nanos,
                "output_cost_nanos": cost.output_nanos,
                "cached_cost_nanos": cost.cached_nanos,
                "cache_write_cost_nanos": cost.cache_write_nanos,
                "reasoning_cost_nanos": cost.reasoning_nanos,
                "total_cost_nanos": cost.input_nanos + cost.output_nanos,
                "latency_ms": round((now - ctx.started) * 1000.0, 3),
                "ttft_ms": ttft_ms,
                "usage_source": "exact" if usage_note is None else "estimated",
                "usage_note": usage_note,
                "price_source": cost.source,
                "budget_ids": list(ctx.budget_ids),
                "metadata": dict(ctx.metadata),
            }
        )

    def _usage(
        self, ctx: RequestContext, meter: _Meter, tap: _Tap | None, client_gone: bool
    ) -> tuple[ReportedUsage | None, str | None]:
        """The usage to record and, when it is an estimate, why (None = exact)."""
        if tap is not None and tap.usage is not None:
            return tap.usage, None
        if meter.started and meter.complete and meter.status >= 400:
            return None, None  # an error answer: nothing was generated, nothing is billed
        if ctx.product not in TOKEN_PRODUCTS:
            return None, None  # not a token API: there is no usage to miss
        if client_gone:
            note = "client disconnected before usage arrived"
        elif ctx.upstream_error:
            note = ctx.upstream_error
        elif meter.error is not None:
            note = f"request failed: {type(meter.error).__name__}"
        elif tap is not None and tap.overflowed:
            note = "usage not found: response larger than the tap's cap"
        elif not meter.started:
            note = "no response"
        else:
            note = "upstream sent no usage"
        output_tokens = 0
        if ctx.product != "embeddings" and tap is not None:
            output_tokens = estimate_tokens_from_bytes(tap.output_bytes)
        if isinstance(tap, AnthropicSSETap) and tap.input_usage is not None:
            # The stream said its input (cache reads and writes included) before it was cut short: that
            # part is exact; the output is what arrived, or what the stream had counted, if more.
            known = tap.input_usage.tokens
            tokens = known._replace(output_tokens=max(output_tokens, known.output_tokens))
            return ReportedUsage(tokens, tokens.total_tokens), note
        input_tokens = estimate_input_tokens(ctx.body, len(ctx.raw_body))
        tokens = TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)
        return ReportedUsage(tokens, tokens.total_tokens), note
