"""Budget alerts: POST a JSON notification to each notifier's webhook when a threshold is crossed.

`AlertDispatcher.notify()` is synchronous and never blocks: it puts the crossing on a bounded queue (and
counts it as dropped when the queue is full). A background task, started on first use or by `start()`,
delivers each notification to every notifier of the alert, retrying with exponential backoff; failures are
logged and counted, never raised. Alerts fail open: they never slow down or fail a request.

httpx is used here (not the upstream client's lean connection pool, `proxy/_http1.py`) on purpose: alert
traffic is tiny, at most one POST per alert per period, so httpx (redirects, proxies, TLS, a real request
model) is plenty and keeps this module simple.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import httpx
from ulid import ULID

from orq_proxy.budgets.counters import AlertCrossing
from orq_proxy.budgets.models import budget_rest
from orq_proxy.config import NotifierConfig
from orq_proxy.timefmt import rfc3339
from orq_proxy.usage.money import nanos_to_usd

__all__ = ["ALERT_TYPE", "AlertDispatcher", "alert_payload"]

logger = logging.getLogger(__name__)

ALERT_TYPE = "budget.threshold_reached"


def alert_payload(crossing: AlertCrossing) -> dict[str, Any]:
    """The JSON body POSTed to a webhook."""
    budget = crossing.budget
    payload: dict[str, Any] = {
        "type": ALERT_TYPE,
        "id": str(ULID()),
        "workspace_id": budget.workspace,
        "budget_id": budget.budget_id,
        "alert_id": crossing.alert.id,
        "threshold_percent": crossing.alert.threshold_percent,
        "dimension": crossing.alert.dimension,
        "used": nanos_to_usd(crossing.used_nanos),
        "limit": nanos_to_usd(crossing.limit_nanos),
        "used_percent": round(100 * crossing.used_nanos / crossing.limit_nanos, 4),
        "currency": "usd",
        "period": budget.effective_period.value,
        "period_start": rfc3339(crossing.period_start),
        "fired_at": rfc3339(crossing.at),
        "budget": budget_rest(budget),
    }
    if crossing.period_end is not None:
        payload["period_end"] = rfc3339(crossing.period_end)
    return payload


class AlertDispatcher:
    """Delivers alert notifications in the background.

    Args:
        notifiers: `[notifiers.ID]` tables of the config (ID -> url).
        client: an httpx client to post with (default: one of its own, closed by `aclose`).
        max_queue: notifications waiting beyond this are dropped (and counted).
        attempts: deliveries tried per notifier before giving up.
        backoff: seconds before the first retry; doubles each time (capped at `max_backoff`).
        concurrency: deliveries in flight at once.

    Example:
        alerts = AlertDispatcher(config.notifiers)
        ...  # lifespan: await alerts.start(); yield; await alerts.aclose()
    """

    def __init__(
        self,
        notifiers: Mapping[str, NotifierConfig],
        *,
        client: httpx.AsyncClient | None = None,
        max_queue: int = 1000,
        attempts: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 10.0,
        concurrency: int = 8,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.notifiers = dict(notifiers)
        self._client = client
        self._own_client = client is None
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._concurrency = concurrency
        self._queue: asyncio.Queue[AlertCrossing] | None = None
        self._max_queue = max_queue
        self._worker: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._semaphore: asyncio.Semaphore | None = None
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def notify(self, crossing: AlertCrossing) -> None:
        """Queue a crossing for delivery; never blocks, never raises."""
        try:
            if self._worker is None or self._worker.done():
                self._start_worker()
            assert self._queue is not None
            self._queue.put_nowait(crossing)
        except asyncio.QueueFull:
            self.dropped += 1
            logger.warning(
                "alert queue full: dropped alert %s of %s", crossing.alert.id, crossing.budget.budget_id
            )
        except Exception:  # notify runs in a request's settlement: it must never raise
            self.dropped += 1
            logger.exception("could not queue alert %s", crossing.alert.id)

    async def start(self) -> None:
        """Start the delivery task (optional: `notify` starts it on first use)."""
        if self._worker is None or self._worker.done():
            self._start_worker()

    def _start_worker(self) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue(self._max_queue)
            self._semaphore = asyncio.Semaphore(self._concurrency)
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="budget-alerts")

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            crossing = await self._queue.get()
            try:
                for notifier_id in crossing.alert.notifier_ids:
                    task = asyncio.get_running_loop().create_task(self._deliver(notifier_id, crossing))
                    self._deliveries.add(task)
                    task.add_done_callback(self._deliveries.discard)
            finally:
                self._queue.task_done()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    async def _deliver(self, notifier_id: str, crossing: AlertCrossing) -> None:
        notifier = self.notifiers.get(notifier_id)
        if notifier is None:
            self.failed += 1
            logger.warning("alert %s: notifier %r is not configured", crossing.alert.id, notifier_id)
            return
        payload = alert_payload(crossing)
        payload["notifier_id"] = notifier_id
        assert self._semaphore is not None
        delay = self._backoff
        reason = ""
        async with self._semaphore:
            for attempt in range(1, self._attempts + 1):
                try:
                    response = await self._http().post(notifier.url, json=payload)
                    if response.status_code < 300:
                        self.sent += 1
                        return
                    reason = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if attempt == self._attempts:
                    break
                logger.info(
                    "alert %s to %s failed (%s), retry in %.1fs",
                    crossing.alert.id,
                    notifier_id,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
        self.failed += 1
        logger.warning(
            "alert %s to %s failed after %d attempts (%s)",
            crossing.alert.id,
            notifier_id,
            self._attempts,
            reason,
        )

    async def drain(self, grace: float = 10.0) -> None:
        """Wait (up to `grace` s) for queued and in-flight deliveries to finish."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                if self._queue is not None:
                    await self._queue.join()
                while self._deliveries:
                    await asyncio.gather(*list(self._deliveries), return_exceptions=True)

    async def aclose(self, grace: float = 5.0) -> None:
        """Deliver what is pending (up to `grace` s), then stop and close the client."""
        await self.drain(grace)
        tasks = [t for t in (self._worker, *self._deliveries) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = None
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None
