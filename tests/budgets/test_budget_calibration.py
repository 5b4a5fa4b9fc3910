"""Calibrated reservations: the gate learns, per (provider, model, product), how the upstream counts input
tokens against the ~4-bytes estimate, and reserves a high quantile of the recent ratios.

The property (issue 17), through a real proxy: after at most 5 settled requests on a model, 150 concurrent
requests against a budget that fits about 10 spend at most the limit plus one request's actual cost, with
an upstream that counts twice (or four times) the bytes/4 rule, and with CJK prompts; and a model whose
estimates were too high converges down, so a budget near its limit is not starved.

`openai/test-model` costs 1,000 nano-USD per input token and 2,000 per output token.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest

from orq_proxy.app import OrqProxy
from orq_proxy.budgets.calibration import DEFAULT_SEED, Calibration
from orq_proxy.sinks.memory import MemorySink
from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.testing.servers import ServerThread
from orq_proxy.usage.estimate import estimate_input_tokens
from tests.waiting import wait_for

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ADMIN, USER = "sk-admin", "sk-user"
KEYS = [
    {"key": ADMIN, "workspace": "ws", "admin": True, "id": "admin"},
    {"key": USER, "workspace": "ws", "id": "user_key", "project": "proj"},
]
PRICES = {"openai/test-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
IN_NANOS, OUT_NANOS = 1_000, 2_000
KEY = ("openai", "test-model", "chat.completions")
MAX_TOKENS = 8  # the fake answers 8 words: the output never exceeds its reservation here


# --- the calibration itself ------------------------------------------------------------------------------


def test_never_seen_key_reserves_with_the_seed() -> None:
    """A model never seen reserves twice the estimate (the safe seed), rounded up."""
    calibration = Calibration()
    assert calibration.multiplier(KEY) == DEFAULT_SEED == 2.0
    assert calibration.reserve(KEY, 101) == 202 and calibration.reserve(KEY, 0) == 0


def test_a_model_counting_more_than_the_seed_is_covered_from_its_first_request() -> None:
    """Until `min_samples` ratios are in, the multiplier is the larger of the seed and what was seen."""
    calibration = Calibration()
    calibration.observe(KEY, estimated=100, actual=390)
    assert calibration.multiplier(KEY) == 3.9 and calibration.reserve(KEY, 100) == 390
    calibration.observe(KEY, estimated=100, actual=120)
    assert calibration.multiplier(KEY) == 3.9


def test_estimates_too_high_converge_down_to_the_floor() -> None:
    """After `min_samples` ratios the seed no longer holds it up: the multiplier follows the ratios down,
    never below the floor."""
    calibration = Calibration(min_samples=3, floor=0.25)
    for _ in range(2):
        calibration.observe(KEY, estimated=100, actual=50)
    assert calibration.multiplier(KEY) == DEFAULT_SEED
    calibration.observe(KEY, estimated=100, actual=50)
    assert calibration.multiplier(KEY) == 0.5
    for _ in range(32):  # a window's worth
        calibration.observe(KEY, estimated=100, actual=10)
    assert calibration.multiplier(KEY) == 0.25  # the ratios say 0.1; the floor holds


def test_an_upstream_that_starts_counting_more_is_covered_within_5_requests() -> None:
    """A full ring of ratios at 1.0, then the upstream counts double: covered after at most 5 requests,
    by a high quantile rather than the mean (which would still be ~1.1)."""
    calibration = Calibration(window=32, quantile=0.9)
    for _ in range(32):
        calibration.observe(KEY, estimated=100, actual=100)
    assert calibration.multiplier(KEY) == 1.0
    seen = []
    for _ in range(5):
        calibration.observe(KEY, estimated=100, actual=200)
        seen.append(calibration.multiplier(KEY))
    assert seen[-1] == 2.0 and seen.index(2.0) <= 4


def test_memory_is_bounded() -> None:
    """At most `window` ratios per key and `max_keys` keys (the least recently observed goes first)."""
    calibration = Calibration(window=4, max_keys=3, min_samples=1)
    for i in range(10):
        calibration.observe(KEY, estimated=100, actual=100 + i)
    assert calibration.multiplier(KEY) == 1.09  # only the last 4 (1.06 ... 1.09) are kept
    for model in ("a", "b", "c"):
        calibration.observe(("openai", model, "chat.completions"), 100, 300)
    assert len(calibration) == 3 and calibration.multiplier(KEY) == DEFAULT_SEED  # KEY was dropped
    calibration.observe(("openai", "a", "chat.completions"), 100, 300)  # "a" is now the most recent
    calibration.observe(("openai", "d", "chat.completions"), 100, 300)
    assert calibration.multiplier(("openai", "b", "chat.completions")) == DEFAULT_SEED
    assert calibration.multiplier(("openai", "a", "chat.completions")) == 3.0


def test_requests_without_a_budget_are_sampled_once_the_window_is_full() -> None:
    """`wants_sample`: every request until the key's window is full, then one in `sample_every`."""
    calibration = Calibration(window=4, sample_every=3)
    wanted = []
    for _ in range(4):
        wanted.append(calibration.wants_sample(KEY))
        calibration.observe(KEY, 100, 100)
    wanted += [calibration.wants_sample(KEY) for _ in range(6)]
    assert wanted == [True] * 4 + [False, False, True, False, False, True]


def test_unusable_observations_are_ignored_and_bad_settings_refused() -> None:
    """No estimate or no usage teaches nothing; impossible settings are a ValueError."""
    calibration = Calibration()
    calibration.observe(KEY, estimated=0, actual=10)
    calibration.observe(KEY, estimated=10, actual=0)
    assert len(calibration) == 0
    for bad in (
        {"window": 0},
        {"quantile": 0.0},
        {"floor": 3.0},
        {"max_keys": 0},
        {"min_samples": 0},
        {"sample_every": 0},
    ):
        with pytest.raises(ValueError):
            Calibration(**bad)


# --- through a running proxy -----------------------------------------------------------------------------


class Proxy:
    def __init__(self, app: OrqProxy, server: ServerThread, sink: MemorySink) -> None:
        self.app, self.server, self.sink = app, server, sink
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key=USER, max_retries=0, timeout=10)

    def budget(self, amount_nanos: int) -> str:
        response = httpx.post(
            self.server.url + "/v2/budgets",
            json={"scope": {"workspace": {}}, "limits": {"amount": amount_nanos / 1e9}},
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        budget_id: str = response.json()["budget"]["budgetId"]
        return budget_id

    def chat(self, messages: list[dict[str, str]], headers: dict[str, str]) -> Any:
        return self.client.chat.completions.create(
            model="test-model",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            extra_headers=headers,
        )

    def burst(self, n: int, messages: list[dict[str, str]], headers: dict[str, str]) -> list[int]:
        async def run() -> list[int]:
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
            body = {"model": "test-model", "messages": messages, "max_tokens": MAX_TOKENS}
            all_headers = {"authorization": f"Bearer {USER}", "x-fake-latency-ms": "50", **headers}
            async with httpx.AsyncClient(base_url=self.server.url, timeout=30, limits=limits) as client:
                responses = await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=body, headers=all_headers) for _ in range(n))
                )
            return [r.status_code for r in responses]

        return asyncio.run(run())

    def metrics(self) -> str:
        response = httpx.get(
            self.server.url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10
        )
        return response.text


@pytest.fixture
def proxy(proxy_factory: Any, fake: FakeUpstream) -> Iterator[Proxy]:
    sink = MemorySink()
    app, server = proxy_factory({"api_keys": KEYS, "prices": PRICES}, clock=FakeClock(START), sinks=[sink])
    proxy = Proxy(app, server, sink)
    yield proxy
    proxy.client.close()


ENGLISH = [{"role": "user", "content": "hello world " * 40}]  # 480 bytes: 124 tokens estimated
CJK = [{"role": "user", "content": "预算不能被绕过" * 30}]  # 210 characters, 630 bytes: 162 estimated


@pytest.mark.parametrize(
    ("rule", "messages"),
    [
        pytest.param("bytes/2", ENGLISH, id="twice-the-bytes-rule"),
        pytest.param("chars", CJK, id="cjk"),
        pytest.param("bytes/1", ENGLISH, id="four-times-the-bytes-rule"),
    ],
)
def test_150_concurrent_stay_within_limit_plus_one_request(
    proxy: Proxy, fake: FakeUpstream, rule: str, messages: list[dict[str, str]]
) -> None:
    """5 settled requests, then 150 at once against a budget fitting ~10: spend <= limit + one request."""
    headers = {"x-fake-prompt-tokens": rule}
    for _ in range(5):  # no budget applies yet: the gate learns from these all the same
        answer = proxy.chat(messages, headers)
    assert answer.usage is not None
    actual_nanos = answer.usage.prompt_tokens * IN_NANOS + answer.usage.completion_tokens * OUT_NANOS
    plain_nanos = estimate_input_tokens({"messages": messages}) * IN_NANOS + MAX_TOKENS * OUT_NANOS
    assert actual_nanos > 1.2 * plain_nanos  # the plain estimate is well short: without calibration the
    # 150 would overshoot by (actual - estimate) for each of the ~10 * actual / plain admitted
    limit = 10 * actual_nanos
    proxy.budget(limit)
    statuses = proxy.burst(150, messages, headers)
    wait_for(lambda: len(proxy.sink.events) == 5 + 150, 10)
    served = [e for e in proxy.sink.events[5:] if e.http_status == 200]
    assert len(served) == statuses.count(200) and set(statuses) == {200, 429}
    charged = sum(e.total_cost_nanos for e in served)
    assert charged <= limit + actual_nanos
    assert len(served) >= 9  # and the budget is used, not starved by over-reservation


def test_estimates_too_high_converge_down_and_do_not_starve_the_budget(
    proxy: Proxy, fake: FakeUpstream
) -> None:
    """Long words: 109 tokens estimated, 24 counted. After 5 requests the reservation follows the count
    down, so a budget that fits 10 actual requests admits about 10 (the plain estimate would admit 3)."""
    messages = [{"role": "user", "content": " ".join(["internationalization"] * 20)}]
    headers = {"x-fake-prompt-tokens": "words"}
    for _ in range(5):
        answer = proxy.chat(messages, headers)
    assert answer.usage is not None and answer.usage.prompt_tokens == 24
    actual_nanos = 24 * IN_NANOS + 8 * OUT_NANOS
    plain_nanos = estimate_input_tokens({"messages": messages}) * IN_NANOS + MAX_TOKENS * OUT_NANOS
    limit = 10 * actual_nanos
    assert limit // plain_nanos == 3
    assert proxy.app.budget_gate.calibration is not None
    assert proxy.app.budget_gate.calibration.multiplier(KEY) < 1.0
    proxy.budget(limit)
    statuses = proxy.burst(40, messages, headers)
    wait_for(lambda: len(proxy.sink.events) == 5 + 40, 10)
    served = [e for e in proxy.sink.events[5:] if e.http_status == 200]
    assert len(served) >= 9
    assert sum(e.total_cost_nanos for e in served) <= limit + actual_nanos
    assert statuses.count(200) == len(served)


def test_only_reported_usage_teaches(proxy: Proxy, fake: FakeUpstream) -> None:
    """An answer without usage (estimated by metering) or an error answer leaves the calibration alone."""
    messages = [{"role": "user", "content": "hello world " * 40}]
    proxy.chat(messages, {"x-fake-omit-usage": "1", "x-fake-prompt-tokens": "bytes/1"})
    with pytest.raises(openai.InternalServerError):
        proxy.chat(messages, {"x-fake-status": "500"})
    wait_for(lambda: len(proxy.sink.events) == 2)
    calibration = proxy.app.budget_gate.calibration
    assert calibration is not None and len(calibration) == 0
    proxy.chat(messages, {"x-fake-prompt-tokens": "bytes/1"})
    wait_for(lambda: len(calibration) == 1)
    assert calibration.multiplier(KEY) == 484 / 124


def test_metrics_histogram_of_actual_over_estimated(proxy: Proxy, fake: FakeUpstream) -> None:
    """/metrics has a histogram of actual / estimated input tokens per provider/model."""
    messages = [{"role": "user", "content": "hello world " * 40}]  # 124 estimated
    for rule in ("bytes/4", "bytes/2", "bytes/2"):  # 124 / 124 = 1.0, 244 / 124 = 1.97
        proxy.chat(messages, {"x-fake-prompt-tokens": rule})
    wait_for(lambda: len(proxy.sink.events) == 3)
    lines = proxy.metrics().splitlines()
    name = "orq_proxy_input_tokens_actual_over_estimate"
    labels = 'provider="openai",model="test-model"'
    assert f"# TYPE {name} histogram" in lines
    assert f'{name}_bucket{{{labels},le="0.9"}} 0' in lines
    assert f'{name}_bucket{{{labels},le="1"}} 1' in lines
    assert f'{name}_bucket{{{labels},le="1.5"}} 1' in lines
    assert f'{name}_bucket{{{labels},le="2"}} 3' in lines
    assert f'{name}_bucket{{{labels},le="+Inf"}} 3' in lines
    assert f"{name}_count{{{labels}}} 3" in lines
    (total,) = [float(line.split()[-1]) for line in lines if line.startswith(f"{name}_sum{{{labels}}}")]
    assert math.isclose(total, 1.0 + 2 * 244 / 124)
