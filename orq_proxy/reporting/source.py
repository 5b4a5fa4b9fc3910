"""What reporting needs from the event store: `ReportSource` (answer a report) and `EventRetention`
(forget old events), and the dialect-free types they speak.

Reporting owns these protocols, as budgets own `BudgetLedger`; the event store implements them
(`orq_proxy.eventstore`), so a store in another SQL dialect drops in without touching reporting. The
store writes the SQL; what it must compute is stated here:

- **Scope**: only events of `scope.workspace`, and of `scope.project` unless that is None.
- **Window**: `query.start <= timestamp < query.end`.
- **Buckets** (timeseries mode): minute and hour buckets start where the local clock of `query.zone`
  shows :00, day buckets at local midnight. The zone's UTC offsets over the window are given
  (`ReportPlan.segments`, worked out here with `zoneinfo`), so the store needs no time-zone database.
  Buckets without events are not emitted.
- **Measures**: each `Measure` aggregates over the events of its group. Quantiles are exact, interpolated
  linearly between the two nearest ranks (numpy's default `linear`, Excel's `PERCENTILE.INC`), over every
  request in the group (errors included). A group for which a `float` measure has no value (a quantile
  or average over nothing, e.g. TTFT where nothing streamed) is left out rather than reported as 0.
- **Tags**: `group_by` containing `tag` counts an event once per tag (an event with two tags counts in both
  tag rows); events without tags form one group whose `tag` is None. A `tag` filter then applies to that
  group's tag; without a tag grouping it keeps events having (for `neq`/`not_in`: lacking) the tags.
  Totals always count each event once.
- **Other filters**: `neq` and `not_in` also keep events whose field is unset (an unattributed event is
  "not equal" to any identity); `http_status_code` values are status numbers, `billing_billable` is
  whether the request carried a cost.
- **Order**: timeseries rows by bucket, then by each dimension (None first); scalar rows by
  `ReportPlan.order_by` (`query.sort`), then by each dimension (None first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from orq_proxy.auth import Principal
from orq_proxy.reporting.query import ReportQuery

__all__ = [
    "WORKSPACE_WIDE_PROJECTS",
    "EventRetention",
    "Measure",
    "ReportData",
    "ReportPlan",
    "ReportScope",
    "ReportSource",
    "ReportSourceError",
]

# A key whose project is one of these sees every project of its workspace; any other project value
# makes the key project-scoped. ("default" is what a key gets when its config names no project.)
WORKSPACE_WIDE_PROJECTS = frozenset({"default", "*"})


@dataclass(frozen=True, slots=True)
class ReportScope:
    """Which events a caller may see: its workspace, and one project or (None) all of them."""

    workspace: str
    project: str | None = None

    @classmethod
    def of(cls, principal: Principal) -> ReportScope:
        """A key with project `default` or `*` is workspace-wide; any other project scopes it to that one."""
        project = None if principal.project in WORKSPACE_WIDE_PROJECTS else principal.project
        return cls(workspace=principal.workspace, project=project)


@dataclass(frozen=True, slots=True)
class Measure:
    """One metric entry of a report: its key in `metrics`, the aggregate over a group's events, and how
    reporting turns the value into the response.

    Attributes:
        key: the entry's name in the row's `metrics`.
        aggregate: `count` (events), `errors` (events with status ERROR), `error_rate` (errors / events),
            `sum` of `field` (0 over no values), `avg` of `field`, `quantile` of `field` at `fraction`.
        field: the `UsageEvent` field aggregated (`sum`, `avg`, `quantile`).
        fraction: the quantile's rank, 0..1.
        streams_only: only streamed requests count (time to first token).
        kind: `int` (a count or sum), `usd` (nano-USD summed, reported in USD), `float` (may have no value).
    """

    key: str
    aggregate: Literal["count", "errors", "error_rate", "sum", "avg", "quantile"]
    field: str | None = None
    fraction: float | None = None
    streams_only: bool = False
    kind: Literal["int", "usd", "float"] = "int"


@dataclass(frozen=True, slots=True)
class ReportPlan:
    """A validated query with what reporting worked out for it, ready for a `ReportSource`.

    Attributes:
        query: the validated request (window, grain, group_by, filters, mode, sort, limit, totals).
        scope: whose events.
        measures: the metric's entries, in the order of the values in each row.
        order_by: the measure keys scalar rows are sorted by (`query.sort`), most significant first.
        segments: the zone's UTC offsets over the window, `[(utc_from, offset), ...]`, each in force until
            the next (see `offset_segments`); empty in scalar mode.
    """

    query: ReportQuery
    scope: ReportScope
    measures: tuple[Measure, ...]
    order_by: tuple[str, ...]
    segments: tuple[tuple[datetime, timedelta], ...] = ()


class ReportData(NamedTuple):
    """What a `ReportSource` found, as raw values (reporting shapes and rounds them).

    `rows` holds at most `query.limit + 1` tuples (one more than asked says there are more), in the
    report's order: `(bucket, *dimensions, *measures)` in timeseries mode, `(*dimensions, *measures)` in
    scalar mode. A bucket is its start as an aware UTC datetime for minute and hour grains, the local
    calendar `date` for the day grain; or, when `bucket` is given, whatever the store fetched, which
    `bucket` turns into that (so the fetched rows are handed over as they are, not copied). Dimensions
    follow `query.group_by` (None when unset), measures `ReportPlan.measures` (None when there is no
    value). `totals` is one value per measure over the whole window, None unless `query.include_totals`.
    """

    rows: list[tuple[Any, ...]]
    totals: Sequence[Any] | None = None
    bucket: Callable[[Any], datetime | date] | None = None


class ReportSourceError(Exception):
    """The store could not answer (the reporting API answers 500 with the request id)."""


@runtime_checkable
class ReportSource(Protocol):
    """Answers reporting queries over the usage events (the event store implements it).

    Example:
        class NoEvents:
            def report(self, plan: ReportPlan) -> ReportData:
                return ReportData([], [None] * len(plan.measures) if plan.query.include_totals else None)
    """

    def report(self, plan: ReportPlan) -> ReportData:
        """The rows (and totals) of `plan`, as this module's docstring defines them (blocking: reporting
        calls it from a worker thread). Raises `ReportSourceError` when the store cannot answer."""
        ...


@runtime_checkable
class EventRetention(Protocol):
    """Forgets old events: the retention rule (`[reporting] retention_days`). Reporting refuses a `from`
    older than the window; the app calls `delete_before` at startup and hourly so the store stops growing
    once the window is full."""

    def delete_before(self, cutoff: datetime) -> int:
        """Delete the events older than `cutoff` (aware, or naive UTC); how many (blocking)."""
        ...
