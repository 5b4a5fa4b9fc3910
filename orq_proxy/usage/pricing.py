"""Model prices -> integer nano-USD costs. Prices come from `genai-prices`; config `[prices."provider/model"]`
overrides them. An unknown model costs 0 and is flagged `price_source="unknown"`, never an error.

Which genai-prices provider prices an upstream's calls: its `prices_as`, else the provider its name
names (`openai`, `azure`, ...), else none: a gateway's name (`litellm`, `vllm`) is no provider, so the model
is matched across providers. Overrides stay keyed by the upstream's name, as the client writes the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Literal, NamedTuple

from orq_proxy.usage.money import usd_to_nanos

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice

__all__ = ["Cost", "OverridePrices", "PriceSource", "Pricer", "TokenUsage", "genai_provider_ids"]

logger = logging.getLogger(__name__)

PriceSource = Literal["genai-prices", "override", "unknown"]
_PER_MTOK = Decimal(1_000_000)
_ATTO = Decimal(10) ** 18
_ATTO_PER_NANO = 1_000_000_000
_CACHE_MAX = 4096  # (provider, model) pairs whose rates are kept

# A `[prices."provider/model"]` override: USD per million input, output and cached-input tokens, then
# optionally cache writes (five-minute) and one-hour cache writes; None: see `Pricer`.
OverridePrices = (
    tuple[float, float, float | None] | tuple[float, float, float | None, float | None, float | None]
)


class TokenUsage(NamedTuple):
    """Token counts of one call. `input_tokens` includes `cached_input_tokens` (prompt-cache reads) and
    `cache_write_tokens` (prompt-cache writes, Anthropic's `cache_creation_input_tokens`), which include
    `cache_write_1h_tokens` (the writes with a one-hour TTL; the rest are five-minute writes);
    `output_tokens` includes `reasoning_tokens` (OpenAI's convention, and genai-prices'). A named tuple:
    immutable, and built several times per request (a frozen dataclass costs 4x as much to build). New
    fields go at the end, with defaults, so positional construction keeps its meaning.

    Example (an Anthropic call: 100 plain input tokens, 2,000 read from the cache, 500 written to it,
    of which 300 with a one-hour TTL):
        TokenUsage(input_tokens=2_600, output_tokens=50, cached_input_tokens=2_000,
                   cache_write_tokens=500, cache_write_1h_tokens=300)
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Cost(NamedTuple):
    """A call's cost in nano-USD. `input_nanos` includes `cached_nanos` (cache reads) and
    `cache_write_nanos` (cache writes, five-minute and one-hour); `output_nanos` includes
    `reasoning_nanos`; `total_nanos = input_nanos + output_nanos`. A named tuple, like `TokenUsage`
    (`cache_write_nanos` comes after `source` so positional construction keeps its meaning)."""

    input_nanos: int = 0
    output_nanos: int = 0
    cached_nanos: int = 0
    reasoning_nanos: int = 0
    source: PriceSource = "unknown"
    cache_write_nanos: int = 0

    @property
    def total_nanos(self) -> int:
        return self.input_nanos + self.output_nanos


@dataclass(slots=True, frozen=True)
class _Rates:
    """USD per token, and the same in integer atto-USD (1e-18) when that is exact (it is for any price
    quoted to at most 12 decimals per million tokens), which prices a call with integer arithmetic.

    `cache_write` prices five-minute prompt-cache writes, `cache_write_1h` one-hour ones; a model without
    such prices has them at its input rate (`cache_write_1h` at `cache_write`'s), as genai-prices does.
    """

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    source: PriceSource
    # (input, output, cached_input, cache_write, cache_write_1h)
    atto: tuple[int, int, int, int, int] | None = None
    # genai-prices' tiers, ascending: (start, rates) -> a call with more than `start` input tokens is
    # priced wholly at `rates`.
    tiers: tuple[tuple[int, _Rates], ...] = ()

    def for_input(self, input_tokens: int) -> _Rates:
        """The rates of a call with `input_tokens` input tokens (its tier's)."""
        for start, rates in reversed(self.tiers):
            if input_tokens > start:
                return rates
        return self

    def __post_init__(self) -> None:
        scaled = [
            int(v)
            for r in (self.input, self.output, self.cached_input, self.cache_write, self.cache_write_1h)
            if (v := r * _ATTO) == v.to_integral_value()
        ]
        if len(scaled) == 5:
            object.__setattr__(self, "atto", (scaled[0], scaled[1], scaled[2], scaled[3], scaled[4]))


def _per_token(per_mtok: float) -> Decimal:
    """A configured USD-per-million-tokens price as USD per token (by its decimal text, not its binary
    value: `0.1` is a tenth)."""
    return Decimal(str(per_mtok)) / _PER_MTOK


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
        overrides: `"provider/model"` -> `(input_per_mtok, output_per_mtok, cached_input_per_mtok | None)`
            USD, optionally followed by `cache_write_per_mtok | None, cache_write_1h_per_mtok | None`. A
            price left None is the input price (`cache_write_1h_per_mtok`: the cache write price), as
            genai-prices prices what a model has no price for.
        prices_as: upstream name -> the genai-prices provider id whose prices apply (`[upstreams.X]
            prices_as`), or None to derive it from the name. Upstreams named here are resolved once, now;
            any other name is resolved on each cache miss.

    Example:
        pricer = Pricer(prices_as={"vllm": None, "gateway": "openai"})
        pricer.cost("vllm", "gpt-4o-mini", TokenUsage(1000, 100))  # openai's gpt-4o-mini, by model match
    """

    def __init__(
        self,
        overrides: Mapping[str, OverridePrices] | None = None,
        *,
        prices_as: Mapping[str, str | None] | None = None,
    ) -> None:
        self._overrides: dict[str, _Rates] = {}
        for ref, prices in (overrides or {}).items():
            inp, out, cached, write, write_1h = (*prices, None, None)[:5]
            i = _per_token(inp)
            w = _per_token(write) if write is not None else i
            self._overrides[ref] = _Rates(
                input=i,
                output=_per_token(out),
                cached_input=_per_token(cached) if cached is not None else i,
                cache_write=w,
                cache_write_1h=_per_token(write_1h) if write_1h is not None else w,
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
        if rates.tiers:
            rates = rates.for_input(usage.input_tokens)
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        reasoning = min(usage.reasoning_tokens, usage.output_tokens)
        # Cache writes are part of the input, each priced once at its own rate (never also as plain
        # input): clamped so reads + writes never exceed the input, reads first.
        writes = max(0, min(usage.cache_write_tokens, usage.input_tokens - cached))
        writes_1h = max(0, min(usage.cache_write_1h_tokens, writes))
        uncached = usage.input_tokens - cached - writes
        if rates.atto is not None:  # exact integer path, ~10x faster than Decimal
            rate_in, rate_out, rate_cached, rate_write, rate_write_1h = rates.atto
            cached_atto = rate_cached * cached
            write_atto = rate_write * (writes - writes_1h) + rate_write_1h * writes_1h
            return Cost(
                input_nanos=_atto_to_nanos(rate_in * uncached + cached_atto + write_atto),
                output_nanos=_atto_to_nanos(rate_out * usage.output_tokens),
                cached_nanos=_atto_to_nanos(cached_atto),
                reasoning_nanos=_atto_to_nanos(rate_out * reasoning),
                source=rates.source,
                cache_write_nanos=_atto_to_nanos(write_atto),
            )
        cached_usd = rates.cached_input * cached
        write_usd = rates.cache_write * (writes - writes_1h) + rates.cache_write_1h * writes_1h
        input_usd = rates.input * uncached + cached_usd + write_usd
        reasoning_usd = rates.output * reasoning
        output_usd = rates.output * usage.output_tokens
        return Cost(
            input_nanos=usd_to_nanos(input_usd),
            output_nanos=usd_to_nanos(output_usd),
            cached_nanos=usd_to_nanos(cached_usd),
            reasoning_nanos=usd_to_nanos(reasoning_usd),
            source=rates.source,
            cache_write_nanos=usd_to_nanos(write_usd),
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
    """Per-token rates from genai-prices' bundled snapshot, by pricing a probe usage of each kind.

    Pricing a probe usage (rather than reading `ModelPrice` fields) lets genai-prices resolve its own
    aliases and fallbacks. Tiered prices (a call whose input passes a tier's start is priced wholly at that
    tier's rates, as genai-prices does) are probed once per tier, inside it. Without a provider, a model
    named `provider/model` (as gateways name them) is priced by that provider when genai-prices knows it;
    otherwise genai-prices takes the first provider, in its table's fixed order, whose model pattern
    matches: the same answer for the same model every time.
    """
    from genai_prices.types import TieredPrices  # imported lazily: loading the price table takes ~100 ms

    if provider is None and "/" in model:
        prefix, _, rest = model.partition("/")
        if (named := _genai_provider_id(prefix)) is not None:
            provider, model = named, rest
    try:
        base, model_price = _probe(provider, model, 1)
        # Where tiers start: a call with more input tokens than a start pays that tier's rates.
        starts = sorted(
            {
                tier.start
                for price in vars(model_price).values()
                if isinstance(price, TieredPrices)
                for tier in price.tiers
            }
        )
        tiers = tuple((start, _probe(provider, model, start + 1)[0]) for start in starts)
    except LookupError:
        logger.info("no price known for model %s/%s", provider, model)
        return None
    except Exception:  # a price table bug must never fail a request
        logger.exception("genai-prices failed for model %s/%s", provider, model)
        return None
    return replace(base, tiers=tiers) if tiers else base


def _probe(provider: str | None, model: str, tokens: int) -> tuple[_Rates, ModelPrice]:
    """The rates of a call of `tokens` input tokens (which picks the tier), and the `ModelPrice`
    genai-prices used. Raises what `calc_price` raises (LookupError: no such model)."""
    from genai_prices import Usage, calc_price

    def input_price(**kinds: int) -> Decimal:
        return (
            calc_price(Usage(input_tokens=tokens, **kinds), model, provider_id=provider).input_price / tokens
        )

    base = calc_price(Usage(input_tokens=tokens, output_tokens=tokens), model, provider_id=provider)
    # genai-prices counts cache reads and writes inside input_tokens, and one-hour writes inside cache
    # writes; a model without a price for a kind prices it at the rate of the kind that contains it, so
    # probing gives what `calc_price` charges either way.
    rates = _Rates(
        input=base.input_price / tokens,
        output=base.output_price / tokens,
        cached_input=input_price(cache_read_tokens=tokens),
        cache_write=input_price(cache_write_tokens=tokens),
        cache_write_1h=input_price(cache_write_tokens=tokens, cache_write_1h_tokens=tokens),
        source="genai-prices",
    )
    return rates, base.model_price
