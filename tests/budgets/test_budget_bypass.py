"""No request the budget gate prices at zero: each way round a $0.001 budget, through a real proxy.

The `openai` SDK or httpx -> proxy (build_app, uvicorn on a socket) -> fake upstream. `openai/test-model`
costs 1,000 nano-USD per input token and 2,000 per output token, so a $0.001 budget (1,000,000 nano-USD)
fits about ten of the requests below; each case sends 20 at once and checks what was charged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
import redis
from pydantic import ValidationError
from ulid import ULID

from orq_proxy.app import OrqProxy
from orq_proxy.budgets.redis_counters import redis_counters_from_url
from orq_proxy.config import ProxyConfig
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.testing.servers import ServerThread
from tests.waiting import wait_for

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ADMIN = "sk-admin"
USER = "sk-user"
KEYS = [
    {"key": ADMIN, "workspace": "ws", "admin": True, "id": "admin"},
    {"key": USER, "workspace": "ws", "id": "user_key", "project": "proj"},
]
PRICES = {
    "openai/test-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
    "openai/free-model": {"input_per_mtok": 0.0, "output_per_mtok": 0.0},
}
IN_NANOS, OUT_NANOS = 1_000, 2_000
LIMIT_NANOS = 1_000_000  # $0.001
MESSAGES = [{"role": "user", "content": "hello there"}]  # 7 tokens estimated, 6 counted by the fake
CONCURRENT = 20


class Proxy:
    """A proxy with budgets, its memory sink, and helpers."""

    def __init__(self, app: OrqProxy, server: ServerThread, sink: MemorySink) -> None:
        self.app, self.server, self.sink = app, server, sink
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=10)

    def budget(self, limits: dict[str, Any]) -> str:
        response = httpx.post(
            self.server.url + "/v2/budgets",
            json={"scope": {"workspace": {}}, "limits": limits},
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        budget_id: str = response.json()["budget"]["budgetId"]
        return budget_id

    def usage(self, budget_id: str) -> dict[str, Any]:
        response = httpx.get(
            f"{self.server.url}/v2/budgets/{budget_id}",
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        usage: dict[str, Any] = response.json()["budget"]["usage"]
        return usage

    def events(self, n: int) -> list[Any]:
        """The sink's events once it holds `n` (each request, refused or not, is one)."""
        wait_for(lambda: len(self.sink.events) >= n)
        return list(self.sink.events)

    def metrics(self) -> str:
        response = httpx.get(
            self.server.url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10
        )
        assert response.status_code == 200
        return response.text

    def burst(
        self,
        n: int,
        *,
        path: str = "/v1/chat/completions",
        body: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> list[httpx.Response]:
        """`n` concurrent requests (latency 50 ms upstream, so all of them are in flight at once)."""

        async def run() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
            all_headers = {"authorization": f"Bearer {USER}", "x-fake-latency-ms": "50", **(headers or {})}
            async with httpx.AsyncClient(base_url=self.server.url, timeout=30, limits=limits) as client:
                return await asyncio.gather(
                    *(client.post(path, json=body, content=content, headers=all_headers) for _ in range(n))
                )

        return asyncio.run(run())


@pytest.fixture
def proxy(proxy_factory: Any, fake: FakeUpstream) -> Iterator[Proxy]:
    sink = MemorySink()
    app, server = proxy_factory({"api_keys": KEYS, "prices": PRICES}, clock=FakeClock(START), sinks=[sink])
    app.budget_gate.calibration = None  # exact reservations here; calibrated ones: test_budget_calibration.py
    proxy = Proxy(app, server, sink)
    yield proxy
    proxy.client.close()


def charged(events: list[Any]) -> int:
    return sum(e.total_cost_nanos for e in events)


# --- an unpriced model name --------------------------------------------------------------------------------


def test_unpriced_alias_is_refused_under_a_cost_budget(proxy: Proxy, fake: FakeUpstream) -> None:
    """An unpriced alias the upstream answers with a priced model: 20 of 20 are refused (400 naming the model
    and the `[prices."provider/model"]` table), nothing reaches the upstream, nothing is charged."""
    budget_id = proxy.budget({"amount": LIMIT_NANOS / 1e9})
    body = {"model": "my-alias", "messages": MESSAGES, "max_tokens": 40}
    responses = proxy.burst(CONCURRENT, body=body, headers={"x-fake-model": "test-model"})
    assert [r.status_code for r in responses] == [400] * CONCURRENT
    error = responses[0].json()["error"]
    assert error["code"] == "unpriced_model" and error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert "'openai/my-alias'" in error["message"] and '[prices."openai/my-alias"]' in error["message"]
    assert error["rejection"]["budget_id"] == budget_id and error["rejection"]["dimension"] == "cost"
    assert fake.requests == []
    events = proxy.events(CONCURRENT)  # refusals are usage events too (status ERROR, 400, no cost)
    assert [(e.status, e.http_status, e.total_cost_nanos) for e in events] == [("ERROR", 400, 0)] * CONCURRENT
    assert proxy.usage(budget_id)["amount"] == 0
    with pytest.raises(openai.BadRequestError, match="no known price"):  # what an SDK user sees
        proxy.client.chat.completions.create(model="my-alias", messages=MESSAGES)  # type: ignore[arg-type]


def test_request_without_a_model_is_refused_under_a_cost_budget(proxy: Proxy, fake: FakeUpstream) -> None:
    """A chat request naming no model (an upstream may answer it with its default model) is unpriced too;
    a model list (no model, nothing metering prices) still passes."""
    proxy.budget({"amount": LIMIT_NANOS / 1e9})
    response = proxy.burst(1, body={"messages": MESSAGES})[0]
    assert response.status_code == 400 and response.json()["error"]["code"] == "unpriced_model"
    assert "names no model" in response.json()["error"]["message"]
    assert [m.id for m in proxy.client.models.list()]
    assert [r.path for r in fake.requests] == ["/v1/models"]


def test_unpriced_model_passes_budgets_without_an_amount(proxy: Proxy, fake: FakeUpstream) -> None:
    """Only a cost budget cannot reserve an unpriced model: a token budget still counts its tokens."""
    budget_id = proxy.budget({"token_limit": 10_000})
    answer = proxy.client.chat.completions.create(model="my-alias", messages=MESSAGES, max_tokens=10)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.total_tokens == 14
    wait_for(lambda: proxy.usage(budget_id)["tokens"] == 14)


def test_unpriced_allow_keeps_todays_behaviour_logged_and_counted(
    proxy_factory: Any, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """`[budgets] unpriced = "allow"`: the 20 pass as before (reserved at zero cost), each event says so,
    /metrics counts them, and the log says it once (rate-limited), not 20 times."""
    sink = MemorySink()
    config = {"api_keys": KEYS, "prices": PRICES, "budgets": {"unpriced": "allow"}}
    app, server = proxy_factory(config, clock=FakeClock(START), sinks=[sink])
    assert app.budget_gate.unpriced == "allow"
    app.budget_gate.calibration = None
    proxy = Proxy(app, server, sink)
    proxy.budget({"amount": LIMIT_NANOS / 1e9})
    body = {"model": "my-alias", "messages": MESSAGES, "max_tokens": 40}
    with caplog.at_level(logging.WARNING, logger="orq_proxy.budgets.middleware"):
        responses = proxy.burst(CONCURRENT, body=body)
    assert [r.status_code for r in responses] == [200] * CONCURRENT
    events = proxy.events(CONCURRENT)
    assert all(e.metadata.get("unpriced_allowed") == "1" for e in events)
    logged = [r for r in caplog.records if "unpriced model let through" in r.getMessage()]
    assert len(logged) == 1 and "openai/my-alias" in logged[0].getMessage()
    line = 'orq_proxy_budget_unpriced_allowed_total{provider="openai",model="my-alias"} 20'
    assert line in proxy.metrics().splitlines()


def test_unpriced_setting_is_validated() -> None:
    """`[budgets] unpriced` is "refuse" (the default) or "allow"; anything else names the key."""
    assert ProxyConfig().budgets.unpriced == "refuse"
    assert ProxyConfig.model_validate({"budgets": {"unpriced": "allow"}}).budgets.unpriced == "allow"
    with pytest.raises(ValidationError, match=r"budgets\.unpriced"):
        ProxyConfig.model_validate({"budgets": {"unpriced": "free"}})


# --- a body the proxy does not parse ---------------------------------------------------------------------


def test_text_plain_body_with_nan_is_400_and_never_forwarded(proxy: Proxy, fake: FakeUpstream) -> None:
    """`text/plain` holding JSON with `NaN` (which lenient upstream parsers accept): 20 of 20 get a 400
    naming the problem; nothing (no `orq` object, no identity) reaches the upstream, nothing is charged."""
    budget_id = proxy.budget({"amount": LIMIT_NANOS / 1e9})
    raw = (
        b'{"model": "test-model", "messages": [{"role": "user", "content": "hello there"}], '
        b'"temperature": NaN, "orq": {"identity": {"id": "someone-else"}}}'
    )
    responses = proxy.burst(CONCURRENT, content=raw, headers={"content-type": "text/plain"})
    assert [r.status_code for r in responses] == [400] * CONCURRENT
    error = responses[0].json()["error"]
    assert error["code"] == "invalid_json" and "NaN" in error["message"]
    assert fake.requests == []
    assert proxy.usage(budget_id) == {"amount": 0, "tokens": 0, "requests": 0}


@pytest.mark.parametrize(
    ("content", "content_type", "needle"),
    [
        (b"model=test-model&messages=hi", "application/x-www-form-urlencoded", "not valid JSON"),
        (b'[{"model": "test-model"}]', "text/plain", "must be a JSON object, got an array"),
        (b"\xff\xfe{}", "application/octet-stream", "not valid UTF-8"),
        (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            "takes a JSON body",
        ),
        (b"  ", None, "not valid JSON"),
    ],
)
def test_bodies_that_are_not_a_json_object_are_400(
    proxy: Proxy, fake: FakeUpstream, content: bytes, content_type: str | None, needle: str
) -> None:
    """Whatever the content type, a chat body that is not a JSON object is a 400 and is not forwarded
    (multipart too: chat takes JSON)."""
    headers = {"content-type": content_type} if content_type else {}
    response = proxy.burst(1, content=content, headers=headers)[0]
    assert response.status_code == 400, response.text
    assert (
        response.json()["error"]["code"] == "invalid_json" and needle in response.json()["error"]["message"]
    )
    assert fake.requests == []


def test_multipart_uploads_are_still_forwarded(proxy: Proxy, fake: FakeUpstream) -> None:
    """The upload APIs take multipart bodies: forwarded as sent. A file upload (not billed as work) passes a
    cost budget; a transcription (billed, its model a form field the proxy does not read) passes without one."""
    budget_id = proxy.budget({"amount": LIMIT_NANOS / 1e9})
    with pytest.raises(openai.NotFoundError):  # the fake has no files API: its own 404 proves it got there
        proxy.client.files.create(file=("batch.jsonl", b"{}\n"), purpose="batch")
    delete = httpx.delete(
        f"{proxy.server.url}/v2/budgets/{budget_id}", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10
    )
    assert delete.status_code == 200, delete.text
    with pytest.raises(openai.NotFoundError):
        proxy.client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF0000WAVE"))
    assert [r.path for r in fake.requests] == ["/v1/files", "/v1/audio/transcriptions"]
    assert b"RIFF0000WAVE" in fake.requests[1].body and b'name="model"' in fake.requests[1].body
    assert fake.requests[1].headers["content-type"].startswith("multipart/form-data")


# --- billed work the proxy cannot meter ------------------------------------------------------------------

# (path, JSON body or None for a multipart upload, the `param` named): each is billed by the provider for work
# the proxy never sees the usage of, so any of them would spend past a budget at zero charge.
UNMETERED = [
    (
        "/v1/batches",
        {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        None,
    ),
    ("/v1/fine_tuning/jobs", {"model": "test-model", "training_file": "file-1"}, None),
    ("/v1/realtime/client_secrets", {"session": {"type": "realtime", "model": "test-model"}}, None),
    ("/v1/realtime/sessions", {"model": "test-model"}, None),
    ("/v1/audio/speech", {"model": "tts-1", "input": "hello there", "voice": "alloy"}, None),
    ("/v1/audio/transcriptions", None, None),
    ("/v1/images/edits", None, None),
    ("/v1/videos", {"model": "sora-2", "prompt": "a fox"}, None),
    ("/v1/videos/video_1/remix", {"prompt": "a dog"}, None),
    (
        "/v1/batches/",
        {"input_file_id": "file-1", "endpoint": "/v1/responses", "completion_window": "24h"},
        None,
    ),
    ("/v1/responses", {"model": "test-model", "input": "hello there", "background": True}, "background"),
]
UPLOAD = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--\r\n'


def _send_unmetered(proxy: Proxy, path: str, body: dict[str, Any] | None) -> httpx.Response:
    if body is None:
        return proxy.burst(
            1, path=path, content=UPLOAD, headers={"content-type": "multipart/form-data; boundary=b"}
        )[0]
    return proxy.burst(1, path=path, body=body)[0]


@pytest.mark.parametrize(
    "limits", [{"amount": LIMIT_NANOS / 1e9}, {"token_limit": 10_000}], ids=["cost", "tokens"]
)
@pytest.mark.parametrize(
    ("path", "body", "param"), UNMETERED, ids=[u[0] + (" bg" if u[2] else "") for u in UNMETERED]
)
def test_unmetered_work_is_refused_under_a_cost_or_token_budget(
    proxy: Proxy,
    fake: FakeUpstream,
    limits: dict[str, Any],
    path: str,
    body: dict[str, Any] | None,
    param: str | None,
) -> None:
    """A batch, a fine-tuning job, a realtime session (the client then talks to the provider directly),
    speech, an upload-bodied API, a video or a background response, under a cost or a token budget: 400
    `unmetered_api` naming the path (or `background`) and the setting that lets it through; never forwarded,
    one event, nothing charged."""
    budget_id = proxy.budget(limits)
    response = _send_unmetered(proxy, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("unmetered_api", param, "invalid_request_error")
    assert (path if param is None else "background: true") in error["message"]
    assert 'unpriced = "allow"' in error["message"] and "cannot meter" in error["message"]
    dimension = "cost" if "amount" in limits else "tokens"
    assert error["rejection"]["budget_id"] == budget_id and error["rejection"]["dimension"] == dimension
    assert fake.requests == []
    [event] = proxy.events(1)
    assert (event.status, event.http_status, event.total_cost_nanos) == ("ERROR", 400, 0)
    assert proxy.usage(budget_id) == {"amount": 0, "tokens": 0, "requests": 0}


def test_unmetered_work_passes_a_rate_limit_and_no_budget(proxy: Proxy, fake: FakeUpstream) -> None:
    """Only a limit on what it spends refuses it: with no budget, or a requests-per-minute budget alone, a
    batch is forwarded (the fake has no batches API: its 404 proves it got there); a background response
    with no budget is forwarded too, and a retrieval of a batch is never refused."""
    assert _send_unmetered(proxy, "/v1/batches", UNMETERED[0][1]).status_code == 404
    assert _send_unmetered(proxy, "/v1/responses", UNMETERED[-1][1]).status_code == 200
    proxy.budget({"amount": LIMIT_NANOS / 1e9})
    retrieved = httpx.get(
        proxy.server.url + "/v1/batches/batch_1", headers={"authorization": f"Bearer {USER}"}
    )
    assert retrieved.status_code == 404  # the fake's own answer: forwarded, not refused
    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", "/v1/batches"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/batches/batch_1"),
    ]


def test_unmetered_rate_limit_only_budget_forwards(proxy: Proxy, fake: FakeUpstream) -> None:
    """A budget with only a rate limit counts the batch as one request and forwards it."""
    response = httpx.post(
        proxy.server.url + "/v2/budgets",
        json={"scope": {"workspace": {}}, "rate_limit": {"requests_per_minute": 5}},
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    budget_id = response.json()["budget"]["budgetId"]
    assert _send_unmetered(proxy, "/v1/batches", UNMETERED[0][1]).status_code == 404
    assert [r.path for r in fake.requests] == ["/v1/batches"]
    wait_for(lambda: proxy.usage(budget_id)["requests"] == 1)


def test_unmetered_work_with_unpriced_allow_is_forwarded_and_counted(
    proxy_factory: Any, fake: FakeUpstream
) -> None:
    """`[budgets] unpriced = "allow"`: a batch under a cost budget is forwarded at zero cost and said so."""
    sink = MemorySink()
    config = {"api_keys": KEYS, "prices": PRICES, "budgets": {"unpriced": "allow"}}
    app, server = proxy_factory(config, clock=FakeClock(START), sinks=[sink])
    proxy = Proxy(app, server, sink)
    proxy.budget({"amount": LIMIT_NANOS / 1e9})
    assert _send_unmetered(proxy, "/v1/batches", UNMETERED[0][1]).status_code == 404
    assert [r.path for r in fake.requests] == ["/v1/batches"]
    [event] = proxy.events(1)
    assert event.metadata.get("unpriced_allowed") == "1" and event.total_cost_nanos == 0


def test_anthropic_message_batch_is_refused_in_anthropics_shape(
    proxy_factory: Any, fake_server: tuple[FakeUpstream, ServerThread], fake: FakeUpstream
) -> None:
    """Anthropic's Message Batches API through the `anthropic` SDK: refused under a cost budget, in
    Anthropic's error shape, before anything is forwarded."""
    import anthropic

    root = fake_server[1].url
    upstreams = {
        "openai": {"base_url": root + "/v1", "default": True},
        "anthropic": {"base_url": root, "api": "anthropic"},
    }
    sink = MemorySink()
    app, server = proxy_factory({"upstreams": upstreams, "api_keys": KEYS, "prices": PRICES}, sinks=[sink])
    proxy = Proxy(app, server, sink)
    proxy.budget({"amount": LIMIT_NANOS / 1e9})
    client = anthropic.Anthropic(base_url=proxy.server.url, api_key=USER, max_retries=0, timeout=10)
    request = {
        "custom_id": "a",
        "params": {"model": "claude-sonnet-4-5", "max_tokens": 9000, "messages": MESSAGES},
    }
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.batches.create(requests=[request] * 3)  # type: ignore[list-item]
    body: Any = raised.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "POST /v1/messages/batches" in body["error"]["message"]
    assert fake.requests == []
    client.close()


def test_image_generation_without_a_model_is_unpriced(proxy: Proxy, fake: FakeUpstream) -> None:
    """An image request naming no model is billed for the provider's default model: unpriced under a cost
    budget (400 `unpriced_model`), like a chat request without one."""
    proxy.budget({"amount": LIMIT_NANOS / 1e9})
    response = proxy.burst(1, path="/v1/images/generations", body={"prompt": "a fox"})[0]
    assert response.status_code == 400 and response.json()["error"]["code"] == "unpriced_model"
    assert fake.requests == []


# --- what repeats a usage already charged ----------------------------------------------------------------


def test_retrieving_a_response_is_never_charged_again(proxy: Proxy, fake: FakeUpstream) -> None:
    """`GET /v1/responses/{id}` answers the stored Response, usage and all: under a cost budget it is
    forwarded (not refused as naming no model) and charged nothing, so 3 retrievals leave the budget at the
    cost of the one response made."""
    budget_id = proxy.budget({"amount": LIMIT_NANOS / 1e9})
    made = proxy.client.responses.create(model="test-model", input="hello there", max_output_tokens=16)
    assert made.usage is not None
    cost = made.usage.input_tokens * IN_NANOS + made.usage.output_tokens * OUT_NANOS
    for _ in range(3):
        again = proxy.client.responses.retrieve(made.id)
        assert again.usage is not None and again.usage.total_tokens == made.usage.total_tokens
    events = proxy.events(4)
    assert [(e.product, e.total_cost_nanos) for e in events] == [("responses", cost)] + [
        ("responses.stored", 0)
    ] * 3
    assert all(e.input_tokens == 0 and e.status == "OK" for e in events[1:])
    wait_for(lambda: proxy.usage(budget_id)["amount"] * 1e9 == pytest.approx(cost))


def test_what_generates_nothing_reserves_no_output(proxy: Proxy, fake: FakeUpstream) -> None:
    """A model list and a retrieval name no model and generate nothing: under a 100-token budget they pass
    (each reserved the default 4,096 output tokens before, so a small token budget refused them with 429)."""
    made = proxy.client.responses.create(model="test-model", input="hello there", max_output_tokens=16)
    budget_id = proxy.budget({"token_limit": 100})
    assert [m.id for m in proxy.client.models.list()]
    assert proxy.client.responses.retrieve(made.id).id == made.id
    assert proxy.usage(budget_id)["tokens"] == 0


def test_a_compaction_is_charged_as_the_generation_it_is(proxy: Proxy, fake: FakeUpstream) -> None:
    """`POST /v1/responses/compact` (Codex's compaction) runs the model and reports usage: below
    `/responses` but not a retrieval, it is reserved and charged (`responses.compact`); without a model it is
    unpriced under a cost budget. (It takes no output cap: the default one, 4,096 tokens, is reserved.)"""
    budget_id = proxy.budget({"amount": 1.0})
    compacted = proxy.client.responses.compact(model="test-model", input="hello there, please compact this")
    assert compacted.object == "response.compaction" and compacted.output[-1].type == "compaction"
    cost = compacted.usage.input_tokens * IN_NANOS + compacted.usage.output_tokens * OUT_NANOS
    [event] = proxy.events(1)
    assert (event.product, event.total_cost_nanos, event.usage_source) == ("responses.compact", cost, "exact")
    wait_for(lambda: proxy.usage(budget_id)["amount"] * 1e9 == pytest.approx(cost))
    response = proxy.burst(1, path="/v1/responses/compact", body={"input": "no model named"})[0]
    assert response.status_code == 400 and response.json()["error"]["code"] == "unpriced_model"


def test_a_trailing_slash_is_the_same_api(proxy: Proxy, fake: FakeUpstream) -> None:
    """`/v1/chat/completions/` is chat completions: its output cap is written into the body forwarded, as
    for the path without the slash (the fake answers 404 for that path; the proxy still capped it)."""
    proxy.budget({"amount": 1.0})  # room for the default cap of 4,096 output tokens
    body = {"model": "test-model", "messages": MESSAGES}
    proxy.burst(1, path="/v1/chat/completions/", body=body)
    [sent] = fake.requests
    assert sent.path == "/v1/chat/completions/" and sent.json["max_completion_tokens"] == 4096
    assert proxy.events(1)[0].product == "chat.completions"


# --- n and best_of ---------------------------------------------------------------------------------------


def test_n_multiplies_the_reserved_output(proxy: Proxy, fake: FakeUpstream) -> None:
    """`"n": 8` is billed for 8 outputs, so it reserves 8 output caps: 20 concurrent stay within the limit."""
    budget_id = proxy.budget({"amount": LIMIT_NANOS / 1e9})
    body = {"model": "test-model", "messages": MESSAGES, "max_tokens": 10, "n": 8}
    responses = proxy.burst(CONCURRENT, body=body)
    statuses = [r.status_code for r in responses]
    served = [r.json() for r in responses if r.status_code == 200]
    assert served and all(len(a["choices"]) == 8 and a["usage"]["completion_tokens"] == 64 for a in served)
    assert set(statuses) == {200, 429}
    events = proxy.events(CONCURRENT)
    assert charged(events) == len(served) * (6 * IN_NANOS + 64 * OUT_NANOS)
    assert charged(events) <= LIMIT_NANOS
    rejection = next(r for r in responses if r.status_code == 429).json()["error"]["rejection"]
    assert rejection["requested"] * 1e9 == pytest.approx(7 * IN_NANOS + 8 * 10 * OUT_NANOS)
    wait_for(lambda: proxy.usage(budget_id)["amount"] * 1e9 == pytest.approx(charged(events)))


def test_best_of_multiplies_the_reserved_output(proxy: Proxy, fake: FakeUpstream) -> None:
    """Legacy completions bill `best_of` generated candidates (n <= best_of returned): reserved likewise."""
    proxy.budget({"amount": LIMIT_NANOS / 1e9})
    body = {"model": "test-model", "prompt": "hello there", "max_tokens": 10, "n": 2, "best_of": 6}
    responses = proxy.burst(CONCURRENT, path="/v1/completions", body=body)
    served = [r.json() for r in responses if r.status_code == 200]
    assert served and all(len(a["choices"]) == 2 and a["usage"]["completion_tokens"] == 48 for a in served)
    assert {r.status_code for r in responses} == {200, 429}
    assert charged(proxy.events(CONCURRENT)) <= LIMIT_NANOS
    rejection = next(r for r in responses if r.status_code == 429).json()["error"]["rejection"]
    assert rejection["requested"] * 1e9 == pytest.approx(3 * IN_NANOS + 6 * 10 * OUT_NANOS)


def test_a_list_of_prompts_multiplies_the_reserved_output(proxy: Proxy, fake: FakeUpstream) -> None:
    """Legacy completions complete every prompt of a `prompt` list (each up to `max_tokens`, `n` times): 8
    prompts reserve 8 output caps, so 20 concurrent stay within the limit (reserved as one, they spent 8x)."""
    budget_id = proxy.budget({"amount": LIMIT_NANOS / 1e9})
    body = {"model": "test-model", "prompt": ["hello there"] * 8, "max_tokens": 10}
    responses = proxy.burst(CONCURRENT, path="/v1/completions", body=body)
    served = [r.json() for r in responses if r.status_code == 200]
    assert served and all(len(a["choices"]) == 8 and a["usage"]["completion_tokens"] == 64 for a in served)
    assert {r.status_code for r in responses} == {200, 429}
    events = proxy.events(CONCURRENT)
    assert charged(events) == len(served) * (16 * IN_NANOS + 64 * OUT_NANOS) <= LIMIT_NANOS
    rejection = next(r for r in responses if r.status_code == 429).json()["error"]["rejection"]
    assert rejection["requested"] * 1e9 == pytest.approx(22 * IN_NANOS + 8 * 10 * OUT_NANOS)  # 88 bytes in
    wait_for(lambda: proxy.usage(budget_id)["amount"] * 1e9 == pytest.approx(charged(events)))
    tokenized = {"model": "test-model", "prompt": [15339, 1070], "max_tokens": 10}  # one prompt, as token ids
    answer = proxy.burst(1, path="/v1/completions", body=tokenized)[0]
    assert answer.status_code in (200, 429) and len(answer.json().get("choices", [None])) == 1


# --- a zero reservation ----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def any_proxy(request: pytest.FixtureRequest, proxy_factory: Any, fake: FakeUpstream) -> Iterator[Proxy]:
    """The proxy with each counters backend (Redis under a fresh key prefix, deleted afterwards)."""
    sink = MemorySink()
    extra: dict[str, Any] = {}
    prefix = f"test-orq:{ULID()}:"
    if request.param == "redis":
        extra["budget_counters"] = redis_counters_from_url(
            request.getfixturevalue("redis_url"), prefix=prefix
        )
    app, server = proxy_factory(
        {"api_keys": KEYS, "prices": PRICES}, clock=FakeClock(START), sinks=[sink], **extra
    )
    app.budget_gate.calibration = None  # exact reservations here; calibrated ones: test_budget_calibration.py
    proxy = Proxy(app, server, sink)
    yield proxy
    proxy.client.close()
    if request.param == "redis":
        assert server.loop is not None
        asyncio.run_coroutine_threadsafe(extra["budget_counters"].aclose(), server.loop).result(10)
        sync = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        keys = list(sync.scan_iter(match=prefix + "*", count=1000))
        if keys:
            sync.delete(*keys)
        sync.close()


def test_zero_reservation_never_passes_a_spent_budget(any_proxy: Proxy, fake: FakeUpstream) -> None:
    """Once spend reaches the limit exactly, requests estimated at zero cost (a model priced at 0) are
    refused: 20 of 20, with either counters backend (`spent + 0 <= limit` alone would admit them all)."""
    proxy = any_proxy
    budget_id = proxy.budget({"amount": LIMIT_NANOS / 1e9})
    # 996 one-byte characters, counted by this upstream as 1,000 tokens (one per byte, + 4 for the message)
    # and no output: it spends exactly the limit (estimated at 253 input tokens + 8 output, it fits).
    long = [{"role": "user", "content": "a" * 996}]
    answer = proxy.client.chat.completions.create(
        model="test-model",
        messages=long,  # type: ignore[arg-type]
        max_tokens=8,
        extra_headers={"x-fake-prompt-tokens": "bytes/1", "x-fake-words": "0"},
    )
    assert answer.usage is not None and answer.usage.total_tokens == 1000
    wait_for(lambda: proxy.usage(budget_id)["amount"] * 1e9 == pytest.approx(LIMIT_NANOS))
    body = {"model": "free-model", "messages": MESSAGES, "max_tokens": 10}
    responses = proxy.burst(CONCURRENT, body=body)
    assert [r.status_code for r in responses] == [429] * CONCURRENT
    rejection = responses[0].json()["error"]["rejection"]
    assert rejection["requested"] == 0 and rejection["remaining"] == 0
    assert len(fake.requests) == 1  # only the request that spent the budget
    events = proxy.events(1 + CONCURRENT)
    assert [e.http_status for e in events[1:]] == [429] * CONCURRENT


def test_body_parse_error_names_the_field_json(proxy: Proxy) -> None:
    """A JSON body's parse error still names the field (the 400 says what to fix)."""
    raw = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": "\ud800"}]})
    response = proxy.burst(1, content=raw.encode(), headers={"content-type": "application/json"})[0]
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].content"
