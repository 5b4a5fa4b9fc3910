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


# Anthropic's models (and others with prompt-cache write prices), each with cache reads, five-minute and
# one-hour writes; `claude-sonnet-4-5` and `claude-haiku-5-5` have tiered prices (a call past 200K / 100K
# input tokens pays the tier's rates on all of them); the Bedrock model prices writes but not one-hour
# ones; `claude-2` and the OpenAI models price no writes (they cost the input rate).
CACHE_WRITE_MODELS = [
    ("anthropic", "claude-opus-4-5"),
    ("anthropic", "claude-sonnet-4-0"),
    ("anthropic", "claude-3-5-haiku-latest"),
    ("anthropic", "claude-haiku-4-5"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-haiku-5-5"),
    ("anthropic", "claude-2"),
    ("aws", "global.anthropic.claude-sonnet-4-20250514-v1:0"),
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
]


def cache_usages(seed: int, n: int = 40) -> list[TokenUsage]:
    """Random usages with every kind of input (some above 200K tokens, so tiers are crossed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plain, read, write = (rng.choice([0, rng.randrange(0, 120_000)]) for _ in range(3))
        write_1h = rng.choice([0, write, rng.randrange(0, write + 1)])
        outp = rng.randrange(0, 20_000)
        out.append(
            TokenUsage(
                plain + read + write,
                outp,
                cached_input_tokens=read,
                reasoning_tokens=rng.randrange(0, outp + 1),
                cache_write_tokens=write,
                cache_write_1h_tokens=write_1h,
            )
        )
    return out


def reference(provider: str, model: str, usage: TokenUsage) -> tuple[int, int, int, int, int]:
    """genai-prices' own figures for `usage`: input, output, total, cache reads' and writes' nano-USD
    (the last two as the input price of the same call with only those tokens, at the call's tier)."""

    def price(**kw: int | None) -> Decimal:
        return calc_price(Usage(**kw), model, provider_id=provider).input_price

    ref = calc_price(
        Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cached_input_tokens or None,
            cache_write_tokens=usage.cache_write_tokens or None,
            cache_write_1h_tokens=usage.cache_write_1h_tokens or None,
        ),
        model,
        provider_id=provider,
    )
    # The tokens above the reads (or writes) are priced plain, at the call's tier; subtract them.
    rest = usage.input_tokens - usage.cached_input_tokens
    reads = price(input_tokens=usage.input_tokens, cache_read_tokens=usage.cached_input_tokens or None)
    reads -= price(input_tokens=usage.input_tokens) * rest / usage.input_tokens if usage.input_tokens else 0
    rest = usage.input_tokens - usage.cache_write_tokens
    writes = price(
        input_tokens=usage.input_tokens,
        cache_write_tokens=usage.cache_write_tokens or None,
        cache_write_1h_tokens=usage.cache_write_1h_tokens or None,
    )
    writes -= price(input_tokens=usage.input_tokens) * rest / usage.input_tokens if usage.input_tokens else 0
    return (
        usd_to_nanos(ref.input_price),
        usd_to_nanos(ref.output_price),
        usd_to_nanos(ref.total_price),
        usd_to_nanos(reads),
        usd_to_nanos(writes),
    )


@pytest.mark.parametrize(("provider", "model"), CACHE_WRITE_MODELS)
def test_cache_reads_and_writes_cost_what_genai_prices_says(provider: str, model: str) -> None:
    """Input (plain, cache reads, five-minute and one-hour writes, each once at its own rate), output,
    cache reads' and writes' nano-USD equal genai-prices' `calc_price` on the same usage."""
    pricer = Pricer()
    for usage in cache_usages(sum(map(ord, model))):
        cost = pricer.cost(provider, model, usage)
        ref_in, ref_out, ref_total, ref_reads, ref_writes = reference(provider, model, usage)
        assert cost.source == "genai-prices"
        assert (cost.input_nanos, cost.output_nanos) == (ref_in, ref_out), usage
        assert (cost.cached_nanos, cost.cache_write_nanos) == (ref_reads, ref_writes), usage
        assert abs(cost.total_nanos - ref_total) <= 1  # two roundings vs one


@pytest.mark.parametrize(
    ("usage", "nanos"),
    [
        (TokenUsage(1_000_000), 5_000_000_000),
        (TokenUsage(1_000_000, cached_input_tokens=1_000_000), 500_000_000),
        (TokenUsage(1_000_000, cache_write_tokens=1_000_000), 6_250_000_000),
        (
            TokenUsage(1_000_000, cache_write_tokens=1_000_000, cache_write_1h_tokens=1_000_000),
            10_000_000_000,
        ),
        # 100 plain, 200 read, 300 written (100 of them for an hour)
        (
            TokenUsage(600, cached_input_tokens=200, cache_write_tokens=300, cache_write_1h_tokens=100),
            100 * 5_000 + 200 * 500 + 200 * 6_250 + 100 * 10_000,
        ),
    ],
)
def test_claude_opus_4_5_cache_prices(usage: TokenUsage, nanos: int) -> None:
    """claude-opus-4-5 per million input tokens: $5 plain, $0.50 read, $6.25 written for five minutes,
    $10 for an hour; the writes' share is `cache_write_nanos`, inside `input_nanos`."""
    cost = Pricer().cost("anthropic", "claude-opus-4-5", usage)
    assert cost.input_nanos == nanos
    writes_5m = usage.cache_write_tokens - usage.cache_write_1h_tokens
    assert cost.cache_write_nanos == writes_5m * 6_250 + usage.cache_write_1h_tokens * 10_000


@pytest.mark.parametrize(
    ("usage", "counted"),
    [
        # reads and writes past the input: reads first, writes get what is left, one-hour within writes
        (
            TokenUsage(100, cached_input_tokens=80, cache_write_tokens=50, cache_write_1h_tokens=70),
            (0, 80, 0, 20),
        ),
        (TokenUsage(100, cached_input_tokens=150, cache_write_tokens=10), (0, 100, 0, 0)),
        (TokenUsage(100, cache_write_tokens=40, cache_write_1h_tokens=90), (60, 0, 0, 40)),
        (TokenUsage(100, cache_write_1h_tokens=30), (100, 0, 0, 0)),  # one-hour writes are writes
        (TokenUsage(100, cache_write_tokens=-5, cache_write_1h_tokens=-5), (100, 0, 0, 0)),
    ],
)
def test_inconsistent_counts_are_clamped_never_double_counted(
    usage: TokenUsage, counted: tuple[int, int, int, int]
) -> None:
    """Counts that do not add up are clamped: nothing negative, and plain + read + written tokens are
    never more than `input_tokens` (plain, read, five-minute and one-hour written tokens below)."""
    _, read, write_5m, write_1h = counted
    rates = (5_000, 500, 6_250, 10_000)  # claude-opus-4-5's nano-USD per token
    cost = Pricer().cost("anthropic", "claude-opus-4-5", usage)
    assert cost.input_nanos == sum(n * r for n, r in zip(counted, rates, strict=True))
    assert cost.cache_write_nanos == write_5m * rates[2] + write_1h * rates[3]
    assert cost.cached_nanos == read * rates[1]


def _decimal_only(rates: pricing._Rates) -> pricing._Rates:
    """The same rates with the integer path switched off (tiers included)."""
    tiers = tuple((start, _decimal_only(tier)) for start, tier in rates.tiers)
    slow = dataclasses.replace(rates, tiers=tiers)
    object.__setattr__(slow, "atto", None)
    return slow


@pytest.mark.parametrize(("provider", "model"), CACHE_WRITE_MODELS)
def test_integer_path_equals_decimal_path_with_cache_writes(provider: str, model: str) -> None:
    """With cache reads and writes too, every field of the integer path equals the Decimal one."""
    pricer = Pricer()
    rates = pricer._rates(provider, model)
    assert rates is not None and rates.atto is not None
    slow = Pricer()
    slow._cache[(provider, model)] = _decimal_only(rates)
    for usage in cache_usages(11):
        assert pricer.cost(provider, model, usage) == slow.cost(provider, model, usage)


def test_tiers_price_the_whole_call_at_the_tier_it_reaches() -> None:
    """A tiered model (claude-sonnet-4-5: $3 / $6 per million input tokens up to / past 200K) prices a
    call by the tier its input reaches, as genai-prices does, not at a tier probed once."""
    pricer = Pricer()
    assert pricer.cost("anthropic", "claude-sonnet-4-5", TokenUsage(200_000)).input_nanos == 600_000_000
    assert pricer.cost("anthropic", "claude-sonnet-4-5", TokenUsage(200_001)).input_nanos == 1_200_006_000
    assert pricer.cost("anthropic", "claude-sonnet-4-5", TokenUsage(1_000, 0)).input_nanos == 3_000_000


def test_positional_construction_keeps_its_meaning() -> None:
    """The new fields come last with defaults: tuples built positionally mean what they meant."""
    usage = TokenUsage(10, 20, 3, 4, 5, 6)
    assert (usage.cached_input_tokens, usage.reasoning_tokens, usage.audio_output_tokens) == (3, 4, 6)
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (0, 0)
    assert TokenUsage(10, 20, 3, 4, 5, 6, 7, 2).cache_write_1h_tokens == 2
    cost = Cost(1, 2, 3, 4, "override")
    assert (cost.source, cost.cache_write_nanos, cost.total_nanos) == ("override", 0, 3)
    assert Cost(1, 2, 3, 4, "override", 5).cache_write_nanos == 5


def test_openai_costs_carry_no_cache_writes() -> None:
    """An OpenAI call (no writes reported) costs what it did, with `cache_write_nanos` 0."""
    cost = Pricer().cost("openai", "gpt-4o", USAGE)
    assert cost.cache_write_nanos == 0
    assert cost.input_nanos == (1_234 - 200) * 2_500 + 200 * 1_250


def test_override_cache_write_prices() -> None:
    """An override may price cache writes and one-hour writes; left out, writes cost the input price and
    one-hour writes the write price (genai-prices' fallbacks)."""
    usage = TokenUsage(1_000, 0, cached_input_tokens=100, cache_write_tokens=300, cache_write_1h_tokens=100)
    pricer = Pricer(
        {
            "x/plain": (1.0, 2.0, None),
            "x/writes": (1.0, 2.0, 0.1, 1.25, 2.0),
            "x/five-minute-only": (1.0, 2.0, 0.1, 1.25, None),
            "x/one-hour-only": (1.0, 2.0, 0.1, None, 2.0),
        }
    )
    k = 1_000  # nano-USD per token at $1 per million
    assert pricer.cost("x", "plain", usage) == Cost(1_000 * k, 0, 100 * k, 0, "override", 300 * k)
    want = Cost((600 + 10 + 250 + 200) * k, 0, 10 * k, 0, "override", 450 * k)
    assert pricer.cost("x", "writes", usage) == want
    want = Cost((600 + 10 + 375) * k, 0, 10 * k, 0, "override", 375 * k)
    assert pricer.cost("x", "five-minute-only", usage) == want
    want = Cost((600 + 10 + 200 + 200) * k, 0, 10 * k, 0, "override", 400 * k)
    assert pricer.cost("x", "one-hour-only", usage) == want
