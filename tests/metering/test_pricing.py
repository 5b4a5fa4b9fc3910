"""Pricer: costs equal genai-prices' to the nano-USD; the integer fast path equals the Decimal path."""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from orq_proxy.metering.pricing import Cost, Pricer, TokenUsage, _atto_to_nanos, usd_to_nanos

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
