"""Quiet, useful logs for failures that repeat: the first one is logged with its cause, the rest are
counted and summed up at most once per interval ("N requests refused in the last 10 s").

A backend outage (Redis down) fails every request the same way; one traceback per request buried the
cause under megabytes of the same text. `RepeatedFailure` logs one line when the failure starts (with the
traceback only when the exception is not an expected kind), then one summary line per interval while it
lasts, and one line when it is over (the next success).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RepeatedFailure"]


class RepeatedFailure:
    """Rate-limited logging of one kind of failure (one instance per kind, shared by all requests).

    Args:
        logger: where to log.
        what: the failing thing and the consequence, e.g. `"budget backend failed; request refused"`.
        interval: seconds between summaries while the failure lasts.
        expected: exception types logged without a traceback (a backend that cannot answer).
        clock: monotonic seconds (tests pass their own).

    Example:
        failures = RepeatedFailure(logger, "budget backend failed; refusing (fail closed)")
        failures.failed(exc)   # in the except block
        failures.succeeded()   # on the next success
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval: float = 10.0,
        expected: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what
        self.interval = interval
        self.expected = expected
        self.clock = clock
        self.failing = False
        self._since_summary = 0
        self._total = 0
        self._summary_at = 0.0

    def failed(self, exc: BaseException) -> None:
        """Count one failure; log it when it starts an outage, or a summary when one is due."""
        now = self.clock()
        self._total += 1
        if not self.failing:
            self.failing = True
            self._since_summary = 0
            self._summary_at = now + self.interval
            cause = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, self.expected):
                self.logger.warning("%s: %s", self.what, cause)
            else:
                self.logger.error("%s: %s", self.what, cause, exc_info=exc)
            return
        self._since_summary += 1
        if now >= self._summary_at:
            self.logger.warning(
                "%s: %d more in the last %.0f s (last cause: %s: %s)",
                self.what,
                self._since_summary,
                self.interval,
                type(exc).__name__,
                exc,
            )
            self._since_summary = 0
            self._summary_at = now + self.interval

    def succeeded(self) -> None:
        """The failure is over (cheap when it was not failing): say how many it affected."""
        if self.failing:
            self.failing = False
            self.logger.warning("%s: recovered after %d failures", self.what, self._total)
            self._total = 0
