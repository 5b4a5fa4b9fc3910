"""The shared PostgreSQL helpers: versioned migrations under an advisory lock, URL redaction."""

from __future__ import annotations

import threading

import psycopg
import pytest

from orq_proxy.postgres import SchemaTooNew, is_postgres_url, migrate, redacted

STEPS = [
    "CREATE TABLE t (x integer)",
    "ALTER TABLE t ADD COLUMN y integer",
]


def _version(url: str, component: str) -> int | None:
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('orq_proxy_schema')").fetchone() == (None,):
            return None
        row = conn.execute(
            "SELECT version FROM orq_proxy_schema WHERE component = %s", (component,)
        ).fetchone()
        return None if row is None else int(row[0])


def test_steps_run_once_in_order_and_a_rerun_changes_nothing(pg_url: str) -> None:
    assert migrate(pg_url, "c", STEPS[:1]) == 0
    assert migrate(pg_url, "c", STEPS) == 1  # only the new step runs (the CREATE would fail twice)
    assert migrate(pg_url, "c", STEPS) == 2
    assert _version(pg_url, "c") == 2
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO t (x, y) VALUES (1, 2)")


def test_components_are_versioned_apart(pg_url: str) -> None:
    migrate(pg_url, "a", ["CREATE TABLE a (x integer)"])
    migrate(pg_url, "b", ["CREATE TABLE b (x integer)", "CREATE TABLE b2 (x integer)"])
    assert (_version(pg_url, "a"), _version(pg_url, "b")) == (1, 2)


def test_replicas_migrating_at_once_apply_each_step_once(pg_url: str) -> None:
    found: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            found.append(migrate(pg_url, "c", STEPS))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(found) == [0, 2, 2, 2, 2, 2]  # one did the work, the others found it done
    assert _version(pg_url, "c") == 2


def test_a_database_newer_than_the_code_is_refused_and_left_alone(pg_url: str) -> None:
    migrate(pg_url, "c", STEPS)
    with pytest.raises(SchemaTooNew, match=r"version 2, newer than this orq-proxy knows \(1\)"):
        migrate(pg_url, "c", STEPS[:1])
    assert _version(pg_url, "c") == 2


def test_a_failing_step_keeps_nothing(pg_url: str) -> None:
    with pytest.raises(psycopg.Error):
        migrate(pg_url, "c", ["CREATE TABLE ok (x integer)", "CREATE TABLE broken (x nosuchtype)"])
    assert _version(pg_url, "c") is None
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('ok')").fetchone() == (None,)


def test_urls() -> None:
    assert is_postgres_url("postgresql://u@h/db") and is_postgres_url("postgres://h/db")
    assert not is_postgres_url("sqlite:///x.db")
    assert redacted("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redacted("postgresql://u@h/db") == "postgresql://u@h/db"
