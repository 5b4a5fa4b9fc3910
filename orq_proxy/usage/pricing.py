"""Model prices -> integer nano-USD costs. Prices come from `genai-prices`; config `[prices."provider/model"]`
overrides them. An unknown model costs 0 and is flagged `price_source="unknown"`, never an error.

Which genai-prices provider prices an upstream's calls: its `prices_as`, else the provider its name
names (`openai`, `azure`, ...), else none: a gateway's name (`litellm`, `vllm`) is no provider, so the model
is matched across providers. Overrides stay keyed by the upstream's name, as the client writes the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, NamedTuple

from orq_proxy.usage.money import usd_to_nanos

__all__ = ["Cost", "PriceSource", "Pricer", "TokenUsage", "genai_provider_ids"]

logger = logging.getLogger(__name__)

PriceSource = Literal["genai-prices", "override", "unknown"]
_PER_MTOK = Decimal(1_000_000)
_ATTO = Decimal(10) ** 18
_ATTO_PER_NANO = 1_000_000_000
_CACHE_MAX = 4096  # (provider, model) pairs whose rates are kept


class TokenUsage(NamedTuple):
    """Token counts of one call. `input_tokens` includes `cached_input_tokens`; `output_tokens` includes
    `reasoning_tokens` (OpenAI's convention). A named tuple: immutable, and built several times per
    request (a frozen dataclass costs 4x as much to build)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Cost(NamedTuple):
    """A call's cost in nano-USD. `input_nanos` includes `cached_nanos`; `output_nanos` includes
    `reasoning_nanos`; `total_nanos = input_nanos + output_nanos`. A named tuple, like `TokenUsage`."""

    input_nanos: int = 0
    output_nanos: int = 0
    cached_nanos: int = 0
    reasoning_nanos: int = 0
    source: PriceSource = "unknown"

    @property
    def total_nanos(self) -> int:
        return self.input_nanos + self.output_nanos


@dataclass(slots=True, frozen=True)
class _Rates:
    """USD per token, and the same in integer atto-USD (1e-18) when that is exact (it is for any price
    quoted to at most 12 decimals per million tokens), which prices a call with integer arithmetic."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    source: PriceSource
    atto: tuple[int, int, int] | None = None  # (input, output, cached_input)

    def __post_init__(self) -> None:
        scaled = [r * _ATTO for r in (self.input, self.output, self.cached_input)]
        if all(v == v.to_integral_value() for v in scaled):
            object.__setattr__(self, "atto", (int(scaled[0]), int(scaled[1]), int(scaled[2])))


def _atto_to_nanos(atto: int) -> int:
    """atto-USD -> nano-USD, rounded half-even (as `usd_to_nanos`)."""
    q, r = divmod(atto, _ATTO_PER_NANO)
    if 2 * r > _ATTO_PER_NANO or (2 * r == _ATTO_PER_NANO and q & 1):
        q += 1
    return q


class Pricer:
    """Prices calls. Thread-safe enough for one event loop; lookups are cached per model.

    `provider` in `cost`/`is_known` is the upstream's name (`ctx.provider`), never a genai-prices id.

    Args:
        overrides: `"provider/model"` -> `(input_per_mtok, output_per_mtok, cached_input_per_mtok | None)` USD.
        prices_as: upstream name -> the genai-prices provider id whose prices apply (`[upstreams.X]
            prices_as`), or None to derive it from the name. Upstreams named here are resolved once, now;
            any other name is resolved on each cache miss.

    Example:
        pricer = Pricer(prices_as={"vllm": None, "gateway": "openai"})
        pricer.cost("vllm", "gpt-4o-mini", TokenUsage(1000, 100))  # openai's gpt-4o-mini, by model match
    """

    def __init__(
        self,
        overrides: Mapping[str, tuple[float, float, float | None]] | None = None,
        *,
        prices_as: Mapping[str, str | None] | None = None,
    ) -> None:
        self._overrides: dict[str, _Rates] = {}
        for ref, (inp, out, cached) in (overrides or {}).items():
            i = Decimal(str(inp)) / _PER_MTOK
            self._overrides[ref] = _Rates(
                input=i,
                output=Decimal(str(out)) / _PER_MTOK,
                cached_input=Decimal(str(cached)) / _PER_MTOK if cached is not None else i,
                source="override",
            )
        # A plain dict (lookups on the hot path, twice per request), emptied when it reaches the bound:
        # model names come from clients, so their number is not ours to choose.
        self._cache: dict[tuple[str | None, str], _Rates | None] = {}
        # Upstream name -> genai-prices provider id (None: match the model across providers).
        self._price_as: dict[str, str | None] = {
            name: explicit or _genai_provider_id(name) for name, explicit in (prices_as or {}).items()
        }

    def _rates(self, provider: str | None, model: str) -> _Rates | None:
        key = (provider, model)
        try:
            return self._cache[key]
        except KeyError:
            pass
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        rates = self._overrides.get(f"{provider}/{model}" if provider else model) or self._overrides.get(
            model
        )
        if rates is None:
            if provider in self._price_as:
                price_as = self._price_as[provider]
            else:  # not named to the constructor (a Pricer used on its own): resolved per cache miss
                price_as = _genai_provider_id(provider)
            rates = _lookup_genai_prices(price_as, model)
        self._cache[key] = rates
        return rates

    def is_known(self, provider: str | None, model: str | None) -> bool:
        return model is not None and self._rates(provider, model) is not None

    def cost(self, provider: str | None, model: str | None, usage: TokenUsage) -> Cost:
        """The cost of `usage` on `provider/model`; zero with `source="unknown"` if unpriced."""
        rates = self._rates(provider, model) if model else None
        if rates is None:
            return Cost()
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        reasoning = min(usage.reasoning_tokens, usage.output_tokens)
        if rates.atto is not None:  # exact integer path, ~10x faster than Decimal
            rate_in, rate_out, rate_cached = rates.atto
            cached_atto = rate_cached * cached
            return Cost(
                input_nanos=_atto_to_nanos(rate_in * (usage.input_tokens - cached) + cached_atto),
                output_nanos=_atto_to_nanos(rate_out * usage.output_tokens),
                cached_nanos=_atto_to_nanos(cached_atto),
                reasoning_nanos=_atto_to_nanos(rate_out * reasoning),
                source=rates.source,
            )
        cached_usd = rates.cached_input * cached
        input_usd = rates.input * (usage.input_tokens - cached) + cached_usd
        reasoning_usd = rates.output * reasoning
        output_usd = rates.output * usage.output_tokens
        return Cost(
            input_nanos=usd_to_nanos(input_usd),
            output_nanos=usd_to_nanos(output_usd),
            cached_nanos=usd_to_nanos(cached_usd),
            reasoning_nanos=usd_to_nanos(reasoning_usd),
            source=rates.source,
        )


def genai_provider_ids() -> frozenset[str]:
    """The provider ids genai-prices knows (`openai`, `anthropic`, ...): the values `prices_as` accepts.

    Loads genai-prices' price table on first use (a few hundred ms, once per process).
    """
    from genai_prices.data_snapshot import get_snapshot

    return frozenset(p.id for p in get_snapshot().providers)


def _genai_provider_id(name: str | None) -> str | None:
    """The genai-prices provider an upstream's name names, by genai-prices' own matching (`openai`,
    `azure`, `bedrock` -> `aws`), or None when it names none (`litellm`, `vllm`, `my-gateway`)."""
    if not name:
        return None
    from genai_prices.data_snapshot import find_provider_by_id, get_snapshot

    provider = find_provider_by_id(get_snapshot().providers, name)
    return provider.id if provider is not None else None


def _lookup_genai_prices(provider: str | None, model: str) -> _Rates | None:
    """Per-token rates from genai-prices' bundled snapshot, by pricing a million tokens of each kind.

    Pricing a probe usage (rather than reading `ModelPrice` fields) lets genai-prices resolve its own
    aliases; tiered prices resolve to the first tier. Without a provider, a model named `provider/model`
    (as gateways name them) is priced by that provider when genai-prices knows it; otherwise genai-prices
    takes the first provider, in its table's fixed order, whose model pattern matches: the same answer
    for the same model every time.
    """
    from genai_prices import Usage, calc_price  # imported lazily: loading the price table takes ~100 ms

    if provider is None and "/" in model:
        prefix, _, rest = model.partition("/")
        if (named := _genai_provider_id(prefix)) is not None:
            provider, model = named, rest
    try:
        base = calc_price(Usage(input_tokens=1_000_000, output_tokens=1_000_000), model, provider_id=provider)
        cached = calc_price(
            Usage(input_tokens=1_000_000, cache_read_tokens=1_000_000), model, provider_id=provider
        )
    except LookupError:
        logger.info("no price known for model %s/%s", provider, model)
        return None
    except Exception:  # a price table bug must never fail a request
        logger.exception("genai-prices failed for model %s/%s", provider, model)
        return None
    return _Rates(
        input=base.input_price / _PER_MTOK,
        output=base.output_price / _PER_MTOK,
        cached_input=cached.input_price / _PER_MTOK,
        source="genai-prices",
    )
