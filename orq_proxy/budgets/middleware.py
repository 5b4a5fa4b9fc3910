"""`BudgetMiddleware`: the hard budget gate. Reserve before forwarding, settle after, never leak.

Per request: find every active, unexpired budget that applies (scope index, then compiled CEL), estimate
the request's maximum cost and tokens (input from the body, calibrated per model by what upstreams
reported before, `calibration.py`; output from its cap or a default, times `n` / `best_of`), and reserve
them against all those budgets at once. A refusal is answered here with 429 in OpenAI's shape (400 for a
model a cost budget cannot price); otherwise the reserved output cap is written into the body as the
upstream's own limit, the request goes on, and a settle hook collects metering's final `UsageEvent`. When the inner app returns or
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
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any, Literal

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.budgets.alerts import AlertDispatcher
from orq_proxy.budgets.calibration import Calibration, CalibrationKey
from orq_proxy.budgets.counters import AlertCrossing, Counters, Rejection, Reservation
from orq_proxy.budgets.matching import RequestFacts, model_keys
from orq_proxy.budgets.models import Budget
from orq_proxy.budgets.store import BudgetStore
from orq_proxy.clock import Clock
from orq_proxy.context import RequestContext, get_context
from orq_proxy.errors import ServiceUnavailable, openai_error
from orq_proxy.logs import RepeatedFailure
from orq_proxy.timefmt import rfc3339
from orq_proxy.usage.estimate import (
    MAX_RESERVED_OUTPUT_TOKENS,
    estimate_input_tokens,
    max_output_tokens,
    output_multiplier,
)
from orq_proxy.usage.events import UsageEvent
from orq_proxy.usage.money import nanos_to_usd
from orq_proxy.usage.pricing import Pricer, TokenUsage

__all__ = [
    "OUTPUT_CAPPED_KEY",
    "UNPRICED_ALLOWED_KEY",
    "BudgetMiddleware",
    "SettleNowait",
    "Unpriced",
    "rejection_response",
    "unmetered_reason",
    "unpriced_response",
]

logger = logging.getLogger(__name__)

# `RedisCounters.settle_nowait`: the settlement sent at once, its reply a future (None: await `settle`).
SettleNowait = Callable[[Reservation, int, int, datetime], "asyncio.Future[list[AlertCrossing]] | None"]

_NO_OUTPUT_PRODUCTS = frozenset({"embeddings", "moderations", "messages.count_tokens"})
# The Responses field asking for a background response (finished, and billed, after the answer: unmetered).
_BACKGROUND_KEY = "background"
_CUSTOM_SCOPE = "BUDGET_SCOPE_KIND_CUSTOM"
# APIs whose answers carry token usage, which metering prices by the model that answered when the requested
# name has no price: a request to one of them without a priced model cannot be priced by the gate.
_TOKEN_PRODUCTS = frozenset(
    {"chat.completions", "responses", "responses.compact", "completions", "embeddings", "messages"}
)
# Work a provider bills that the proxy cannot meter (POST to these paths): nothing it sees says what the
# provider charges. Under a cost or token budget each one is "unpriced" (refused, or with
# `unpriced = "allow"` let through at zero). Value: why, for the refusal. (Image generation is not here: its
# JSON names a model, and gpt-image-1's answer carries token usage; without a priced model it is unpriced.)
_UNMETERED_PATHS: dict[str, str] = {
    "/batches": "a batch runs, and is billed, after its answer",
    "/messages/batches": "a batch runs, and is billed, after its answer",
    "/fine_tuning/jobs": "a fine-tuning job trains, and is billed, after its answer",
    "/realtime/sessions": "the client then talks to the provider directly",
    "/realtime/client_secrets": "the client then talks to the provider directly",
    "/realtime/transcription_sessions": "the client then talks to the provider directly",
    "/audio/speech": "its answer is audio, with no usage to price",
    "/audio/transcriptions": "its model is a form field the proxy does not read",
    "/audio/translations": "its model is a form field the proxy does not read",
    "/images/edits": "its model is a form field the proxy does not read",
    "/images/variations": "its model is a form field the proxy does not read",
    "/videos": "a video is rendered, and billed, after its answer",
}
_VIDEO_REMIX = re.compile(r"^/videos/[^/]+/remix$")
_UNMETERED_BACKGROUND = "a background response finishes, and is billed, after its answer"
# APIs a request without a model is unpriced on besides the token APIs: the provider bills a default model.
_DEFAULT_MODEL_PRODUCTS = frozenset({"images"})
# The output cap each API reads, the first one being what the gate adds when the request sets none. Chat:
# `max_completion_tokens` (OpenAI's current name; its reasoning models refuse `max_tokens`), and a
# `max_tokens` the client sent is lowered too, since many upstreams still read it. Legacy completions:
# `max_tokens`. Responses: `max_output_tokens` (it includes reasoning tokens, as the billed output does).
# Anthropic's Messages: `max_tokens` (required there, so the reservation is the client's own cap).
_CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "chat.completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
}
# Legacy completions without `max_tokens` stop at 16 tokens (OpenAI's documented default, and vLLM's):
# reserving and forwarding 16 keeps their answer as it was, where the general default would lengthen it.
_DEFAULT_CAP = {"completions": 16}
_MIN_RESPONSES_CAP = 16

Unpriced = Literal["refuse", "allow"]
# `UsageEvent.metadata` keys the gate sets: the output cap it forwarded (tokens per choice), and "1" when an
# unpriced model was let through a cost budget (`unpriced="allow"`).
OUTPUT_CAPPED_KEY = "output_capped"
UNPRICED_ALLOWED_KEY = "unpriced_allowed"


class _UnpricedModel(Exception):
    """What `RepeatedFailure` logs when an unpriced model passes a cost budget (`unpriced="allow"`)."""


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
            answers itself (400, 429, 503), so it can still be recorded; app.py passes metering's
            `record_unforwarded`.
        unpriced: what a cost (`amount`) budget does with a request whose model has no price: `"refuse"`
            (400 `unpriced_model`, naming the `[prices."provider/model"]` table that would price it) or
            `"allow"` (reserve its tokens at zero cost, as before; logged, and the event's metadata says
            `unpriced_allowed`, which `/metrics` counts).
        calibration: learns how the upstreams count input tokens against the estimate, from every settled
            request with reported usage, and sizes input reservations with it (`budgets/calibration.py`);
            None: a `Calibration()` of this gate's own. `calibrate=False` reserves the plain estimate.

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
        unpriced: Unpriced = "refuse",
        calibration: Calibration | None = None,
        calibrate: bool = True,
    ) -> None:
        if default_max_output_tokens < 1:
            raise ValueError("default_max_output_tokens must be >= 1")
        if unpriced not in ("refuse", "allow"):
            raise ValueError(f"unpriced must be 'refuse' or 'allow', got {unpriced!r}")
        self.app = app
        self.store = store
        self.counters = counters
        self.pricer = pricer
        self.clock = clock
        self.default_max_output_tokens = default_max_output_tokens
        self.fail_open = fail_open
        self.alerts = alerts
        self.on_refused = on_refused
        self.unpriced: Unpriced = unpriced
        self.calibration: Calibration | None = (calibration or Calibration()) if calibrate else None
        # Settlements still running after their request was cancelled; kept so they are not collected.
        self._background: set[asyncio.Task[None]] = set()
        # Settlements sent with the counters' `settle_nowait` (Redis), waiting for their reply.
        self._pending: set[asyncio.Future[list[AlertCrossing]]] = set()
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
        # Never "recovers" (an unpriced model stays unpriced): one line, then a summary per 10 s at most.
        self._unpriced_allowed = RepeatedFailure(
            logger,
            'unpriced model let through a cost budget ([budgets] unpriced = "allow"; reserved at zero cost)',
            expected=(_UnpricedModel,),
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
        cap = estimated_input = 0
        unpriced: Budget | None = None
        try:
            budgets = await self.store.matching(facts, now)
            if not budgets:
                reserved: Reservation | Rejection | None = None
            else:
                unpriced = self._unpriced_cost_budget(ctx, budgets)
                if unpriced is not None and self.unpriced == "refuse":
                    reserved = None  # refused below, outside the backend's error handling
                else:
                    cost_nanos, tokens, cap, estimated_input = self._estimate(ctx)
                    reserved = await self.counters.reserve(
                        principal.workspace, budgets, cost_nanos, tokens, now
                    )
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

        if unpriced is not None and self.unpriced == "refuse":
            await unpriced_response(ctx, unpriced)(scope, receive, send)
            self._refused(ctx, 400)
            return
        if reserved is None:
            calibration = self.calibration
            if calibration is not None and ctx.product in _TOKEN_PRODUCTS:
                # Learn from requests no budget applies to as well: a budget added later is sized right. A
                # partial of what it needs, not a closure over `ctx`: the hook lives in `ctx.settle_hooks`, and
                # a cycle would keep the request's body alive until the cyclic GC ran.
                ctx.settle_hooks.append(
                    partial(
                        _learn_unbudgeted, calibration, _calibration_key(ctx), ctx.body, len(ctx.raw_body)
                    )
                )
            await self.app(scope, receive, send)
            return
        if isinstance(reserved, Rejection):
            await rejection_response(reserved, now)(scope, receive, send)
            self._refused(ctx, 429)
            return

        reservation = reserved
        ctx.budget_ids = tuple(part.budget.budget_id for part in reservation.parts)
        if unpriced is not None:  # `unpriced="allow"`: admitted at zero cost; said once per 10 s, and counted
            what = f"{ctx.provider}/{ctx.model}"
            if unmetered_reason(ctx) is not None:
                what = f"POST {ctx.surface}{ctx.path} (not metered)"
            self._unpriced_allowed.failed(_UnpricedModel(f"{what}, budget {unpriced.budget_id}"))
            ctx.metadata[UNPRICED_ALLOWED_KEY] = "1"
        if cap:
            _apply_output_cap(ctx, cap)
        settled: list[UsageEvent] = []
        ctx.settle_hooks.append(settled.append)  # sync, cannot raise; the real work is in `finally`
        try:
            await self.app(scope, receive, send)
        finally:
            if settled and self.calibration is not None:
                self._learn(ctx, estimated_input, settled[0])
            await self._finish(ctx, reservation, settled)

    def _refused(self, ctx: RequestContext, status: int) -> None:
        """Report a request this layer answered itself (so it still becomes a usage event)."""
        if self.on_refused is not None:
            try:
                self.on_refused(ctx, status)
            except Exception:
                logger.exception("request %s: on_refused hook failed", ctx.request_id)

    def _unpriced_cost_budget(self, ctx: RequestContext, budgets: Sequence[Budget]) -> Budget | None:
        """The budget that cannot price this request (None: priced, or no such budget applies).

        Unpriced: work the proxy cannot meter (`unmetered_reason`; any cost or token budget), a model the
        pricer does not know, or no model at all on an API metering prices (an upstream may answer it with
        its default model, which metering then prices). Priced at zero, it would pass any cost budget with
        room left, and metering may charge the answer's model afterwards.
        """
        if unmetered_reason(ctx) is not None:
            return next((b for b in budgets if b.amount_nanos is not None or b.token_limit is not None), None)
        model = ctx.model
        if (
            model is None
            and ctx.product not in _TOKEN_PRODUCTS
            and ctx.product not in _DEFAULT_MODEL_PRODUCTS
        ):
            return None  # nothing named and nothing metering prices (model lists, file uploads)
        if model is not None and self.pricer.is_known(ctx.provider, model):
            return None
        return next((b for b in budgets if b.amount_nanos is not None), None)

    def estimate(self, ctx: RequestContext) -> tuple[int, int]:
        """The most this request can cost (nano-USD) and use (tokens): input (calibrated) + its output cap."""
        cost_nanos, tokens, _, _ = self._estimate(ctx)
        return cost_nanos, tokens

    def _estimate(self, ctx: RequestContext) -> tuple[int, int, int, int]:
        """`estimate`, the output cap per choice it assumed (0 for an API without output) and the plain
        input estimate (before calibration)."""
        estimated = estimate_input_tokens(ctx.body, len(ctx.raw_body))
        calibration = self.calibration
        input_tokens = estimated
        if calibration is not None:
            input_tokens = calibration.reserve(_calibration_key(ctx), estimated)
        cap = output_tokens = 0
        # Output is reserved for what generates: not for a model list, a retrieval or an upload naming no
        # model (a token budget would hold the default cap for each of them while it is in flight).
        if ctx.product not in _NO_OUTPUT_PRODUCTS and (
            ctx.model is not None or ctx.product in _TOKEN_PRODUCTS
        ):
            body = ctx.body
            cap = max_output_tokens(body, _DEFAULT_CAP.get(ctx.product, self.default_max_output_tokens))
            if ctx.product == "responses" and cap < _MIN_RESPONSES_CAP:
                cap = _MIN_RESPONSES_CAP  # the least `max_output_tokens` OpenAI accepts (it is forwarded)
            # Each of `n` choices (and `best_of` candidates) can use the whole cap, and each is billed.
            output_tokens = min(cap * output_multiplier(body), MAX_RESERVED_OUTPUT_TOKENS)
        usage = TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)
        cost = self.pricer.cost(ctx.provider, ctx.model, usage)
        return cost.total_nanos, usage.total_tokens, cap, estimated

    def _learn(self, ctx: RequestContext, estimated: int, event: UsageEvent) -> None:
        """Feed the calibration one settled request a budget applied to (its plain input `estimated`)."""
        calibration = self.calibration
        if calibration is not None and _teaches(event):
            try:
                calibration.observe(_calibration_key(ctx), estimated, event.input_tokens)
            except Exception:  # sizing reservations must never break a settlement
                logger.exception("request %s: calibration update failed", ctx.request_id)

    async def _finish(self, ctx: RequestContext, reservation: Reservation, settled: list[UsageEvent]) -> None:
        """Settle (or release) so that it completes even if this request is being cancelled."""
        event = settled[0] if settled else None
        nowait: SettleNowait | None = getattr(self.counters, "settle_nowait", None)
        if nowait is not None and event is not None:
            # Remote counters that can send the settlement at once: nothing to await or shield (the command
            # is on its way, whatever happens to this request); the reply is handled by a callback.
            pending = nowait(reservation, event.total_cost_nanos, event.total_tokens, self.clock.now())
            if pending is not None:
                self._pending.add(pending)
                pending.add_done_callback(self._settled)
                return
        settlement = self._settle(ctx.request_id, reservation, event)
        if self.counters.in_process:
            # The counters never suspend, so no cancellation can land inside: await directly (saves a task).
            await settlement
            return
        task = asyncio.ensure_future(settlement)  # shielded: a cancelled request still settles
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)

    def _settled(self, pending: asyncio.Future[list[AlertCrossing]]) -> None:
        """A settlement sent by `settle_nowait` got its reply: its alerts, or its failure logged."""
        self._pending.discard(pending)
        exc = pending.exception()
        if exc is not None:
            self._settle_failures.failed(exc)
            return
        if self._settle_failures.failing:
            self._settle_failures.succeeded()
        crossings = pending.result()
        if crossings and self.alerts is not None:
            for crossing in crossings:
                self.alerts.notify(crossing)

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
        while self._background or self._pending:
            await asyncio.gather(*list(self._background), *list(self._pending), return_exceptions=True)


def _calibration_key(ctx: RequestContext) -> CalibrationKey:
    return (ctx.provider or "", ctx.model or "", ctx.product)


def _teaches(event: UsageEvent) -> bool:
    """Only input the upstream reported, for an answer that succeeded, says how it counts."""
    return event.input_tokens > 0 and event.usage_source == "exact" and event.status == "OK"


def _learn_unbudgeted(
    calibration: Calibration,
    key: CalibrationKey,
    body: dict[str, Any] | None,
    raw_len: int,
    event: UsageEvent,
) -> None:
    """The settle hook of a request no budget applied to (sync, never raises: it runs in metering's
    `finally`): sampled, and estimated only when sampled, as estimating costs more than the gate does."""
    if not _teaches(event):
        return
    try:
        if calibration.wants_sample(key):
            calibration.observe(key, estimate_input_tokens(body, raw_len), event.input_tokens)
    except Exception:  # sizing reservations must never break a settlement
        logger.exception("request %s: calibration update failed", event.event_id)


def _apply_output_cap(ctx: RequestContext, cap: int) -> None:
    """Make the reserved output the upstream's real limit: every cap field of the API the client sent is
    lowered to `cap` when larger or not a positive integer (a lenient upstream may read `"9999"`, or `-1` as
    "no limit"), and the API's own field is added when the client sent none. Records `output_capped`."""
    fields = _CAP_FIELDS.get(ctx.product)
    body = ctx.body
    if fields is None or body is None:
        return
    changed = present = False
    for name in fields:
        value = body.get(name)
        if value is None:
            continue  # absent, or null (which means absent)
        present = True
        if type(value) is not int or not 0 < value <= cap:
            body[name] = cap
            changed = True
    if not present:
        body[fields[0]] = cap
        changed = True
    if changed:
        ctx.body_changed = True
        ctx.metadata[OUTPUT_CAPPED_KEY] = str(cap)


def unmetered_reason(ctx: RequestContext) -> str | None:
    """Why the provider bills this request for work the proxy cannot meter (None: it can meter it): a batch,
    a fine-tuning job, a realtime session, speech, an upload-bodied API, a video, a background response."""
    if ctx.method != "POST":
        return None
    path = ctx.path.rstrip("/")
    reason = _UNMETERED_PATHS.get(path)
    if reason is not None:
        return reason
    if ctx.product == "responses" and ctx.body is not None and ctx.body.get(_BACKGROUND_KEY) is True:
        return _UNMETERED_BACKGROUND
    if path[:8] == "/videos/" and _VIDEO_REMIX.match(path):
        return _UNMETERED_PATHS["/videos"]
    return None


def unpriced_response(ctx: RequestContext, budget: Budget) -> JSONResponse:
    """The 400 for a request a cost budget applies to and the proxy cannot price (`unpriced="refuse"`):
    OpenAI's error shape, `code: "unpriced_model"`, naming the model and the config table that prices it;
    `code: "unmetered_api"` for work the proxy cannot meter, naming the path (or `background`)."""
    scope_kind, target, label = _scope_label(budget)
    provider = ctx.provider or "<provider>"
    unmetered = unmetered_reason(ctx)
    if unmetered is not None:
        dimension = "cost" if budget.amount_nanos is not None else "tokens"
        background = unmetered == _UNMETERED_BACKGROUND
        what = "a Responses request with background: true" if background else f"POST {ctx.surface}{ctx.path}"
        message = (
            f"{what} is billed by the provider but the proxy cannot meter it ({unmetered}), and the "
            f"{'cost' if dimension == 'cost' else 'token'} budget of {label} applies. Send it with a key no "
            'cost or token budget applies to, or set [budgets] unpriced = "allow" to let such requests '
            "through uncharged"
        )
        detail = {
            "scope_kind": scope_kind,
            "scope_target_id": target,
            "budget_id": budget.budget_id,
            "dimension": dimension,
            "code": "unmetered_api",
            "message": message,
        }
        param = _BACKGROUND_KEY if background else None
        return openai_error(400, message, code="unmetered_api", param=param, extra={"rejection": detail})
    if ctx.model is None:
        message = (
            f"the request names no model and the cost budget of {label} applies: the proxy cannot price "
            f'it. Name a model that has a price (genai-prices, or a [prices."{provider}/<model>"] table '
            "in the proxy's config)"
        )
    else:
        ref = f"{provider}/{ctx.model}"
        message = (
            f"model {ref!r} has no known price and the cost budget of {label} applies: the proxy cannot "
            f'reserve its cost. Price it with a [prices."{ref}"] table (input_per_mtok, output_per_mtok) '
            "in the proxy's config"
        )
    detail = {
        "scope_kind": scope_kind,
        "scope_target_id": target,
        "budget_id": budget.budget_id,
        "dimension": "cost",
        "code": "unpriced_model",
        "message": message,
    }
    return openai_error(400, message, code="unpriced_model", param="model", extra={"rejection": detail})


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
    """The 429 for a refused request (spec §3.6): OpenAI's error shape plus a `rejection` object, whose
    `requested` (what this request would reserve) and `remaining` (the limit less what is used or reserved)
    tell a request too big for what is left from a budget that has nothing left.

    Headers: `Retry-After` (whole seconds until the budget frees up; absent when it never does),
    `X-RateLimit-Limit` / `X-RateLimit-Remaining` in the refused dimension's unit (USD for cost) and
    `X-RateLimit-Reset` (Unix time, seconds, of the reset).
    """
    budget = rejection.budget
    dimension = rejection.dimension
    scope_kind, target, label = _scope_label(budget)
    code = "rate_limited" if dimension == "requests" else "budget_exceeded"
    remaining = max(0, rejection.limit - rejection.used)
    limit, used, requested, left = (
        _amount(v, dimension) for v in (rejection.limit, rejection.used, rejection.requested, remaining)
    )
    unit = {"cost": " USD", "tokens": " tokens", "requests": " requests"}[dimension]
    if dimension == "requests":
        message = f"Rate limit exceeded for {label}: {limit} requests per minute"
    else:
        period = budget.effective_period.value.removeprefix("BUDGET_PERIOD_").lower().replace("_", "-")
        # Requested against remaining: "too big a request" (lower max_tokens) or "budget gone" (wait).
        message = (
            f"Budget exceeded for {label}: {dimension} limit {limit}{unit} ({period}), "
            f"{used}{unit} used or reserved, {left}{unit} left; this request reserves up to {requested}{unit}"
        )
        message += " (lower max_tokens to fit)" if rejection.used < rejection.limit else " (none left)"
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
        "remaining": left,
    }
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
