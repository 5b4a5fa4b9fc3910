"""The PostgreSQL event store: the `usage_events` table, its writes, and every SQL statement over it.

`PostgresEventStore` implements `EventStore` (`orq_proxy.eventstore`) with the semantics of the DuckDB
store (`eventstore/duckdb.py`): the same rows and totals for every report, the same identity days and
budget consumption, down to the nano-dollar. This module is the only one that writes PostgreSQL's
dialect for the events; psycopg 3 (sync API, `psycopg_pool.ConnectionPool`) is imported here only, so
`orq_proxy` imports without the `postgres` extra.

Layout (`STEPS`, applied by `orq_proxy.postgres.migrate` under its advisory lock; a step is never edited
once released, a change is a new step):
- One heap table, no partitions, so `event_id` is its primary key (uniqueness is the table's own).
  Fixed-width NOT NULL columns come first (the ones reports aggregate), text and arrays after: a row
  is deformed up to the last column a query reads, and the fixed prefix is read at cached offsets.
  Text columns are `COLLATE "C"`, so `ORDER BY` and `GROUP BY` order strings byte-wise, as DuckDB does.
- A BRIN index on `ts` (events arrive in time order, so block ranges map to time ranges: a few pages of
  index for any window; retention and identity days use it), a partial btree on `ts` of the events
  charged to a budget (the budget rebuild reads only those), and a covering btree on `(workspace, ts)`
  with the columns the common reports read, so those are index-only scans. Statistics on the UTC
  bucket expressions tell the planner how many groups a report has (it hashes instead of sorting).
- `usage_identity_days`: per (workspace, identity, UTC day) requests, errors, tokens and nano-USD, kept
  by an `AFTER INSERT ... FOR EACH STATEMENT` trigger over the inserted rows (a COPY fires it too), in
  the insert's own transaction: `identity_totals` (`IdentityTotals`, `include_metrics` shared by
  replicas) reads a few rows of it. Retention drops the days wholly before its cutoff.
- Reads that scan a window (reports, identity days, budget consumption) run in one read-only snapshot
  with their own statement timeout, `work_mem`, `random_page_cost` and no JIT (`_long_read`).

Writes: `insert` is one `COPY` (one statement, so all rows or none, in one round trip); `insert_new`
copies into a temporary staging table and moves the rows with `INSERT ... ON CONFLICT (event_id) DO
NOTHING`, in one transaction, so it is idempotent even against concurrent writers. An `insert` batch
holding a stored event id (the retry of a batch that committed after the sink bus gave up waiting) takes
the `insert_new` path, so a retry stores nothing twice (DuckDB would store such rows twice). Text holding
NUL, which PostgreSQL cannot store, is written with U+FFFD in its place rather than failing the batch.
Retention (`delete_before`) deletes in batches of `delete_batch` rows, each its own short transaction.

Reporting SQL mirrors DuckDB's: bound parameters only, identifiers from whitelists; `percentile_cont`
(exact, linear interpolation, as `quantile_cont`); zone offsets as a `CASE` on `ts` over
`ReportPlan.segments`, applied with `date_bin` (minute and hour buckets at the local :00) or by adding the
offset before taking the date (day buckets); `NULLS FIRST` / `NULLS LAST` spelled out where DuckDB's
defaults differ from PostgreSQL's.

Failure policy: reads raise (`report` as `ReportSourceError`, so the reporting API answers 500); writes
raise to the sink bus, which retries and counts (sinks fail open). A server that does not answer fails
fast: connections time out after `orq_proxy.postgres.CONNECT_TIMEOUT`, and waiting for a pooled one after
`POOL_TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from orq_proxy.identities.metrics import IdentityDay, Totals
from orq_proxy.postgres import connect_kwargs, migrate, redacted
from orq_proxy.reporting.query import Filter, ReportQuery
from orq_proxy.reporting.source import Measure, ReportData, ReportPlan, ReportScope, ReportSourceError
from orq_proxy.usage.events import BudgetConsumption, UsageEvent

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

    from orq_proxy.eventstore import EventStore
    from orq_proxy.identities.metrics import IdentityTotals

__all__ = [
    "DELETE_BATCH",
    "EVENTS_TABLE",
    "EVENT_COLUMNS",
    "IDENTITY_DAYS_TABLE",
    "POOL_MAX_SIZE",
    "POOL_TIMEOUT",
    "READ_STATEMENT_TIMEOUT_MS",
    "REPORT_WORK_MEM",
    "STEPS",
    "PostgresEventStore",
]

logger = logging.getLogger(__name__)

EVENTS_TABLE: Final = "usage_events"
IDENTITY_DAYS_TABLE: Final = "usage_identity_days"
POOL_TIMEOUT: Final = 3.0  # seconds to wait for a pooled connection before raising (never hang)
POOL_MAX_SIZE: Final = 4  # the sink bus, a report or two, retention
DELETE_BATCH: Final = 10_000  # rows per retention transaction: each holds its row locks briefly
# Reports and the startup reads (identity days, budget consumption) scan up to a 90-day window: longer
# than the 5 s every other statement gets (`orq_proxy.postgres.STATEMENT_TIMEOUT_MS`), still bounded.
READ_STATEMENT_TIMEOUT_MS: Final = 60_000
# Per sort or hash of a report (quantiles keep a sort per group): spilling to disk is slow.
REPORT_WORK_MEM: Final = "128MB"

# Column name -> PostgreSQL type, in `UsageEvent` order (the order of `_row`'s values); the table's own
# order is `_PHYSICAL_ORDER`, then `_ADDED_COLUMNS` (every write names its columns, so the two orders
# never meet). `ts` is a `timestamp` holding UTC (naive, as in DuckDB).
EVENT_COLUMNS: dict[str, str] = {
    "event_id": 'text COLLATE "C" NOT NULL',
    "ts": "timestamp NOT NULL",
    "workspace": 'text COLLATE "C" NOT NULL',
    "project": 'text COLLATE "C" NOT NULL',
    "api_key_id": 'text COLLATE "C" NOT NULL',
    "identity": 'text COLLATE "C"',
    "identity_source": 'text COLLATE "C"',
    "identity_tags": "text[] COLLATE \"C\" NOT NULL DEFAULT '{}'",
    "provider": 'text COLLATE "C"',
    "model": 'text COLLATE "C"',
    "product": 'text COLLATE "C" NOT NULL',
    "status": 'text COLLATE "C" NOT NULL',
    "http_status": "integer NOT NULL",
    "credential_type": "text COLLATE \"C\" NOT NULL DEFAULT 'api_key'",
    "stream": "boolean NOT NULL",
    "input_tokens": "bigint NOT NULL",
    "output_tokens": "bigint NOT NULL",
    "total_tokens": "bigint NOT NULL",
    "cached_input_tokens": "bigint NOT NULL DEFAULT 0",
    "cache_write_tokens": "bigint NOT NULL DEFAULT 0",
    "cache_write_1h_tokens": "bigint NOT NULL DEFAULT 0",
    "reasoning_tokens": "bigint NOT NULL DEFAULT 0",
    "audio_input_tokens": "bigint NOT NULL DEFAULT 0",
    "audio_output_tokens": "bigint NOT NULL DEFAULT 0",
    "input_cost_nanos": "bigint NOT NULL",
    "output_cost_nanos": "bigint NOT NULL",
    "cached_cost_nanos": "bigint NOT NULL DEFAULT 0",
    "cache_write_cost_nanos": "bigint NOT NULL DEFAULT 0",
    "reasoning_cost_nanos": "bigint NOT NULL DEFAULT 0",
    "total_cost_nanos": "bigint NOT NULL",
    "latency_ms": "double precision NOT NULL",
    "ttft_ms": "double precision",
    "usage_source": 'text COLLATE "C" NOT NULL',
    "usage_note": 'text COLLATE "C"',
    "price_source": 'text COLLATE "C" NOT NULL',
    "budget_ids": "text[] COLLATE \"C\" NOT NULL DEFAULT '{}'",
    "metadata": "text NOT NULL DEFAULT '{}'",  # JSON object text, as DuckDB keeps it
}
# The table's column order as step 1 created it (part of a released step: never edit it): 8-byte
# fixed-width NOT NULL columns first (no padding, cached offsets), then the narrower ones, then the
# nullable double, then text and arrays (the common dimensions first).
_PHYSICAL_ORDER = (
    "ts",
    "total_cost_nanos",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "input_cost_nanos",
    "output_cost_nanos",
    "cached_input_tokens",
    "cached_cost_nanos",
    "reasoning_tokens",
    "reasoning_cost_nanos",
    "audio_input_tokens",
    "audio_output_tokens",
    "http_status",
    "stream",
    "ttft_ms",
    "workspace",
    "project",
    "identity",
    "model",
    "provider",
    "status",
    "api_key_id",
    "product",
    "credential_type",
    "identity_tags",
    "budget_ids",
    "event_id",
    "identity_source",
    "usage_source",
    "usage_note",
    "price_source",
    "metadata",
)
# Columns later steps added (`ALTER TABLE ... ADD COLUMN`: at the end of every row, after the text; they
# are read only by whole-row reads, so nothing reports read sits behind them), by the step that added each.
_ADDED_COLUMNS: dict[int, tuple[str, ...]] = {
    3: ("cache_write_tokens", "cache_write_1h_tokens", "cache_write_cost_nanos"),
}

# Migrations of the "events" component: step i takes the schema from version i to i + 1. Never edit a
# released step; append one.
STEPS: tuple[str, ...] = (
    f"CREATE TABLE {EVENTS_TABLE} ("
    + ", ".join(f"{name} {EVENT_COLUMNS[name]}" for name in _PHYSICAL_ORDER)
    + ", PRIMARY KEY (event_id)); "
    f"CREATE INDEX {EVENTS_TABLE}_ts_brin ON {EVENTS_TABLE} USING brin (ts) "
    "WITH (pages_per_range = 32, autosummarize = on); "
    f"CREATE INDEX {EVENTS_TABLE}_budget_ts ON {EVENTS_TABLE} (ts) WHERE cardinality(budget_ids) > 0; "
    # Reports scan a workspace's window: this index holds what the common ones read (~95 B an event
    # against ~400 B of heap), so they are index-only scans of a quarter of the bytes.
    f"CREATE INDEX {EVENTS_TABLE}_report ON {EVENTS_TABLE} (workspace, ts) "
    "INCLUDE (project, identity, model, total_cost_nanos, latency_ms); "
    # How many buckets a window has: without these the planner takes every distinct `ts` for a bucket,
    # expects as many groups as rows, and sorts instead of hashing (2-3x slower).
    f"CREATE STATISTICS {EVENTS_TABLE}_day ON (CAST(ts AS date)) FROM {EVENTS_TABLE}; "
    f"CREATE STATISTICS {EVENTS_TABLE}_hour ON (date_trunc('hour', ts)) FROM {EVENTS_TABLE}; "
    f"CREATE STATISTICS {EVENTS_TABLE}_minute ON (date_trunc('minute', ts)) FROM {EVENTS_TABLE}",
    # 2: per-(workspace, identity, UTC day) sums, kept by a statement trigger in the transaction of every
    # insert (a COPY included), so `include_metrics` on any replica reads a few rows, not the events.
    f"CREATE TABLE {IDENTITY_DAYS_TABLE} ("
    'workspace text COLLATE "C" NOT NULL, identity text COLLATE "C" NOT NULL, day date NOT NULL, '
    "requests bigint NOT NULL, errors bigint NOT NULL, tokens bigint NOT NULL, cost_nanos bigint NOT NULL, "
    "PRIMARY KEY (workspace, identity, day)); "
    f"CREATE FUNCTION {IDENTITY_DAYS_TABLE}_add() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"INSERT INTO {IDENTITY_DAYS_TABLE} AS d (workspace, identity, day, requests, errors, tokens, cost_nanos) "
    "SELECT workspace, identity, CAST(ts AS date), count(*), count(*) FILTER (WHERE status = 'ERROR'), "
    "sum(total_tokens), sum(total_cost_nanos) FROM new_events WHERE identity IS NOT NULL "
    # (in key order: concurrent inserts lock the rows they share in the same order, so never deadlock)
    "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 "
    "ON CONFLICT (workspace, identity, day) DO UPDATE SET requests = d.requests + EXCLUDED.requests, "
    "errors = d.errors + EXCLUDED.errors, tokens = d.tokens + EXCLUDED.tokens, "
    "cost_nanos = d.cost_nanos + EXCLUDED.cost_nanos; "
    "RETURN NULL; END $$; "
    f"CREATE TRIGGER {EVENTS_TABLE}_identity_days AFTER INSERT ON {EVENTS_TABLE} "
    f"REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION {IDENTITY_DAYS_TABLE}_add(); "
    f"INSERT INTO {IDENTITY_DAYS_TABLE} SELECT workspace, identity, CAST(ts AS date), count(*), "
    "count(*) FILTER (WHERE status = 'ERROR'), sum(total_tokens), sum(total_cost_nanos) "
    f"FROM {EVENTS_TABLE} WHERE identity IS NOT NULL GROUP BY 1, 2, 3",
    # 3: prompt-cache writes (Anthropic's), inside input_tokens / input_cost_nanos like the cache reads.
    # A NOT NULL column with a constant DEFAULT is added without rewriting the table (PostgreSQL 11+).
    f"ALTER TABLE {EVENTS_TABLE} "
    + ", ".join(f"ADD COLUMN {name} {EVENT_COLUMNS[name]}" for name in _ADDED_COLUMNS[3]),
)

_COLUMN_LIST = ", ".join(EVENT_COLUMNS)
_COPY_SQL = f"COPY {EVENTS_TABLE} ({_COLUMN_LIST}) FROM STDIN"
_STAGING = "orq_usage_events_staging"
_METADATA_ENCODER = json.JSONEncoder(separators=(",", ":"))  # the DuckDB store's encoding, byte for byte


def _row(event: UsageEvent) -> list[Any]:
    """The event as a row in `EVENT_COLUMNS` order (`ts` naive UTC, `metadata` JSON text)."""
    # `UsageEvent` declares its fields in `EVENT_COLUMNS` order (tests hold the two together).
    row = list(event.__dict__.values())
    ts = event.timestamp
    row[1] = (ts if ts.tzinfo is UTC else ts.astimezone(UTC)).replace(tzinfo=None)
    metadata = event.metadata
    row[-1] = _METADATA_ENCODER.encode(metadata) if metadata else "{}"
    return row


def _has_nul(row: list[Any]) -> bool:
    return any(
        "\x00" in value
        if isinstance(value, str)
        else isinstance(value, list) and any("\x00" in v for v in value)
        for value in row
    )


def _without_nul(row: list[Any]) -> list[Any]:
    """The row with each NUL of its text replaced by U+FFFD (PostgreSQL text cannot hold NUL)."""
    return [
        value.replace("\x00", "\ufffd")
        if isinstance(value, str)
        else [v.replace("\x00", "\ufffd") for v in value]
        if isinstance(value, list)
        else value
        for value in row
    ]


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
    "http_status_code": 'CAST(http_status AS text) COLLATE "C"',
    "credential_type": "credential_type",
    "tag": 'tag COLLATE "C"',
}
# Filter field -> SQL column; values are converted by `_filter_values`.
_FILTER_SQL: dict[str, str] = {
    **_DIMENSION_SQL,
    "http_status_code": "http_status",
    "billing_billable": "(total_cost_nanos > 0)",  # the request carried a cost
}
_MEASURE_COLUMNS = frozenset(
    name for name, kind in EVENT_COLUMNS.items() if kind.startswith(("bigint", "integer", "double"))
)
_GRAIN_SECONDS = {"minute": 60, "hour": 3600}
# `group_by: ["tag"]`: a row per tag of each event, and one (tag NULL) for an event without tags. A lateral
# join rather than DuckDB's `unnest` in a subquery: the planner then aggregates in the parallel workers
# and knows the bucket expression's statistics (17 s -> 5 s for the tag bundle on 10M events).
_TAG_SOURCE = f"{EVENTS_TABLE} LEFT JOIN LATERAL unnest(identity_tags) AS tagged(tag) ON true"
_ERRORS_SQL = "count(*) FILTER (WHERE status = 'ERROR')"
_EPOCH = datetime(1970, 1, 1)  # naive UTC


@lru_cache(maxsize=64)
def _measure_sql(measure: Measure) -> str:
    """The aggregate expression of one measure."""
    if measure.aggregate == "count":
        sql = "count(*)"
    elif measure.aggregate == "errors":
        sql = _ERRORS_SQL
    elif measure.aggregate == "error_rate":
        sql = f"CASE WHEN count(*) = 0 THEN NULL ELSE CAST({_ERRORS_SQL} AS double precision) / count(*) END"
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
            # Exact, interpolated between the two nearest ranks: DuckDB's `quantile_cont`.
            sql = f"percentile_cont({fraction!r}) WITHIN GROUP (ORDER BY {column})"
        else:
            raise ValueError(f"measure {measure.key}: unknown aggregate {measure.aggregate!r}")
    return f"{sql} FILTER (WHERE stream)" if measure.streams_only else sql


def _segment_case(
    segments: Sequence[tuple[datetime, timedelta]], value: Callable[[timedelta], Any]
) -> tuple[str, list[Any]]:
    """A `CASE` on `ts` giving `value(offset)` of the segment `ts` is in, with its parameters."""
    if len(segments) == 1:
        return "%s", [value(segments[0][1])]
    parts: list[str] = []
    params: list[Any] = []
    for (boundary, _), (_, before) in zip(segments[1:], segments, strict=False):
        parts.append("WHEN ts < %s THEN %s")
        params += [_naive_utc(boundary), value(before)]
    return f"CASE {' '.join(parts)} ELSE %s END", [*params, value(segments[-1][1])]


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


def _bucket_sql(plan: ReportPlan) -> tuple[str, list[Any], Callable[[Any], Any] | None]:
    """The bucket expression, its parameters, and how a fetched bucket becomes `ReportData`'s (an aware
    UTC start for minute and hour grains; the local date for day buckets, fetched as a `date` already)."""
    grain = plan.query.effective_grain
    segments = plan.segments
    offsets = {offset for _, offset in segments}
    if grain in _GRAIN_SECONDS:
        step = _GRAIN_SECONDS[grain]
        if all(offset.total_seconds() % step == 0 for offset in offsets):
            # The local clock's :00 coincides with UTC's: bucket in UTC (no per-row offset work).
            return f"date_trunc('{grain}', ts)", [], _aware
        # Buckets of `step` counted from the local epoch (UTC 1970-01-01 minus the offset): the instant
        # t - ((t + offset) mod step), DuckDB's integer arithmetic on `epoch_us`.
        origin_sql, params = _segment_case(segments, lambda offset: _EPOCH - offset)
        return (
            f"date_bin(CAST(%s AS interval), ts, CAST({origin_sql} AS timestamp))",
            [timedelta(seconds=step), *params],
            _aware,
        )
    if offsets == {timedelta(0)}:
        return "CAST(ts AS date)", [], None
    offset_sql, params = _segment_case(segments, lambda offset: offset)
    # The local calendar day: the local wall time's date.
    return f"CAST(ts + CAST({offset_sql} AS interval) AS date)", params, None


def _filter_values(item: Filter) -> list[Any]:
    if item.field == "http_status_code":
        return [int(v) for v in item.values]
    if item.field == "billing_billable":
        return [v == "true" for v in item.values]
    return list(item.values)


def _filter_sql(item: Filter, *, tag_unnested: bool) -> tuple[str, list[Any]]:
    values = _filter_values(item)
    if item.field == "tag" and not tag_unnested:
        # `&&`: the event's tags overlap the values (NOT NULL column: no coalesce needed for `NOT`).
        if item.op in ("eq", "in"):
            return "identity_tags && CAST(%s AS text[])", [values]
        return "NOT (identity_tags && CAST(%s AS text[]))", [values]
    column = _FILTER_SQL[item.field]
    marks = ", ".join("%s" for _ in values)
    if item.op == "eq":
        return f"{column} = %s", values
    if item.op == "neq":
        return f"{column} IS DISTINCT FROM %s", values  # unattributed (NULL) rows are "not equal" too
    if item.op == "in":
        return f"{column} IN ({marks})", values
    return f"({column} IS NULL OR {column} NOT IN ({marks}))", values


def _base_where(query: ReportQuery, scope: ReportScope) -> tuple[str, list[Any]]:
    clauses = ["workspace = %s", "ts >= %s", "ts < %s"]
    params: list[Any] = [scope.workspace, _naive_utc(query.start), _naive_utc(query.end)]
    if scope.project is not None:
        clauses.append("project = %s")
        params.append(scope.project)
    return " AND ".join(clauses), params


def _report_rows_sql(plan: ReportPlan) -> tuple[str, list[Any], Callable[[Any], Any] | None]:
    """The statement of the report's rows (at most `limit + 1`), its parameters, the bucket conversion."""
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
    keys = len(select)  # bucket and dimensions: what the rows are grouped by
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
    source = _TAG_SOURCE if tag_unnested else EVENTS_TABLE
    where = [base_sql, *filter_sql]
    where_params = [*base_params, *filter_params]

    having = [
        f"{sql} IS NOT NULL"
        for measure, sql in zip(plan.measures, aggs, strict=True)
        if measure.kind == "float"
    ]
    dim_order = [f"{alias} ASC NULLS FIRST" for alias in dims]
    if scalar:
        # DuckDB puts NULLs last in both directions; PostgreSQL's DESC would put them first.
        direction = "ASC" if query.sort == "asc" else "DESC"
        by_key = {measure.key: alias for measure, alias in zip(plan.measures, metric_cols, strict=True)}
        order = [f"{by_key[key]} {direction} NULLS LAST" for key in plan.order_by] + dim_order
    else:
        order = ["bucket ASC", *dim_order]

    sql = f"SELECT {', '.join(select)} FROM {source} WHERE {' AND '.join(where)}"
    if keys:
        sql += f" GROUP BY {', '.join(str(i) for i in range(1, keys + 1))}"
    if having:
        sql += f" HAVING {' AND '.join(having)}"
    sql += f" ORDER BY {', '.join(order)} LIMIT %s"
    return sql, [*params, *where_params, query.limit + 1], convert_bucket


def _report_totals_sql(plan: ReportPlan) -> tuple[str, list[Any]]:
    """One value per measure over the whole window, each event counted once (no tag unnesting)."""
    base_sql, params = _base_where(plan.query, plan.scope)
    where = [base_sql]
    for item in plan.query.filters:
        clause, values = _filter_sql(item, tag_unnested=False)
        where.append(clause)
        params += values
    aggs = ", ".join(_measure_sql(measure) for measure in plan.measures)
    return f"SELECT {aggs} FROM {EVENTS_TABLE} WHERE {' AND '.join(where)}", params


# ---- the other reads ----------------------------------------------------------------------------------

# DuckDB's `round(DOUBLE)` rounds halves away from zero; PostgreSQL's rounds them to even. This is the
# former, exactly: `x - trunc(x)` of a double is exact.
_LATENCY_US = "(latency_ms * 1000)"
_ROUNDED_LATENCY_US = (
    f"CAST(trunc({_LATENCY_US}) + CASE WHEN abs({_LATENCY_US} - trunc({_LATENCY_US})) >= 0.5 "
    f"THEN sign({_LATENCY_US}) ELSE 0 END AS bigint)"
)
_BUDGET_SQL = (
    "WITH b AS (SELECT * FROM unnest(CAST(%s AS text[]), CAST(%s AS timestamp[])) AS b(budget_id, since)), "
    f"e AS (SELECT unnest(budget_ids) AS budget_id, ts, "
    f"ts + {_ROUNDED_LATENCY_US} * INTERVAL '1 microsecond' AS settled, total_cost_nanos, total_tokens "
    f"FROM {EVENTS_TABLE} WHERE cardinality(budget_ids) > 0 AND ts >= CAST(%s AS timestamp) - INTERVAL '1 day') "
    "SELECT budget_id, sum(total_cost_nanos) FILTER (WHERE settled >= since), "
    "sum(total_tokens) FILTER (WHERE settled >= since), "
    "array_agg(CAST(extract(epoch FROM ts) * 1000000 AS bigint) ORDER BY ts) "
    "FILTER (WHERE ts >= CAST(%s AS timestamp) AND settled >= since) "
    "FROM e JOIN b USING (budget_id) GROUP BY budget_id"
)
_IDENTITY_DAYS_SQL = (
    "SELECT workspace, identity, date_trunc('day', ts) AS day, count(*), "
    f"{_ERRORS_SQL}, sum(total_tokens), sum(total_cost_nanos) "
    f"FROM {EVENTS_TABLE} WHERE identity IS NOT NULL AND ts >= %s GROUP BY 1, 2, 3 ORDER BY day"
)
# One batch of retention: the oldest rows' physical addresses, then those rows (no long scan under lock).
_IDENTITY_TOTALS_SQL = (
    "SELECT identity, sum(requests), sum(errors), sum(tokens), sum(cost_nanos) "
    f"FROM {IDENTITY_DAYS_TABLE} WHERE workspace = %s AND identity = ANY(%s) AND day >= %s GROUP BY identity"
)
# The days wholly before a retention cutoff: their events are all gone, so their sums go too.
_DELETE_DAYS_SQL = f"DELETE FROM {IDENTITY_DAYS_TABLE} WHERE day < CAST(%s AS date)"
_DELETE_BATCH_SQL = (
    f"DELETE FROM {EVENTS_TABLE} WHERE ctid = ANY(ARRAY("
    f"SELECT ctid FROM {EVENTS_TABLE} WHERE ts < %s LIMIT %s))"
)


class PostgresEventStore:
    """Keeps the usage events in a PostgreSQL database (the `usage_events` table); an `EventStore`.

    Opening it migrates the schema (`STEPS`; safe when replicas start together) and opens a small pool of
    connections. Every method but `aclose` blocks; the app and the slices call them from worker threads.

    Args:
        url: `postgresql://user[:password]@host[:port]/database` (or `postgres://`).
        pool_max_size: the most connections held at once.
        pool_timeout: seconds to wait for a pooled connection before trying a direct one (which raises at
            once, or after `CONNECT_TIMEOUT`, when the server is down).
        delete_batch: rows per retention transaction.

    Raises:
        SchemaTooNew: the database was migrated by a newer orq-proxy.
        psycopg.OperationalError: the server cannot be reached (after `CONNECT_TIMEOUT` at most).

    Example:
        store = PostgresEventStore("postgresql://orq@db.internal/orq")
        store.insert(events)
        store.close()
    """

    def __init__(
        self,
        url: str,
        *,
        pool_max_size: int = POOL_MAX_SIZE,
        pool_timeout: float = POOL_TIMEOUT,
        delete_batch: int = DELETE_BATCH,
    ) -> None:
        if delete_batch < 1:
            raise ValueError("delete_batch must be at least 1")
        self.url = url
        self.delete_batch = delete_batch
        migrate(url, "events", STEPS)
        self._pool_max_size = pool_max_size
        self._pool_timeout = pool_timeout
        self._renew_lock = threading.Lock()
        self._closed = False
        self._pool = self._new_pool()
        try:
            self._pool.open(wait=True, timeout=pool_timeout)
        except BaseException:
            self._pool.close()  # (its worker threads would keep trying)
            raise
        logger.info("event store: PostgreSQL at %s", redacted(url))

    def _new_pool(self) -> psycopg_pool.ConnectionPool[psycopg.Connection[Any]]:
        from psycopg_pool import ConnectionPool

        return ConnectionPool(
            self.url,
            kwargs=connect_kwargs(application_name="orq-proxy events"),
            min_size=1,
            max_size=self._pool_max_size,
            timeout=self._pool_timeout,
            check=ConnectionPool.check_connection,  # a connection the server dropped is replaced, not used
            name="orq-proxy events",
            open=False,
        )

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; when the pool has none within `pool_timeout`, a direct one.

        After an outage the pool waits out its reconnection backoff (doubling, up to minutes) although the
        server may be back: one direct connection tells (it raises at once while the server is down), and
        when it works a fresh pool replaces the waiting one, so writes resume within seconds.
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        pool = self._pool
        try:
            conn = pool.getconn()
        except PoolTimeout:
            with psycopg.connect(self.url, **connect_kwargs(application_name="orq-proxy events")) as direct:
                self._renew_pool(pool)
                yield direct
            return
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def _renew_pool(self, stale: psycopg_pool.ConnectionPool[psycopg.Connection[Any]]) -> None:
        """Replace `stale` by a new pool (once, whichever thread gets here first)."""
        with self._renew_lock:
            if self._pool is not stale or self._closed:
                return
            fresh = self._new_pool()
            fresh.open(wait=False)
            self._pool = fresh
        logger.warning("event store: PostgreSQL answers again; reconnected")
        stale.close(timeout=1.0)

    @classmethod
    def from_url(cls, url: str) -> PostgresEventStore:
        """The store of `[storage] events = "postgresql://..."`."""
        return cls(url)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (autocommit) for the calling thread, returned to the pool afterwards."""
        with self._connection() as conn:
            yield conn

    @contextmanager
    def _long_read(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection inside a read-only transaction (one snapshot for every statement) whose
        statements may run for `READ_STATEMENT_TIMEOUT_MS`."""
        with self._connection() as conn, conn.transaction():
            conn.execute(
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; "
                f"SET LOCAL statement_timeout = {READ_STATEMENT_TIMEOUT_MS}; "
                f"SET LOCAL work_mem = '{REPORT_WORK_MEM}'; "
                # The pages are cached or on SSD: without this the planner scans the heap (4x the bytes)
                # rather than the report index.
                "SET LOCAL random_page_cost = 1.1; "
                # Compiling took 0.4-0.6 s of a 1.5-2 s report (quantiles: slower with it than without).
                "SET LOCAL jit = off"
            )
            yield conn

    def insert(self, events: Sequence[UsageEvent]) -> None:
        """Append events, all or none (blocking): one `COPY`, one statement, one round trip.

        A batch holding an event already stored (a retry of a batch whose commit was not acknowledged:
        the sink bus timed out while the write went through) is inserted as `insert_new` does, so a retry
        neither fails again nor stores an event twice. Text with NUL characters, which PostgreSQL cannot
        store, is kept with each NUL replaced by U+FFFD.
        """
        if events:
            self._write_nul_free(self._append, [_row(event) for event in events])

    def _append(self, rows: list[list[Any]]) -> int:
        """`COPY` the rows; a batch holding a stored event id goes through `_insert_new_rows` instead."""
        import psycopg

        try:
            with self._connection() as conn, conn.cursor() as cur, cur.copy(_COPY_SQL) as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.errors.UniqueViolation:
            return self._insert_new_rows(rows)
        return len(rows)

    @staticmethod
    def _write_nul_free(write: Callable[[list[list[Any]]], int], rows: list[list[Any]]) -> int:
        """`write(rows)`; when text with NUL (which PostgreSQL refuses) made it fail, again without."""
        import psycopg

        try:
            return write(rows)
        except psycopg.DataError:
            if not any(_has_nul(row) for row in rows):
                raise
            logger.warning("event store: NUL characters in %d events replaced by U+FFFD", len(rows))
            return write([_without_nul(row) for row in rows])

    def insert_new(self, events: list[UsageEvent]) -> int:
        """Insert those of `events` whose `event_id` the store does not hold yet; how many (blocking).

        For the event spool's replay at startup: the events are copied into a temporary table and moved
        with `ON CONFLICT (event_id) DO NOTHING`, in one transaction (idempotent, also against other
        writers). Of events repeated in `events`, the first is kept.
        """
        if not events:
            return 0
        new: dict[str, list[Any]] = {}
        for event in events:
            if event.event_id not in new:
                new[event.event_id] = _row(event)
        return self._write_nul_free(self._insert_new_rows, list(new.values()))

    def _insert_new_rows(self, rows: list[list[Any]]) -> int:
        """Stage `rows` and move those with new event ids (one transaction); how many were new."""
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(
                f"CREATE TEMPORARY TABLE {_STAGING} (LIKE {EVENTS_TABLE} INCLUDING DEFAULTS) ON COMMIT DROP"
            )
            with cur.copy(f"COPY {_STAGING} ({_COLUMN_LIST}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(
                f"INSERT INTO {EVENTS_TABLE} ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_STAGING} "
                "ON CONFLICT (event_id) DO NOTHING"
            )
            return max(cur.rowcount, 0)

    def delete_before(self, cutoff: datetime) -> int:
        """Delete the events older than `cutoff` (aware, or naive UTC); how many were deleted (blocking).

        In batches of `delete_batch` rows, each committed on its own, so retention never holds many row
        locks or a long transaction while the sink bus writes. The identity-day sums of the days wholly
        before the cutoff go as well (the day the cutoff falls in keeps its sums).
        """
        cutoff = _naive_utc(cutoff)
        deleted = 0
        with self._connection() as conn:
            while True:
                batch = conn.execute(_DELETE_BATCH_SQL, (cutoff, self.delete_batch)).rowcount
                deleted += max(batch, 0)
                if batch < self.delete_batch:
                    break
            conn.execute(_DELETE_DAYS_SQL, (cutoff,))
        return deleted

    def identity_totals(
        self, workspace: str, identities: Sequence[str], since: datetime
    ) -> dict[str, Totals]:
        """The sums of each of `identities` (external ids) in `workspace` over the UTC days from `since` on
        (`IdentityTotals`, for `include_metrics` shared by replicas): one indexed read of the identity-day
        sums the insert trigger keeps. Identities without events are left out."""
        if not identities:
            return {}
        day = _naive_utc(since).date()
        with self._connection() as conn:
            rows = conn.execute(_IDENTITY_TOTALS_SQL, (workspace, list(identities), day)).fetchall()
        return {
            identity: Totals(int(requests), int(errors), int(tokens), int(cost))
            for identity, requests, errors, tokens, cost in rows
        }

    def budget_consumption(
        self, since: Mapping[str, datetime], requests_since: datetime
    ) -> dict[str, BudgetConsumption]:
        """What the events charged to each budget of `since` (budget id -> the instant its count starts);
        `BudgetLedger`, with DuckDB's semantics: an event is charged when its request settled (`ts` plus
        the latency, rounded to the microsecond), and counts for the rate window at its arrival when that
        is at or after `requests_since`. Budgets with nothing charged are left out."""
        if not since:
            return {}
        ids = list(since)
        starts = [_naive_utc(since[i]) for i in ids]
        with self._long_read() as conn:
            rows = conn.execute(
                _BUDGET_SQL,
                # (a request may run for hours, so events that arrived a day before the earliest window
                # still count when they settled inside it)
                (ids, starts, min(starts), _naive_utc(requests_since)),
            ).fetchall()
        return {
            budget_id: BudgetConsumption(
                int(cost or 0), int(tokens or 0), tuple(us / 1_000_000 for us in times or ())
            )
            for budget_id, cost, tokens, times in rows
        }

    def report(self, plan: ReportPlan) -> ReportData:
        """Reporting's rows and totals (`ReportSource`): one statement for the rows, one for the totals,
        in one read-only transaction (one snapshot) on a pooled connection. A database error (the server
        unreachable included) is raised as `ReportSourceError`."""
        import psycopg

        rows_sql, rows_params, bucket = _report_rows_sql(plan)  # a ValueError here is the caller's bug
        totals_sql = _report_totals_sql(plan) if plan.query.include_totals else None
        try:
            with self._long_read() as conn:
                rows = conn.execute(rows_sql, rows_params).fetchall()
                totals = (
                    conn.execute(totals_sql[0], totals_sql[1]).fetchone() if totals_sql is not None else None
                )
        except psycopg.Error as exc:
            raise ReportSourceError(f"the PostgreSQL event store could not answer: {exc}") from exc
        return ReportData(rows, totals, bucket)

    def identity_days(self, since: datetime) -> list[IdentityDay]:
        """Per (workspace, identity, UTC day) since `since` (aware, or naive UTC): requests, errors, tokens
        and nano-USD, in day order (`IdentityHistory`: one GROUP BY over the window)."""
        with self._long_read() as conn:
            rows = conn.execute(_IDENTITY_DAYS_SQL, (_naive_utc(since),)).fetchall()
        return [
            IdentityDay(
                workspace, identity, day, int(requests), int(errors), int(tokens or 0), int(cost or 0)
            )
            for workspace, identity, day, requests, errors, tokens, cost in rows
        ]

    def count(self) -> int:
        """How many events the store holds."""
        with self._connection() as conn:
            row = conn.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Close the pool (blocking: waits for connections in use to come back)."""
        with self._renew_lock:
            self._closed = True
        self._pool.close()

    async def aclose(self) -> None:
        """`close` in a worker thread."""
        await asyncio.to_thread(self.close)


if TYPE_CHECKING:

    def _implements_event_store(store: PostgresEventStore) -> EventStore:
        return store  # mypy checks here that the store implements every slice's protocol

    def _implements_identity_totals(store: PostgresEventStore) -> IdentityTotals:
        return store  # and the shared `include_metrics` read
