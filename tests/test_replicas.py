"""Two real `orq-proxy serve` replicas sharing PostgreSQL (identities, budgets, events) and Redis (counters).

Each test gets its own database (`pg_url`) and Redis key prefix. The replicas are separate processes on
their own ports, in front of the session's fake upstream; clients are the official `openai` and
`orq-ai-sdk` SDKs, plus httpx for the management calls the SDK does not cover.

Prices are overridden so costs are exact (as in tests/budgets/test_budget_gate.py): `openai/test-model`
costs 1,000,000 nano-USD per input token and 2,000,000 per output token.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
import redis
from orq_ai_sdk import Orq
from starlette.applications import Starlette
from starlette.routing import Route
from ulid import ULID

from orq_proxy.testing.servers import serve_in_thread
from tests.budgets.test_budget_alerts import Receiver
from tests.conftest import OwnPostgres, fresh_database
from tests.test_cli import UPSTREAM_KEY, free_port
from tests.waiting import wait_for

ADMIN = "sk-admin-replicas"
USER = "sk-user-replicas"
MESSAGES = [{"role": "user", "content": "hello there"}]
IN_NANOS, OUT_NANOS = 1_000_000, 2_000_000
EST_NANOS = 7 * IN_NANOS + 10 * OUT_NANOS  # the gate's estimate of MESSAGES with max_tokens=10
ACTUAL_NANOS = 6 * IN_NANOS + 8 * OUT_NANOS  # what the fake upstream reports for it
REDIS_URL = "redis://127.0.0.1:6379/0"


def write_config(path: Path, *, upstream: str, database: str, prefix: str, extra: str = "") -> Path:
    path.write_text(
        f"""
[upstreams.openai]
base_url = "{upstream}/v1"
api_key = "{UPSTREAM_KEY}"
default = true

[[api_keys]]
key = "{ADMIN}"
workspace = "ws"
admin = true
id = "admin"

[[api_keys]]
key = "{USER}"
workspace = "ws"
id = "user_key"
project = "proj"

[prices."openai/test-model"]
input_per_mtok = 1000.0
output_per_mtok = 2000.0

[storage]
state = "{database}"
events = "{database}"
counters = "{REDIS_URL}"
counters_prefix = "{prefix}"
{extra}
"""
    )
    return path


@dataclass
class Replica:
    """One `orq-proxy serve` process."""

    config: Path
    workers: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    output: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Replica:
        environment = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "orq_proxy", "serve", "--config", str(self.config)),
                *("--port", str(self.port), "--workers", str(self.workers)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # its workers too get the signals sent to the group
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.stop()
                raise AssertionError(f"replica did not start:\n{output}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.output = self.proc.communicate(timeout=20)[0].decode(errors="replace")

    def stop(self) -> str:
        """SIGTERM, then its output (the replica's log); once stopped, the same output again."""
        if self.proc is None:
            return ""
        if self.proc.stdout is None or self.proc.stdout.closed:
            return self.output
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            output = self.proc.communicate(timeout=40)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            output = self.proc.communicate(timeout=20)[0].decode(errors="replace")
        self.output = output
        return output

    def openai(self, key: str = USER) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def orq(self) -> Orq:
        return Orq(api_key=ADMIN, server_url=self.url, timeout_ms=10_000)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, self.url + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10, **kwargs
        )


@dataclass
class Cluster:
    database: str
    prefix: str
    replicas: list[Replica]

    @property
    def a(self) -> Replica:
        return self.replicas[0]

    @property
    def b(self) -> Replica:
        return self.replicas[1]

    def events(self, where: str = "TRUE") -> tuple[int, int, int]:
        """(rows, distinct event ids, total cost nano-USD) of the shared event table."""
        with psycopg.connect(self.database) as conn:
            row = conn.execute(
                f"SELECT count(*), count(DISTINCT event_id), coalesce(sum(total_cost_nanos), 0) "  # type: ignore[arg-type]
                f"FROM usage_events WHERE {where}"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])


@pytest.fixture
def cluster_factory(
    fake_server: Any, pg_url: str, redis_url: str, tmp_path: Path
) -> Iterator[Callable[..., Cluster]]:
    """`make(n=2, extra="", workers=1)`: n replicas on one database and one Redis key prefix."""
    _, upstream = fake_server
    prefix = f"test-orq:{ULID()}:"
    started: list[Replica] = []

    def make(n: int = 2, extra: str = "", workers: int = 1, database: str | None = None) -> Cluster:
        database = database or pg_url
        config = write_config(
            tmp_path / f"proxy-{len(started)}.toml",
            upstream=upstream.url,
            database=database,
            prefix=prefix,
            extra=extra,
        )
        replicas = [Replica(config, workers=workers) for _ in range(n)]
        for replica in replicas:
            started.append(replica.start())
        return Cluster(database, prefix, replicas)

    try:
        yield make
    finally:
        logs = [replica.stop() for replica in started]
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        for log in logs:
            assert "Traceback" not in log, log


def chat(replica: Replica, *, identity: str | None = None, latency_ms: int = 0, key: str = USER) -> int:
    """One chat completion through `replica`; its HTTP status."""
    extra: dict[str, Any] = {"max_tokens": 10}
    if identity is not None:
        extra["extra_body"] = {"orq": {"identity": {"id": identity}}}
    headers = {"x-fake-latency-ms": str(latency_ms)} if latency_ms else {}
    try:
        replica.openai(key).chat.completions.create(
            model="test-model", messages=MESSAGES, extra_headers=headers, **extra
        )
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def by_status(database: str) -> list[tuple[int, int]]:
    with psycopg.connect(database) as conn:
        return [
            (int(a), int(b))
            for a, b in conn.execute("SELECT http_status, count(*) FROM usage_events GROUP BY 1 ORDER BY 1")
        ]


def identity_budget(replica: Replica, external_id: str, amount_usd: float) -> str:
    response = replica.admin(
        "POST",
        "/v2/budgets",
        json={
            "scope": {"identity": {"identity_external_id": external_id}},
            "limits": {"period": "BUDGET_PERIOD_MONTHLY", "amount": amount_usd},
        },
    )
    assert response.status_code == 200, response.text
    return str(response.json()["budget"]["budgetId"])


def test_an_identity_created_on_a_is_read_and_updated_through_b(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory()
    with cluster.a.orq() as orq_a, cluster.b.orq() as orq_b:
        created = orq_a.identities.create(external_id="ada", display_name="Ada", tags=["eng"]).result.identity
        read = orq_b.identities.retrieve(id="ada").identity
        assert (read.id, read.display_name, read.tags) == (created.id, "Ada", ["eng"])
        orq_b.identities.update(id="ada", display_name="Ada L.")
        assert orq_a.identities.retrieve(id="ada").identity.display_name == "Ada L."
        listed = orq_a.identities.list(search="ada")
        assert [i.external_id for i in listed.data] == ["ada"]


def test_a_budget_created_on_a_is_enforced_on_b_within_a_second(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory()
    assert chat(cluster.b, identity="bob") == 200  # B has served bob before the budget exists
    identity_budget(cluster.a, "bob", 1e-9)  # one nano-USD: no request fits
    took = wait_for(lambda: chat(cluster.b, identity="bob") == 429, 1.0, "B refuses bob")
    assert took < 1.0
    # ...and deleting it on B frees bob on A within a second too.
    (budget,) = cluster.b.admin("GET", "/v2/budgets").json()["data"]
    assert cluster.b.admin("DELETE", f"/v2/budgets/{budget['budgetId']}").status_code == 200
    wait_for(lambda: chat(cluster.a, identity="bob") == 200, 1.0, "A serves bob again")


def test_concurrent_requests_on_both_replicas_stay_within_the_budget(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """150 concurrent requests split over A and B against a budget that fits about 10: the shared Redis
    counters admit no more than the limit allows, and the shared event store holds every request."""
    cluster = cluster_factory()
    limit = 10 * EST_NANOS
    budget_id = identity_budget(cluster.a, "carol", limit / 1e9)
    wait_for(lambda: len(cluster.b.admin("GET", "/v2/budgets").json()["data"]) == 1, 2, "B lists it")
    time.sleep(0.3)  # B's index has it too (the list above read the database)
    replicas = [cluster.a, cluster.b]
    with ThreadPoolExecutor(150) as pool:
        statuses = list(
            pool.map(lambda i: chat(replicas[i % 2], identity="carol", latency_ms=200), range(150))
        )
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    assert admitted >= 5 and statuses.count(429) > 100, statuses  # (settled requests free their excess)
    usage = cluster.a.admin("GET", f"/v2/budgets/{budget_id}").json()["budget"]["usage"]
    charged = round(usage["amount"] * 1e9)
    assert charged == admitted * ACTUAL_NANOS
    assert charged <= limit
    # Every request, admitted or refused, is one event in the shared store (refusals cost nothing).
    wait_for(lambda: cluster.events()[0] == 150, 3, "150 events stored")
    assert cluster.events() == (150, 150, charged)


def test_reports_and_include_metrics_on_either_replica_cover_both(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory()
    for _ in range(3):
        assert chat(cluster.a, identity="dave") == 200
    for _ in range(2):
        assert chat(cluster.b, identity="dave") == 200
    now = datetime.now(UTC)
    window: dict[str, Any] = {"from_": now - timedelta(days=1), "to": now + timedelta(days=1)}

    def figures(replica: Replica) -> tuple[Any, Any]:
        with replica.orq() as orq:
            report = orq.reporting.query(
                metric="genai.requests", mode="scalar", group_by=["identity"], **window
            )
        rows = [(row.dimensions, row.metrics) for row in report.data or []]
        record = replica.admin("GET", "/v2/identities/dave", params={"include_metrics": "true"}).json()
        return rows, record["identity"]["metrics"]

    def both_see_five() -> bool:
        return all(
            metrics["total_requests"] == 5 and rows == [({"identity": "dave"}, {"genai.requests": 5})]
            for rows, metrics in map(figures, cluster.replicas)
        )

    # Within the ingestion delay (the bus writes every 0.25 s); 3 s leaves room for a loaded CI machine.
    wait_for(both_see_five, 3.0, "both replicas count 5 requests for dave")
    (rows_a, metrics_a), (rows_b, metrics_b) = figures(cluster.a), figures(cluster.b)
    assert rows_a == rows_b
    assert metrics_a == metrics_b
    assert metrics_a["total_cost"] == pytest.approx(5 * ACTUAL_NANOS / 1e9)


def test_an_alert_fires_once_across_replicas(cluster_factory: Callable[..., Cluster]) -> None:
    """Both replicas cross the same alert threshold under concurrent traffic: one notification in all
    (the fired state lives with the shared counters), not one per replica."""
    hooks = Receiver(fail=0)
    with serve_in_thread(Starlette(routes=[Route("/hook", hooks.hook, methods=["POST"])])) as hook_server:
        cluster = cluster_factory(extra=f'[notifiers.ops]\nurl = "{hook_server.url}/hook"\n')
        response = cluster.a.admin(
            "POST",
            "/v2/budgets",
            json={
                "scope": {"identity": {"identity_external_id": "hal"}},
                "limits": {"period": "BUDGET_PERIOD_DAILY", "amount": 0.1},
                "alerts": [{"threshold_percent": 50, "notifier_ids": ["ops"]}],
            },
        )
        assert response.status_code == 200, response.text
        time.sleep(0.5)
        replicas = [cluster.a, cluster.b]
        with ThreadPoolExecutor(8) as pool:  # 8 x 22M nano-USD: 50% of 100M is crossed half way
            statuses = list(pool.map(lambda i: chat(replicas[i % 2], identity="hal"), range(8)))
        assert statuses.count(200) >= 3
        wait_for(lambda: bool(hooks.received), 5, "a notification")
        time.sleep(0.5)  # room for a (wrong) second one from the other replica
        assert len(hooks.received) == 1, hooks.received
        assert hooks.received[0]["threshold_percent"] == 50


def test_sigkill_of_a_leaves_b_serving_and_gives_a_s_reservations_back(
    cluster_factory: Callable[..., Cluster], redis_url: str
) -> None:
    cluster = cluster_factory(extra="[budgets]\nreservation_ttl = 2\n")
    budget_id = identity_budget(cluster.a, "erin", 1000.0)
    time.sleep(0.5)
    stop = threading.Event()
    b_statuses: list[int] = []

    def drive_b() -> None:
        while not stop.is_set():
            b_statuses.append(chat(cluster.b, identity="erin"))

    driver = threading.Thread(target=drive_b)
    driver.start()
    try:
        # Requests in flight on A (slow upstream) when it dies: their reservations stay open in Redis.
        with ThreadPoolExecutor(20) as pool:
            for _ in range(20):
                pool.submit(chat, cluster.a, identity="erin", latency_ms=3000)
            time.sleep(1.0)
            key = f"{cluster.prefix}{{ws}}:{budget_id}:h"
            client = redis.Redis.from_url(redis_url)
            assert int(client.hget(key, "rn") or 0) >= 20 * EST_NANOS  # A's 20 open reservations
            acknowledged_before_kill = cluster.events("identity = 'erin'")[0]
            cluster.a.kill()
        time.sleep(2.5)  # past the reservation TTL
    finally:
        stop.set()
        driver.join()
    assert b_statuses and set(b_statuses) == {200}, b_statuses  # B never noticed
    # The next request on the budget sweeps A's expired reservations; only B's settled spend remains.
    assert chat(cluster.b, identity="erin") == 200
    assert int(client.hget(key, "rn") or 0) == 0
    client.close()
    # What had reached the database before the kill is still there, and B's traffic after it too.
    assert cluster.events("identity = 'erin'")[0] >= acknowledged_before_kill
    wait_for(
        lambda: cluster.events("identity = 'erin' AND http_status = 200")[0] >= len(b_statuses),
        3,
        "B's events stored",
    )


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_serve_workers_2_shares_one_port(cluster_factory: Callable[..., Cluster]) -> None:
    """`--workers 2`: a supervisor and two worker processes accepting on one port; both serve, and what
    one writes the other reads."""
    cluster = cluster_factory(n=1, workers=2)
    (replica,) = cluster.replicas
    assert replica.proc is not None
    workers = _children(replica.proc.pid)
    assert len(workers) == 2, workers
    before = {pid: _cpu_ticks(pid) for pid in workers}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: chat(replica, identity="fay"), range(200)))
    assert statuses == [200] * 200
    busy = [pid for pid in workers if _cpu_ticks(pid) - before[pid] >= 5]  # >= 50 ms of CPU each
    assert busy == workers, {pid: _cpu_ticks(pid) - before[pid] for pid in workers}
    wait_for(
        lambda: cluster.events("identity = 'fay'")[0] == 200,
        10,
        f"200 events from the workers: {cluster.events()}",
    )
    record = replica.admin("GET", "/v2/identities/fay", params={"include_metrics": "true"}).json()
    assert record["identity"]["metrics"]["total_requests"] == 200


def test_a_worker_that_dies_is_replaced(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(n=1, workers=2)
    (replica,) = cluster.replicas
    assert replica.proc is not None
    first, _ = _children(replica.proc.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(set(_children(replica.proc.pid)) - {first}) == 2, 10, "a new worker")  # type: ignore[union-attr]
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: chat(replica), range(40))) == {200}


def test_a_postgresql_restart_mid_traffic_is_survived_without_restarting_a_replica(
    cluster_factory: Callable[..., Cluster], own_postgres: OwnPostgres
) -> None:
    """PostgreSQL (a server of the test's own) stops for a few seconds under traffic on both replicas:
    requests are served or refused with 503 (never another error), the management API answers 503 in
    orq's shape within a bounded time, and once the server is back everything works again and every
    request is one stored event."""
    with fresh_database(own_postgres.admin_url) as database:
        cluster = cluster_factory(database=database)
        identity_budget(cluster.a, "gus", 1000.0)
        time.sleep(0.5)
        stop = threading.Event()
        statuses: list[int] = []

        def drive(replica: Replica) -> None:
            while not stop.is_set():
                statuses.append(chat(replica, identity="gus"))
                time.sleep(0.01)

        drivers = [threading.Thread(target=drive, args=(r,)) for r in cluster.replicas]
        for driver in drivers:
            driver.start()
        try:
            time.sleep(0.5)
            own_postgres.stop()
            t0 = time.monotonic()
            response = cluster.b.admin("GET", "/v2/identities")
            assert time.monotonic() - t0 < 8
            assert response.status_code == 503, response.text
            assert set(response.json()) == {"message", "code"} and "PostgreSQL" in response.json()["message"]
            time.sleep(3)
            own_postgres.start()
            wait_for(
                lambda: cluster.b.admin("GET", "/v2/identities").status_code == 200, 10, "management back"
            )

            # The gate confirms its budget index on its next poll, then serves again by itself.
            def probe(replica: Replica) -> bool:
                statuses.append(chat(replica, identity="gus"))  # (an event like any other request)
                return statuses[-1] == 200

            for replica in cluster.replicas:
                wait_for(lambda r=replica: probe(r), 10, "the gate serves again")
            served_after = len(statuses) + 2  # (a request of each driver may have been on its way)
            time.sleep(1.5)
        finally:
            stop.set()
            for driver in drivers:
                driver.join()
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        assert set(statuses[served_after:]) == {200}
        # Every request, served or refused, is one event once the buses have written what they held.
        sent = len(statuses)
        wait_for(
            lambda: cluster.events()[0] == sent,
            15,
            f"{sent} events stored, not {cluster.events()}; sent {sorted(collections.Counter(statuses).items())}, stored {by_status(cluster.database)}",
        )
        rows, distinct, _ = cluster.events()
        assert rows == distinct == sent
        with cluster.a.orq() as orq:
            assert orq.identities.retrieve(id="gus").identity.external_id == "gus"
        for replica in cluster.replicas:  # before the database is dropped under them
            replica.stop()
