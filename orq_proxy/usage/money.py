"""Money: integer nano-USD inside, USD floats only at the API edge (rounded to 10 decimals)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

__all__ = ["NANOS_PER_USD", "USD_DECIMALS", "nanos_to_usd", "usd_to_nanos"]

NANOS_PER_USD = 1_000_000_000
USD_DECIMALS = 10  # the API edge rounds USD to this many decimals (a nano-USD is 9; one more guards floats)
_NANOS = Decimal(NANOS_PER_USD)


def usd_to_nanos(usd: Decimal | float | int) -> int:
    """USD -> integer nano-USD, rounded half-even."""
    value = usd if isinstance(usd, Decimal) else Decimal(str(usd))
    return int((value * _NANOS).to_integral_value(ROUND_HALF_EVEN))


def nanos_to_usd(nanos: int) -> float:
    """Integer nano-USD -> USD as the API edge shows it."""
    return round(nanos / NANOS_PER_USD, USD_DECIMALS)
