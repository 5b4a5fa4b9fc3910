"""What every PostgreSQL-backed store shares: URL checks, connection settings and versioned migrations.

The stores themselves live with their slices (`eventstore/postgres.py`, `identities/postgres.py`,
`budgets/postgres.py`); this module holds only what they must agree on, so that `[storage] state` and
`[storage] events` may name the same database or two different ones.

Migrations. Each store is a *component* ("state", "events") with an ordered list of SQL steps; step `i`
takes the component from version `i` to `i + 1`. `migrate` runs at startup, in one transaction holding a
transaction-scoped advisory lock, so replicas that start at the same moment apply each step exactly once
(the second waits for the first, then finds the work done). A database whose recorded version is newer than
the steps this code knows is refused with `SchemaTooNew`: old code must not write to a newer layout.

The driver is psycopg 3 (`orq-proxy[postgres]`): one driver for the blocking event store (called from
worker threads, like DuckDB) and the async state stores, with COPY and LISTEN/NOTIFY. See
docs/architecture.md "State" for the measurement behind the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

__all__ = [
    "CONNECT_TIMEOUT",
    "STATEMENT_TIMEOUT_MS",
    "SchemaTooNew",
    "connect_kwargs",
    "is_postgres_url",
    "migrate",
    "redacted",
    "require_driver",
]

CONNECT_TIMEOUT: Final = 3  # seconds: a server that does not answer is "unavailable" quickly (fail closed)
STATEMENT_TIMEOUT_MS: Final = 5000  # a stalled server cannot hold a request (or a worker thread) forever

# One advisory lock key for every component's migrations: pg_advisory_xact_lock(bigint).
_MIGRATION_LOCK: Final = 0x6F72_7170_0001  # "orqp" + 1

_VERSION_TABLE: Final = """
CREATE TABLE IF NOT EXISTS orq_proxy_schema (
    component text PRIMARY KEY,
    version integer NOT NULL,
    migrated_at timestamptz NOT NULL DEFAULT now()
)
"""


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer orq-proxy than this one."""


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    head, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{head}{sep}{creds.split(':', 1)[0]}:***@{host}"


def require_driver(setting: str) -> None:
    """Raise a clear error when psycopg is missing (the `postgres` extra was not installed)."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"[storage] {setting} names PostgreSQL, which needs the postgres extra: "
            "pip install 'orq-proxy[postgres]'"
        ) from exc


def connect_kwargs(*, application_name: str) -> dict[str, Any]:
    """Connection settings every store uses (on top of what the URL says)."""
    return {
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": application_name,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        "autocommit": True,
    }


def migrate(url: str, component: str, steps: Sequence[str]) -> int:
    """Bring `component`'s schema in the database at `url` to `len(steps)`; returns the version found.

    Blocking (call it from a thread in async code). Safe when several processes run it at once.

    Raises:
        SchemaTooNew: the database records a higher version than `len(steps)`.
        psycopg.Error: the database cannot be reached or a step fails (nothing of that step is kept).
    """
    import psycopg

    with psycopg.connect(url, **connect_kwargs(application_name=f"orq-proxy migrate {component}")) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(_VERSION_TABLE)
            row = conn.execute(
                "SELECT version FROM orq_proxy_schema WHERE component = %s", (component,)
            ).fetchone()
            found = int(row[0]) if row else 0
            if found > len(steps):
                raise SchemaTooNew(
                    f"the {component} schema in {redacted(url)} is at version {found}, newer than this "
                    f"orq-proxy knows ({len(steps)}): upgrade orq-proxy, or point [storage] {component} at "
                    "another database"
                )
            for step in steps[found:]:
                conn.execute(step.encode())  # our own literal SQL (a str is not a LiteralString to mypy)
            if found < len(steps):
                conn.execute(
                    "INSERT INTO orq_proxy_schema (component, version) VALUES (%s, %s) "
                    "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, migrated_at = now()",
                    (component, len(steps)),
                )
        return found
