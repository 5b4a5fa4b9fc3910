"""Pricer: costs equal genai-prices' to the nano-USD; the integer fast path equals the Decimal path; an
upstream's name is not taken for a genai-prices provider unless it is one (or `prices_as` says which)."""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from orq_proxy.usage import pricing
from orq_proxy.usage.money import usd_to_nanos
from orq_proxy.usage.pricing import Cost, Pricer, TokenUsage, _atto_to_nanos

MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1-nano",
    "o3-mini",
    "text-embedding-3-small",
    "gpt-3.5-turbo-instruct",
]


def usages(seed: int, n: int = 40) -> list[TokenUsage]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        inp, outp = rng.randrange(0, 200_000), rng.randrange(0, 50_000)
        out.append(TokenUsage(inp, outp, rng.randrange(0, inp + 1), rng.randrange(0, outp + 1)))
    return out


@pytest.mark.parametrize("model", MODELS)
def test_cost_matches_genai_prices(model: str) -> None:
    """Input, output and total nano-USD equal genai-prices' own calculation for random usages."""
    pricer = Pricer()
    for usage in usages(sum(map(ord, model))):
        cost = pricer.cost("openai", model, usage)
        ref = calc_price(
            Usage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cached_input_tokens or None,
            ),
            model,
            provider_id="openai",
        )
        assert cost.source == "genai-prices"
        assert (cost.input_nanos, cost.output_nanos) == (
            usd_to_nanos(ref.input_price),
            usd_to_nanos(ref.output_price),
        )
        assert abs(cost.total_nanos - usd_to_nanos(ref.total_price)) <= 1  # two roundings vs one


@pytest.mark.parametrize("model", MODELS)
def test_integer_path_equals_decimal_path(model: str) -> None:
    """Every field of the fast integer path equals the Decimal computation."""
    pricer = Pricer()
    rates = pricer._rates("openai", model)
    assert rates is not None and rates.atto is not None
    slow = Pricer()
    slow._cache[("openai", model)] = dataclasses.replace(rates)
    object.__setattr__(slow._cache[("openai", model)], "atto", None)
    for usage in usages(7):
        assert pricer.cost("openai", model, usage) == slow.cost("openai", model, usage)


def test_inexact_override_uses_decimal_path() -> None:
    """A price with more precision than atto-USD falls back to Decimal, still rounded half-even."""
    pricer = Pricer({"x/m": (0.1234567890123456789, 1.0, None)})
    rates = pricer._rates("x", "m")
    assert rates is not None and rates.atto is None
    cost = pricer.cost("x", "m", TokenUsage(1_000_000, 1))
    assert cost == Cost(
        input_nanos=usd_to_nanos(Decimal("0.1234567890123456789")), output_nanos=1000, source="override"
    )


@pytest.mark.parametrize(
    ("atto", "nanos"),
    [(0, 0), (499_999_999, 0), (500_000_000, 0), (1_500_000_000, 2), (2_500_000_000, 2), (2_500_000_001, 3)],
)
def test_atto_rounding_half_even(atto: int, nanos: int) -> None:
    """atto -> nano rounding is half-even, like `usd_to_nanos`."""
    assert _atto_to_nanos(atto) == nanos
    assert usd_to_nanos(Decimal(atto) / Decimal(10) ** 18) == nanos


def test_unknown_model_and_none() -> None:
    """Unknown or missing models cost nothing and say so."""
    pricer = Pricer()
    assert pricer.cost("openai", "no-such-model-q", TokenUsage(10, 10)) == Cost()
    assert pricer.cost("openai", None, TokenUsage(10, 10)).source == "unknown"
    assert not pricer.is_known("openai", None) and pricer.is_known("openai", "gpt-4o")


USAGE = TokenUsage(input_tokens=1_234, output_tokens=567, cached_input_tokens=200)


def openai_cost(model: str, usage: TokenUsage = USAGE) -> Cost:
    """What an upstream named `openai` pays: the reference for every gateway below."""
    cost = Pricer().cost("openai", model, usage)
    assert cost.source == "genai-prices" and cost.total_nanos > 0
    return cost


@pytest.mark.parametrize("upstream", ["vllm", "litellm", "my-gateway"])
@pytest.mark.parametrize("configured", [True, False])
def test_gateway_upstream_prices_by_model(upstream: str, configured: bool) -> None:
    """An upstream whose name is no genai-prices provider prices its model across providers, whether
    it was named to the constructor or not."""
    pricer = Pricer(prices_as={upstream: None}) if configured else Pricer()
    assert pricer.cost(upstream, "gpt-4o-mini", USAGE) == openai_cost("gpt-4o-mini")
    assert pricer.is_known(upstream, "gpt-4o-mini")
    claude = pricer.cost(upstream, "claude-3-5-sonnet-latest", USAGE)
    assert claude == Pricer().cost("anthropic", "claude-3-5-sonnet-latest", USAGE) and claude.total_nanos > 0


@pytest.mark.parametrize(
    ("model", "provider"),
    [("openai/gpt-4o-mini", "openai"), ("anthropic/claude-3-5-haiku-latest", "anthropic")],
)
def test_gateway_model_named_with_its_provider(model: str, provider: str) -> None:
    """A gateway's `provider/model` name is priced by that provider."""
    bare = model.partition("/")[2]
    assert Pricer(prices_as={"vllm": None}).cost("vllm", model, USAGE) == Pricer().cost(provider, bare, USAGE)


def test_prices_as_names_the_provider() -> None:
    """`prices_as` wins over the upstream's name, even when the name is itself a provider."""
    pricer = Pricer(prices_as={"gateway": "openai", "anthropic": "openai"})
    assert pricer.cost("gateway", "gpt-4o-mini", USAGE) == openai_cost("gpt-4o-mini")
    assert pricer.cost("anthropic", "gpt-4o", USAGE) == openai_cost("gpt-4o")
    assert Pricer().cost("anthropic", "gpt-4o", USAGE) == Cost()  # by its name alone: not anthropic's
    # prices_as is one provider, not a model match: another provider's model stays unpriced
    assert pricer.cost("gateway", "claude-3-5-sonnet-latest", USAGE) == Cost()


@pytest.mark.parametrize("prices_as", [None, "openai"])
def test_unknown_model_on_gateway_stays_unknown(prices_as: str | None) -> None:
    """A model no provider prices costs nothing and is flagged, with or without `prices_as`."""
    pricer = Pricer(prices_as={"vllm": prices_as})
    for model in ("no-such-model-q", "meta-llama/no-such-model-q", "openai/no-such-model-q"):
        assert pricer.cost("vllm", model, USAGE) == Cost()
        assert pricer.cost("vllm", model, USAGE).source == "unknown" and not pricer.is_known("vllm", model)


def test_override_keyed_by_upstream_name_still_wins() -> None:
    """`[prices."vllm/model"]` (the upstream's name, as the client writes it) beats genai-prices; an
    override for the `prices_as` provider's name does not apply to another upstream."""
    pricer = Pricer(
        {
            "vllm/gpt-4o-mini": (1.0, 2.0, None),
            "openai/gpt-4o": (1.0, 2.0, None),
            "bare-model": (3.0, 4.0, None),
        },
        prices_as={"vllm": "openai"},
    )
    assert pricer.cost("vllm", "gpt-4o-mini", TokenUsage(1, 1)) == Cost(1000, 2000, source="override")
    assert pricer.cost("vllm", "gpt-4o", USAGE) == openai_cost("gpt-4o")
    assert pricer.cost("vllm", "bare-model", TokenUsage(1, 1)) == Cost(3000, 4000, source="override")


def test_upstream_providers_resolved_once_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each configured upstream's provider is resolved when the Pricer is built, never per call."""
    pricer = Pricer(prices_as={"vllm": None, "azure": None, "bedrock": None, "gw": "openai"})
    assert pricer._price_as == {"vllm": None, "azure": "azure", "bedrock": "aws", "gw": "openai"}
    calls: list[str | None] = []
    resolve = pricing._genai_provider_id

    def counting(name: str | None) -> str | None:
        calls.append(name)
        return resolve(name)

    monkeypatch.setattr(pricing, "_genai_provider_id", counting)
    for model in ("gpt-4o", "gpt-4o-mini", "o3-mini", "no-such-model-q"):
        for upstream in ("vllm", "azure", "gw"):
            pricer.cost(upstream, model, USAGE)
    assert calls == []
