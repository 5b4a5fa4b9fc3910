"""`BudgetMiddleware`: the hard budget gate. Reserve before forwarding, settle after, never leak.

Per request: find every active, unexpired budget that applies (scope index, then compiled CEL), estimate
the request's maximum cost and tokens (input from the body, output from its cap or a default), and reserve
them against all those budgets at once. A refusal is answered here with 429 in OpenAI's shape; otherwise the
request goes on, and a settle hook collects metering's final `UsageEvent`. When the inner app returns or
raises (success, upstream error, timeout, client disconnect, cancellation), this layer's `finally` settles
the reservation with the event's actual cost and tokens, or releases it if metering never produced an
event. Settlement runs shielded from cancellation, exactly once. Alerts crossed by the settlement are
handed to the `AlertDispatcher` (non-blocking).

It must sit inside Identity (it matches on `ctx.identity`) and outside Metering (which calls the hook).

Failure policy: budgets fail closed. If the store or the counters cannot answer, the client gets 503,
unless `fail_open=True`, which forwards the request unmetered by budgets (and logs it).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.budgets.alerts import AlertDispatcher
from orq_proxy.budgets.counters import Counters, Rejection, Reservation
from orq_proxy.budgets.matching import RequestFacts, model_keys
from orq_proxy.budgets.models import Budget
from orq_proxy.budgets.store import BudgetStore
from orq_proxy.clock import Clock
from orq_proxy.context import RequestContext, get_context
from orq_proxy.errors import ServiceUnavailable, openai_error
from orq_proxy.logs import RepeatedFailure
from orq_proxy.timefmt import rfc3339
from orq_proxy.usage.estimate import estimate_input_tokens, max_output_tokens
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.money import nanos_to_usd
from orq_proxy.usage.pricing import Pricer, TokenUsage

__all__ = ["BudgetMiddleware", "rejection_response"]

logger = logging.getLogger(__name__)

_NO_OUTPUT_PRODUCTS = frozenset({"embeddings", "moderations"})
_CUSTOM_SCOPE = "BUDGET_SCOPE_KIND_CUSTOM"


class BudgetMiddleware:
    """Enforces budgets on proxied requests (see the module docstring).

    Args:
        app: the next ASGI app (metering, then the upstream).
        store: where budgets live (`InMemoryBudgetStore`).
        counters: spend/token counters and rate windows (`InMemoryCounters`).
        pricer: prices the estimate (the same `Pricer` metering uses).
        clock: time source.
        default_max_output_tokens: the output cap assumed when a request sets none.
        fail_open: forward requests when the budget backend fails (default: 503).
        alerts: where crossed alert thresholds go (None: alerts are not delivered).
        on_refused: called (sync, must not raise) with the context and status of every request this layer
            answers itself (429, 503), so it can still be recorded; app.py passes metering's
            `record_unforwarded`.

    Example:
        app = BudgetMiddleware(metering, store=InMemoryBudgetStore(), counters=InMemoryCounters(),
                               pricer=Pricer(), clock=SystemClock())
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: BudgetStore,
        counters: Counters,
        pricer: Pricer,
        clock: Clock,
        default_max_output_tokens: int = 4096,
        fail_open: bool = False,
        alerts: AlertDispatcher | None = None,
        on_refused: Callable[[RequestContext, int], None] | None = None,
    ) -> None:
        if default_max_output_tokens < 1:
            raise ValueError("default_max_output_tokens must be >= 1")
        self.app = app
        self.store = store
        self.counters = counters
        self.pricer = pricer
        self.clock = clock
        self.default_max_output_tokens = default_max_output_tokens
        self.fail_open = fail_open
        self.alerts = alerts
        self.on_refused = on_refused
        # Settlements still running after their request was cancelled; kept so they are not collected.
        self._background: set[asyncio.Task[None]] = set()
        # A backend outage fails every request alike: log it once with its cause, then a summary per 10 s.
        consequence = "forwarding (fail open)" if fail_open else "refusing with 503 (fail closed)"
        self._backend_failures = RepeatedFailure(
            logger, f"budget backend failed; {consequence}", expected=(ServiceUnavailable,)
        )
        self._settle_failures = RepeatedFailure(
            logger,
            "budget settlement failed (a remote backend gives the reservation back when it expires)",
            expected=(ServiceUnavailable,),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        principal = ctx.principal
        if principal is None:  # not authenticated: nothing to attribute a budget to (auth answers first)
            await self.app(scope, receive, send)
            return
        now = self.clock.now()
        identity = ctx.identity
        facts = RequestFacts(
            workspace=principal.workspace,
            project=principal.project,
            api_key=principal.key_id,
            identity=identity.external_id if identity is not None else "",
            provider=ctx.provider or "",
            model=ctx.model or "",
            model_id=f"{ctx.provider}/{ctx.model}" if ctx.provider and ctx.model else (ctx.model or ""),
            model_keys=model_keys(ctx.provider, ctx.model, ctx.model_ref),
            metadata=ctx.metadata,
            raw_headers=scope.get("headers", ()),
        )
        try:
            budgets = await self.store.matching(facts, now)
            if not budgets:
                reserved: Reservation | Rejection | None = None
            else:
                cost_nanos, tokens = self.estimate(ctx)
                reserved = await self.counters.reserve(principal.workspace, budgets, cost_nanos, tokens, now)
        except Exception as exc:
            self._backend_failures.failed(exc)  # once with its cause, then a summary every 10 s
            if not self.fail_open:
                response = openai_error(
                    503, "budget service unavailable", code="budget_unavailable", headers={"Retry-After": "1"}
                )
                await response(scope, receive, send)
                self._refused(ctx, 503)
                return
            reserved = None
        else:
            if self._backend_failures.failing:
                self._backend_failures.succeeded()

        if reserved is None:
            await self.app(scope, receive, send)
            return
        if isinstance(reserved, Rejection):
            await rejection_response(reserved, now)(scope, receive, send)
            self._refused(ctx, 429)
            return

        reservation = reserved
        ctx.budget_ids = tuple(part.budget.budget_id for part in reservation.parts)
        settled: list[UsageEvent] = []
        ctx.settle_hooks.append(settled.append)  # sync, cannot raise; the real work is in `finally`
        try:
            await self.app(scope, receive, send)
        finally:
            await self._finish(ctx, reservation, settled)

    def _refused(self, ctx: RequestContext, status: int) -> None:
        """Report a request this layer answered itself (so it still becomes a usage event)."""
        if self.on_refused is not None:
            try:
                self.on_refused(ctx, status)
            except Exception:
                logger.exception("request %s: on_refused hook failed", ctx.request_id)

    def estimate(self, ctx: RequestContext) -> tuple[int, int]:
        """The most this request can cost (nano-USD) and use (tokens): input + its output cap."""
        input_tokens = estimate_input_tokens(ctx.body, len(ctx.raw_body))
        output_tokens = 0
        if ctx.product not in _NO_OUTPUT_PRODUCTS:
            output_tokens = max_output_tokens(ctx.body, self.default_max_output_tokens)
        usage = TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)
        cost = self.pricer.cost(ctx.provider, ctx.model, usage)
        return cost.total_nanos, usage.total_tokens

    async def _finish(self, ctx: RequestContext, reservation: Reservation, settled: list[UsageEvent]) -> None:
        """Settle (or release) so that it completes even if this request is being cancelled."""
        settlement = self._settle(ctx.request_id, reservation, settled[0] if settled else None)
        if self.counters.in_process:
            # The counters never suspend, so no cancellation can land inside: await directly (saves a task).
            await settlement
            return
        task = asyncio.ensure_future(settlement)  # shielded: a cancelled request still settles
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)

    async def _settle(self, request_id: str, reservation: Reservation, event: UsageEvent | None) -> None:
        now = self.clock.now()
        try:
            if event is None:
                await self.counters.release(reservation, now)
                return
            crossings = await self.counters.settle(
                reservation, event.total_cost_nanos, event.total_tokens, now
            )
        except Exception as exc:
            # Nothing to tell the client any more; a remote backend expires the reservation on its own.
            self._settle_failures.failed(exc)
            return
        if self._settle_failures.failing:
            self._settle_failures.succeeded()
        if crossings and self.alerts is not None:
            for crossing in crossings:
                self.alerts.notify(crossing)

    async def drain(self) -> None:
        """Wait for settlements still running in the background (shutdown, tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


def _scope_label(budget: Budget) -> tuple[str, str, str]:
    """(scope kind, target id, human label) of a budget, for the rejection."""
    if budget.scope_kind is None:
        return _CUSTOM_SCOPE, budget.budget_id, f"budget {budget.budget_id} (match: {budget.cel or 'all'})"
    kind = budget.scope_kind.value.removeprefix("BUDGET_SCOPE_KIND_").lower().replace("_", " ")
    target = budget.scope_target
    return budget.scope_kind.value, target, f"{kind} {target}".strip()


def _amount(value: int, dimension: str) -> Any:
    return nanos_to_usd(value) if dimension == "cost" else value


def _header_amount(value: int, dimension: str) -> str:
    if dimension == "cost":
        return f"{nanos_to_usd(value):.10f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def rejection_response(rejection: Rejection, now: datetime) -> JSONResponse:
    """The 429 for a refused request (spec §3.6): OpenAI's error shape plus a `rejection` object.

    Headers: `Retry-After` (whole seconds until the budget frees up; absent when it never does),
    `X-RateLimit-Limit` / `X-RateLimit-Remaining` in the refused dimension's unit (USD for cost) and
    `X-RateLimit-Reset` (Unix time, seconds, of the reset).
    """
    budget = rejection.budget
    dimension = rejection.dimension
    scope_kind, target, label = _scope_label(budget)
    code = "rate_limited" if dimension == "requests" else "budget_exceeded"
    limit, used, requested = (
        _amount(v, dimension) for v in (rejection.limit, rejection.used, rejection.requested)
    )
    unit = {"cost": " USD", "tokens": " tokens", "requests": " requests"}[dimension]
    if dimension == "requests":
        message = f"Rate limit exceeded for {label}: {limit} requests per minute"
    else:
        period = budget.effective_period.value.removeprefix("BUDGET_PERIOD_").lower().replace("_", "-")
        message = (
            f"Budget exceeded for {label}: {dimension} limit {limit}{unit} ({period}), "
            f"{used}{unit} used or reserved, this request may need up to {requested}{unit}"
        )
        if rejection.used < rejection.limit:
            message += " (lower max_tokens to fit)"
    detail: dict[str, Any] = {
        "scope_kind": scope_kind,
        "scope_target_id": target,
        "budget_id": budget.budget_id,
        "dimension": dimension,
        "code": code,
        "message": message,
        "limit": limit,
        "used": used,
        "requested": requested,
    }
    remaining = max(0, rejection.limit - rejection.used)
    headers = {
        "X-RateLimit-Limit": _header_amount(rejection.limit, dimension),
        "X-RateLimit-Remaining": _header_amount(remaining, dimension),
    }
    if rejection.resets_at is not None:
        detail["resets_at"] = rfc3339(rejection.resets_at)
        retry_after = rejection.retry_after(now) or 0.0
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        headers["X-RateLimit-Reset"] = str(math.ceil(rejection.resets_at.timestamp()))
    return openai_error(429, message, code=code, extra={"rejection": detail}, headers=headers)
