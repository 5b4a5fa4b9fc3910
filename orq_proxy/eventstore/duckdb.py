"""The DuckDB event store: the `usage_events` table, its writes, and every SQL statement over it.

`DuckDBEventStore` implements what each slice declares it needs from an event store (`EventStore` in
`orq_proxy.eventstore`): reporting's `ReportSource` and `EventRetention`, identity metrics'
`IdentityHistory`, budgets' `BudgetLedger`, and the sink's `insert`. The slices never see SQL; this module
is the only one that writes DuckDB's dialect.

`duckdb://:memory:` keeps events in process memory; `duckdb:///path/events.duckdb` in a file.
One connection is owned here; every thread that touches it works on its own `cursor()`, which is how
DuckDB shares one database between threads.

Reporting SQL (`report`; the semantics are `orq_proxy.reporting.source`'s):
- Every value reaches DuckDB as a bound parameter; identifiers (columns, aggregates, grains) come only
  from the whitelists in this module, never from the request.
- Time zones: reporting gives the zone's UTC offsets over the window (a handful of DST segments at most),
  applied here as a `CASE` on `ts` with integer arithmetic on `epoch_us(ts)`; DuckDB's ICU
  `time_bucket(..., tz)` gave the same buckets but was ~40x slower on 10M rows. Minute and hour buckets
  whose zone offsets are whole multiples of the grain bucket in UTC directly (`date_trunc`).
- Quantiles: `quantile_cont` (exact, linear interpolation between the two nearest ranks).
- `group_by: ["tag"]` unnests `identity_tags` in a subquery that carries only the columns the query reads.

Failure policy: reads raise (`report` as `ReportSourceError`, so the reporting API answers 500); writes
raise to the sink bus, which retries and counts (sinks fail open).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import duckdb

from orq_proxy.identities.metrics import IdentityDay
from orq_proxy.reporting.query import Filter, ReportQuery
from orq_proxy.reporting.source import Measure, ReportData, ReportPlan, ReportScope, ReportSourceError
from orq_proxy.usage.events import BudgetConsumption, UsageEvent

if TYPE_CHECKING:
    from orq_proxy.eventstore import EventStore

__all__ = [
    "COLUMN_DEFAULTS",
    "EVENTS_TABLE",
    "EVENT_COLUMNS",
    "DuckDBEventStore",
    "event_row",
    "parse_events_url",
]

logger = logging.getLogger(__name__)

EVENTS_TABLE = "usage_events"

# Column name -> DuckDB type. `ts` is a naive TIMESTAMP holding UTC (the event's `timestamp`).
EVENT_COLUMNS: dict[str, str] = {
    "event_id": "VARCHAR",
    "ts": "TIMESTAMP",
    "workspace": "VARCHAR",
    "project": "VARCHAR",
    "api_key_id": "VARCHAR",
    "identity": "VARCHAR",
    "identity_source": "VARCHAR",
    "identity_tags": "VARCHAR[]",
    "provider": "VARCHAR",
    "model": "VARCHAR",
    "product": "VARCHAR",
    "status": "VARCHAR",
    "http_status": "INTEGER",
    "credential_type": "VARCHAR",
    "stream": "BOOLEAN",
    "input_tokens": "BIGINT",
    "output_tokens": "BIGINT",
    "total_tokens": "BIGINT",
    "cached_input_tokens": "BIGINT",
    "cache_write_tokens": "BIGINT",
    "cache_write_1h_tokens": "BIGINT",
    "reasoning_tokens": "BIGINT",
    "audio_input_tokens": "BIGINT",
    "audio_output_tokens": "BIGINT",
    "input_cost_nanos": "BIGINT",
    "output_cost_nanos": "BIGINT",
    "cached_cost_nanos": "BIGINT",
    "cache_write_cost_nanos": "BIGINT",
    "reasoning_cost_nanos": "BIGINT",
    "total_cost_nanos": "BIGINT",
    "latency_ms": "DOUBLE",
    "ttft_ms": "DOUBLE",
    "usage_source": "VARCHAR",
    "usage_note": "VARCHAR",
    "price_source": "VARCHAR",
    "budget_ids": "VARCHAR[]",
    "metadata": "VARCHAR",  # JSON object text
}


def parse_events_url(url: str) -> str:
    """`duckdb://:memory:` -> `:memory:`, `duckdb:///data/ev.duckdb` -> `/data/ev.duckdb`."""
    if not url.startswith("duckdb://"):
        raise ValueError(f"events store must be a duckdb:// URL, got {url!r}")
    rest = url[len("duckdb://") :]
    if rest in ("", ":memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise ValueError(f"duckdb file URL must be duckdb:///absolute/path, got {url!r}")
    return rest


# Columns most events leave at their defaults, in groups. A row carries a group's columns only when one of
# them differs from its default (the rest are filled by the column DEFAULTs below): DuckDB's appender takes
# ~0.2 us per value, and a typical event needs 22 values instead of 37.
_OPTIONAL_GROUPS: tuple[tuple[tuple[str, Any, str], ...], ...] = (
    (
        ("cached_input_tokens", 0, "0"),
        ("reasoning_tokens", 0, "0"),
        ("audio_input_tokens", 0, "0"),
        ("audio_output_tokens", 0, "0"),
        ("cached_cost_nanos", 0, "0"),
        ("reasoning_cost_nanos", 0, "0"),
    ),
    # Prompt-cache writes (Anthropic's): a group of their own, so an OpenAI event with cached or
    # reasoning tokens does not carry them.
    (
        ("cache_write_tokens", 0, "0"),
        ("cache_write_1h_tokens", 0, "0"),
        ("cache_write_cost_nanos", 0, "0"),
    ),
    (("identity_tags", [], "[]"),),
    (("credential_type", "api_key", "'api_key'"),),
    (("ttft_ms", None, "NULL"),),
    (("usage_note", None, "NULL"),),
    (("budget_ids", [], "[]"),),
    (("metadata", "{}", "'{}'"),),
)
COLUMN_DEFAULTS: dict[str, str] = {name: sql for group in _OPTIONAL_GROUPS for name, _, sql in group}
# Columns added after files were first written: `ALTER TABLE ... ADD COLUMN IF NOT EXISTS` when opened.
# They land at the end of such a file's table; the appender names its columns, so the physical order of a
# file does not matter.
_ADDED_COLUMNS = {
    name: EVENT_COLUMNS[name]
    for name in ("budget_ids", "cache_write_tokens", "cache_write_1h_tokens", "cache_write_cost_nanos")
}
_INDEX = {name: i for i, name in enumerate(EVENT_COLUMNS)}
# Per group: (its columns' values of a row, as a tuple; the defaults' tuple).
_GROUP_CHECKS = [
    (itemgetter(*[_INDEX[name] for name, _, _ in group], -1), (*[value for _, value, _ in group], None))
    for group in _OPTIONAL_GROUPS
]


# Built once: `json.dumps` with options builds an encoder per call (~1.5 us of the ~3.5 us a row with
# metadata took).
_METADATA_ENCODER = json.JSONEncoder(separators=(",", ":"))


def event_row(event: UsageEvent) -> list[Any]:
    """The event as a row in `EVENT_COLUMNS` order."""
    # `UsageEvent` declares its fields in `EVENT_COLUMNS` order (a test holds the two together), and a
    # pydantic model keeps them in that order: the row is its values, with `ts` and `metadata` converted.
    row = list(event.__dict__.values())
    ts = event.timestamp
    row[1] = (ts if ts.tzinfo is UTC else ts.astimezone(UTC)).replace(tzinfo=None)
    metadata = event.metadata
    row[-1] = _METADATA_ENCODER.encode(metadata) if metadata else "{}"
    return row


@lru_cache(maxsize=256)  # (every combination of the 8 groups)
def _shape(mask: int) -> tuple[list[str], Callable[[list[Any]], tuple[Any, ...]]]:
    """The columns a row of this shape carries (`mask` bit i: optional group i is present), and a getter of
    their values from a full row."""
    left_out = {name for i, group in enumerate(_OPTIONAL_GROUPS) if not mask >> i & 1 for name, _, _ in group}
    columns = [name for name in EVENT_COLUMNS if name not in left_out]
    getter = itemgetter(*[_INDEX[name] for name in columns])
    return columns, getter


def _rows_by_shape(events: Sequence[UsageEvent]) -> dict[int, list[tuple[Any, ...]]]:
    """Rows of `events`, grouped by which optional groups they carry, in arrival order within a group."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    checks = _GROUP_CHECKS
    for event in events:
        row = event_row(event)
        row.append(None)  # (the sentinel the group getters end with: a 1-column group still gives a tuple)
        mask = 0
        bit = 1
        for getter, default in checks:
            if getter(row) != default:
                mask |= bit
            bit <<= 1
        rows = out.get(mask)
        if rows is None:
            rows = out[mask] = []
        rows.append(_shape(mask)[1](row))
    return out


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


# ---- reporting SQL ------------------------------------------------------------------------------------

# Dimension -> SQL column expression (whitelist: the only identifiers a request can select).
_DIMENSION_SQL: dict[str, str] = {
    "project": "project",
    "identity": "identity",
    "provider": "provider",
    "model": "model",
    "product": "product",
    "api_key": "api_key_id",
    "status_code": "status",
    "http_status_code": "CAST(http_status AS VARCHAR)",
    "credential_type": "credential_type",
    "tag": "tag",
}
# Filter field -> SQL column; values are converted by `_filter_values`.
_FILTER_SQL: dict[str, str] = {
    **_DIMENSION_SQL,
    "http_status_code": "http_status",
    # "Billable" here: the request carried a cost (this gateway bills nothing itself).
    "billing_billable": "(total_cost_nanos > 0)",
}
# The numeric event columns a measure may aggregate (whitelist).
_MEASURE_COLUMNS = frozenset(
    name for name, kind in EVENT_COLUMNS.items() if kind in ("BIGINT", "INTEGER", "DOUBLE")
)
_GRAIN_SECONDS = {"minute": 60, "hour": 3600}
# Only the columns a query reads go through the unnest (copying all of them made it twice as slow).
_TAG_SOURCE = (
    "(SELECT {columns}, unnest(CASE WHEN coalesce(len(identity_tags), 0) = 0 THEN [NULL::VARCHAR] "
    "ELSE identity_tags END) AS tag FROM {table} WHERE {base})"
)
_COLUMN_PATTERNS = {name: re.compile(rf"\b{name}\b") for name in EVENT_COLUMNS}
_ERRORS_SQL = "count(*) FILTER (WHERE status = 'ERROR')"
_US = 1_000_000
_DAY_US = 86_400 * _US
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1)


def _columns_in(sql: str) -> list[str]:
    """The event columns an SQL fragment (built only from this module's whitelists) refers to."""
    return [name for name, pattern in _COLUMN_PATTERNS.items() if pattern.search(sql)]


@lru_cache(maxsize=64)
def _measure_sql(measure: Measure) -> str:
    """The aggregate expression of one measure."""
    if measure.aggregate == "count":
        sql = "count(*)"
    elif measure.aggregate == "errors":
        sql = _ERRORS_SQL
    elif measure.aggregate == "error_rate":
        sql = f"CASE WHEN count(*) = 0 THEN NULL ELSE CAST({_ERRORS_SQL} AS DOUBLE) / count(*) END"
    else:
        column = measure.field
        if column not in _MEASURE_COLUMNS:
            raise ValueError(f"measure {measure.key}: {column!r} is not a numeric event column")
        if measure.aggregate == "sum":
            sql = f"coalesce(sum({column}), 0)"
        elif measure.aggregate == "avg":
            sql = f"avg({column})"
        elif measure.aggregate == "quantile":
            fraction = float(measure.fraction if measure.fraction is not None else "nan")
            if not 0 <= fraction <= 1:
                raise ValueError(f"measure {measure.key}: quantile fraction must be 0..1, got {fraction}")
            sql = f"quantile_cont({column}, {fraction!r})"
        else:
            raise ValueError(f"measure {measure.key}: unknown aggregate {measure.aggregate!r}")
    return f"{sql} FILTER (WHERE stream)" if measure.streams_only else sql


def _micros(delta: timedelta) -> int:
    return delta // timedelta(microseconds=1)


def _offset_sql(segments: Sequence[tuple[datetime, timedelta]]) -> tuple[str, list[Any]]:
    """SQL for the local UTC offset of `ts` in microseconds (a BIGINT), with its parameters."""
    if len(segments) == 1:
        return "CAST(? AS BIGINT)", [_micros(segments[0][1])]
    parts: list[str] = []
    params: list[Any] = []
    for (boundary, _), (_, before) in zip(segments[1:], segments, strict=False):
        parts.append("WHEN ts < ? THEN CAST(? AS BIGINT)")
        params += [_naive_utc(boundary), _micros(before)]
    return f"CASE {' '.join(parts)} ELSE CAST(? AS BIGINT) END", [*params, _micros(segments[-1][1])]


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


def _from_epoch_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _from_day_number(value: int) -> date:
    return _EPOCH_DAY + timedelta(days=value)


def _bucket_sql(plan: ReportPlan) -> tuple[str, list[Any], Callable[[Any], Any] | None]:
    """The bucket expression, its parameters, and how a fetched bucket becomes `ReportData`'s (an aware
    UTC start, or the local date for day buckets; None: it already is one).

    Zone offsets are applied with integer arithmetic on `epoch_us(ts)`, which measured ~25% faster than
    adding INTERVALs and casting.
    """
    grain = plan.query.effective_grain
    segments = plan.segments
    offsets = {offset for _, offset in segments}
    if grain in _GRAIN_SECONDS:
        step = _GRAIN_SECONDS[grain]
        if all(offset.total_seconds() % step == 0 for offset in offsets):
            # The local clock's :00 coincides with UTC's: bucket in UTC (no per-row offset work).
            return f"date_trunc('{grain}', ts)", [], _aware
        offset_sql, params = _offset_sql(segments)
        # Back from the instant to the local :00 before it: t - ((t + offset) mod step), in UTC micros.
        step_us = step * _US
        return f"(epoch_us(ts) - (epoch_us(ts) + {offset_sql}) % {step_us})", params, _from_epoch_us
    if offsets == {timedelta(0)}:
        return "CAST(ts AS DATE)", [], None
    offset_sql, params = _offset_sql(segments)
    # The local calendar day as days since 1970-01-01.
    return f"((epoch_us(ts) + {offset_sql}) // {_DAY_US})", params, _from_day_number


def _filter_values(item: Filter) -> list[Any]:
    if item.field == "http_status_code":
        return [int(v) for v in item.values]
    if item.field == "billing_billable":
        return [v == "true" for v in item.values]
    return list(item.values)


def _filter_sql(item: Filter, *, tag_unnested: bool) -> tuple[str, list[Any]]:
    values = _filter_values(item)
    marks = ", ".join("?" for _ in values)
    if item.field == "tag" and not tag_unnested:
        contains = (
            "list_contains(identity_tags, ?)"
            if len(values) == 1
            else f"list_has_any(identity_tags, [{marks}])"
        )
        if item.op in ("eq", "in"):
            return contains, values
        return f"NOT coalesce({contains}, false)", values
    column = _FILTER_SQL[item.field]
    if item.op == "eq":
        return f"{column} = ?", values
    if item.op == "neq":
        return f"{column} IS DISTINCT FROM ?", values  # unattributed (NULL) rows are "not equal" too
    if item.op == "in":
        return f"{column} IN ({marks})", values
    return f"({column} IS NULL OR {column} NOT IN ({marks}))", values


def _base_where(query: ReportQuery, scope: ReportScope) -> tuple[str, list[Any]]:
    clauses = ["workspace = ?", "ts >= ?", "ts < ?"]
    params: list[Any] = [scope.workspace, _naive_utc(query.start), _naive_utc(query.end)]
    if scope.project is not None:
        clauses.append("project = ?")
        params.append(scope.project)
    return " AND ".join(clauses), params


def _report_rows(
    cursor: duckdb.DuckDBPyConnection, plan: ReportPlan
) -> tuple[list[tuple[Any, ...]], Callable[[Any], Any] | None]:
    """The report's rows (one statement, at most `limit + 1` rows) and how their buckets convert."""
    query, scope = plan.query, plan.scope
    aggs = [_measure_sql(measure) for measure in plan.measures]
    scalar = query.mode == "scalar"
    select: list[str] = []
    params: list[Any] = []
    convert_bucket: Callable[[Any], Any] | None = None
    if not scalar:
        bucket_sql, bucket_params, convert_bucket = _bucket_sql(plan)
        select.append(f"{bucket_sql} AS bucket")
        params += bucket_params
    dims = [f"d{i}" for i in range(len(query.group_by))]
    select += [f"{_DIMENSION_SQL[name]} AS {alias}" for name, alias in zip(query.group_by, dims, strict=True)]
    metric_cols = [f"m{i}" for i in range(len(aggs))]
    select += [f"{sql} AS {alias}" for sql, alias in zip(aggs, metric_cols, strict=True)]

    base_sql, base_params = _base_where(query, scope)
    tag_unnested = "tag" in query.group_by
    filter_sql: list[str] = []
    filter_params: list[Any] = []
    for item in query.filters:
        clause, values = _filter_sql(item, tag_unnested=tag_unnested)
        filter_sql.append(clause)
        filter_params += values
    where: list[str] = []
    where_params: list[Any] = []
    from_params: list[Any] = []
    if tag_unnested:
        # Scope and window go inside, so only the window's events are unnested.
        needed = _columns_in(" ".join(["ts", *select, *filter_sql]))
        columns = ", ".join(name for name in needed if name != "identity_tags")
        source = _TAG_SOURCE.format(columns=columns, table=EVENTS_TABLE, base=base_sql)
        from_params = base_params
    else:
        source = EVENTS_TABLE
        where.append(base_sql)
        where_params += base_params
    where += filter_sql
    where_params += filter_params

    having = [
        f"{sql} IS NOT NULL"
        for measure, sql in zip(plan.measures, aggs, strict=True)
        if measure.kind == "float"
    ]
    dim_order = [f"{alias} ASC NULLS FIRST" for alias in dims]
    if scalar:
        direction = "ASC" if query.sort == "asc" else "DESC"
        by_key = {measure.key: alias for measure, alias in zip(plan.measures, metric_cols, strict=True)}
        order = [f"{by_key[key]} {direction}" for key in plan.order_by] + dim_order
    else:
        order = ["bucket ASC", *dim_order]

    sql = f"SELECT {', '.join(select)} FROM {source}"
    if where:
        sql += f" WHERE {' AND '.join(where)}"
    sql += " GROUP BY ALL"
    if having:
        sql += f" HAVING {' AND '.join(having)}"
    sql += f" ORDER BY {', '.join(order)} LIMIT ?"
    fetched: list[tuple[Any, ...]] = cursor.execute(
        sql, [*params, *from_params, *where_params, query.limit + 1]
    ).fetchall()
    return fetched, convert_bucket


def _report_totals(cursor: duckdb.DuckDBPyConnection, plan: ReportPlan) -> tuple[Any, ...] | None:
    """One value per measure over the whole window, each event counted once (no tag unnesting)."""
    base_sql, params = _base_where(plan.query, plan.scope)
    where = [base_sql]
    for item in plan.query.filters:
        clause, values = _filter_sql(item, tag_unnested=False)
        where.append(clause)
        params += values
    aggs = ", ".join(_measure_sql(measure) for measure in plan.measures)
    sql = f"SELECT {aggs} FROM {EVENTS_TABLE} WHERE {' AND '.join(where)}"
    record: tuple[Any, ...] | None = cursor.execute(sql, params).fetchone()
    return record


class DuckDBEventStore:
    """Owns one DuckDB database holding the `usage_events` table; an `EventStore`.

    Every method but `aclose` blocks; the app and the slices call them from worker threads.

    Args:
        path: `:memory:` or a file path (see `parse_events_url`).
        max_events: in memory only, the most events kept: past it (by a tenth, so trims are rare) the oldest
            are deleted down to it and counted in `dropped_events`. None keeps everything (a file store
            is bounded by retention instead).
    """

    def __init__(self, path: str = ":memory:", *, max_events: int | None = None) -> None:
        self.path = path
        self._conn = duckdb.connect(path)
        self._lock = threading.Lock()
        self.max_events = max_events if path == ":memory:" else None
        self.dropped_events = 0
        self._rows = 0  # kept only when bounded (an in-memory store starts empty)
        cols = ", ".join(
            f"{name} {kind}" + (f" DEFAULT {COLUMN_DEFAULTS[name]}" if name in COLUMN_DEFAULTS else "")
            for name, kind in EVENT_COLUMNS.items()
        )
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} ({cols})")
        for name, kind in _ADDED_COLUMNS.items():  # a file written before these columns existed
            self._conn.execute(
                f"ALTER TABLE {EVENTS_TABLE} ADD COLUMN IF NOT EXISTS {name} {kind} DEFAULT {COLUMN_DEFAULTS[name]}"
            )
        for name, default in COLUMN_DEFAULTS.items():  # a file written before the defaults existed
            self._conn.execute(f"ALTER TABLE {EVENTS_TABLE} ALTER COLUMN {name} SET DEFAULT {default}")

    @classmethod
    def from_url(cls, url: str, *, max_events: int | None = None) -> DuckDBEventStore:
        """The store of `[storage] events` (`duckdb://:memory:` or `duckdb:///abs/path.duckdb`)."""
        return cls(parse_events_url(url), max_events=max_events)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for the calling thread (DuckDB cursors are per-thread handles on one database).
        Made under the insert lock: the shared connection object is only ever touched by one thread."""
        with self._lock:
            return self._conn.cursor()

    def insert(self, events: Sequence[UsageEvent]) -> None:
        """Append events, all or none (blocking; call it from a worker thread)."""
        if not events:
            return
        groups = _rows_by_shape(events)
        with self._lock:
            cur = self._conn.cursor()
            try:
                # DuckDB's appender: ~180x the rows/s of executemany (benchmarks/RESULTS.md, metering); one
                # per row shape, in one transaction, so a retried batch is never half in already.
                cur.begin()
                try:
                    for mask, rows in groups.items():
                        appender = cur.appender(EVENTS_TABLE, columns=_shape(mask)[0])
                        try:
                            appender.append_rows(rows)
                            appender.flush()
                        except BaseException:
                            appender.clear()
                            raise
                    cur.commit()
                except BaseException:
                    cur.rollback()
                    raise
                if self.max_events is not None:
                    self._rows += len(events)
                    if self._rows > self.max_events + self.max_events // 10:
                        self._trim(cur, self.max_events)
            finally:
                cur.close()

    def _trim(self, cur: duckdb.DuckDBPyConnection, keep: int) -> None:
        """Delete the oldest events down to `keep` (under the lock); count and say what went."""
        excess = self._rows - keep
        row = cur.execute(
            f"DELETE FROM {EVENTS_TABLE} WHERE ts < (SELECT ts FROM {EVENTS_TABLE} ORDER BY ts LIMIT 1 OFFSET ?)",
            [excess],
        ).fetchone()
        deleted = int(row[0]) if row else 0
        self._rows -= deleted
        first = self.dropped_events == 0
        self.dropped_events += deleted
        (logger.warning if first else logger.info)(
            "in-memory event store: dropped the %d oldest events to keep %d (%d dropped in all); "
            'set [storage] events = "duckdb:///<path>" to keep them',
            deleted,
            keep,
            self.dropped_events,
        )

    def insert_new(self, events: list[UsageEvent]) -> int:
        """Insert those of `events` whose `event_id` the store does not hold yet; how many (blocking).

        For the event spool's replay at startup, which may hold events already committed: one lookup of
        their ids, then `insert`. Not atomic with other writers: call it before the sink bus starts.
        """
        if not events:
            return 0
        cur = self.cursor()
        try:
            rows = cur.execute(
                f"SELECT event_id FROM {EVENTS_TABLE} WHERE event_id IN (SELECT unnest(?::VARCHAR[]))",
                [[event.event_id for event in events]],
            ).fetchall()
        finally:
            cur.close()
        stored = {row[0] for row in rows}
        new: dict[str, UsageEvent] = {}
        for event in events:
            if event.event_id not in stored:
                new.setdefault(event.event_id, event)
        self.insert(list(new.values()))
        return len(new)

    def delete_before(self, cutoff: datetime) -> int:
        """Delete the events older than `cutoff` (aware, or naive UTC); how many were deleted (blocking).

        The retention rule (`[reporting] retention_days`): reporting refuses to look further back, and the
        app runs this hourly so a long-running store does not grow without bound.
        """
        if cutoff.tzinfo is not None:
            cutoff = cutoff.astimezone(UTC).replace(tzinfo=None)
        with self._lock:
            cur = self._conn.cursor()
            try:
                row = cur.execute(f"DELETE FROM {EVENTS_TABLE} WHERE ts < ?", [cutoff]).fetchone()
            finally:
                cur.close()
        deleted = int(row[0]) if row else 0
        if self.max_events is not None:
            self._rows -= deleted
        return deleted

    def budget_consumption(
        self, since: Mapping[str, datetime], requests_since: datetime
    ) -> dict[str, BudgetConsumption]:
        """What the events charged to each budget of `since` (budget id -> the instant its count starts),
        for rebuilding budget counters at startup (blocking: one query over the oldest window).

        An event is charged when its request settled (`ts + latency_ms`: a request that straddles a window
        boundary counts in the window it finished in, as the counters did); the request counts for the rate
        window at its arrival (`ts`) when that is at or after `requests_since`. Budgets with nothing charged
        are left out.
        """
        if not since:
            return {}
        ids = list(since)
        starts = [_naive_utc(since[i]) for i in ids]
        window_start = _naive_utc(requests_since)
        cur = self.cursor()
        try:
            rows = cur.execute(
                f"WITH b AS (SELECT unnest(?::VARCHAR[]) AS budget_id, unnest(?::TIMESTAMP[]) AS since), "
                f"e AS (SELECT unnest(budget_ids) AS budget_id, ts, "
                f"ts + to_microseconds(CAST(round(latency_ms * 1000) AS BIGINT)) AS settled, "
                f"total_cost_nanos, total_tokens FROM {EVENTS_TABLE} "
                f"WHERE len(budget_ids) > 0 AND ts >= CAST(? AS TIMESTAMP) - INTERVAL 1 DAY) "
                f"SELECT budget_id, sum(total_cost_nanos) FILTER (WHERE settled >= since), "
                f"sum(total_tokens) FILTER (WHERE settled >= since), "
                f"list(epoch_us(ts) ORDER BY ts) FILTER (WHERE ts >= CAST(? AS TIMESTAMP) AND settled >= since) "
                f"FROM e JOIN b USING (budget_id) GROUP BY budget_id",
                # (a request may run for hours, so events that arrived a day before the earliest window
                # still count when they settled inside it)
                [ids, starts, min(starts), window_start],
            ).fetchall()
        finally:
            cur.close()
        return {
            budget_id: BudgetConsumption(
                int(cost or 0), int(tokens or 0), tuple(us / 1_000_000 for us in times or ())
            )
            for budget_id, cost, tokens, times in rows
        }

    def report(self, plan: ReportPlan) -> ReportData:
        """Reporting's rows and totals (`ReportSource`): one statement for the rows, one for the totals,
        on this thread's own cursor. A DuckDB error is raised as `ReportSourceError`."""
        try:
            cursor = self.cursor()
            try:
                rows, bucket = _report_rows(cursor, plan)
                totals = _report_totals(cursor, plan) if plan.query.include_totals else None
            finally:
                cursor.close()
        except duckdb.Error as exc:
            raise ReportSourceError(f"the DuckDB event store could not answer: {exc}") from exc
        return ReportData(rows, totals, bucket)

    def identity_days(self, since: datetime) -> list[IdentityDay]:
        """Per (workspace, identity, UTC day) since `since` (aware, or naive UTC): requests, errors, tokens
        and nano-USD, in day order (`IdentityHistory`: one GROUP BY over the window)."""
        cur = self.cursor()
        try:
            rows = cur.execute(
                f"SELECT workspace, identity, date_trunc('day', ts) AS day, count(*), "
                f"count(*) FILTER (WHERE status = 'ERROR'), sum(total_tokens), sum(total_cost_nanos) "
                f"FROM {EVENTS_TABLE} WHERE identity IS NOT NULL AND ts >= ? "
                f"GROUP BY ALL ORDER BY day",
                [_naive_utc(since)],
            ).fetchall()
        finally:
            cur.close()
        return [
            IdentityDay(
                workspace, identity, day, int(requests), int(errors), int(tokens or 0), int(cost or 0)
            )
            for workspace, identity, day, requests, errors, tokens, cost in rows
        ]

    def count(self) -> int:
        """How many events the store holds."""
        cur = self._conn.cursor()
        try:
            row = cur.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()
        finally:
            cur.close()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Close the database (blocking: waits for a write or a retention delete still running)."""
        with self._lock:  # after a write or a retention delete still running in a worker thread
            self._conn.close()

    async def aclose(self) -> None:
        """`close` in a worker thread: it waits on the store's lock, and closing a file checkpoints it."""
        await asyncio.to_thread(self.close)


if TYPE_CHECKING:

    def _implements_event_store(store: DuckDBEventStore) -> EventStore:
        return store  # mypy checks here that the store implements every slice's protocol
