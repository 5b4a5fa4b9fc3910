"""`UsageEvent`: one per proxied request, whatever its ending. The contract between metering (which
writes events) and reporting (which reads them back from the event store).

Names: token fields use the Responses-API names (`input_tokens`, `output_tokens`, ...) because they are
also the names of reporting's `genai.usage` bundle; money is integer nano-USD (`*_nanos`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BudgetConsumption", "UsageEvent"]


class UsageEvent(BaseModel):
    """What one request used and cost, and who it is attributed to."""

    model_config = ConfigDict(frozen=True)

    event_id: str = Field(description="The request's ULID.")
    timestamp: datetime = Field(description="When the request arrived (aware, UTC).")
    workspace: str
    project: str
    api_key_id: str
    identity: str | None = Field(None, description="External id of the identity, None if unattributed.")
    identity_source: Literal["body", "header", "metadata", "owner"] | None = None
    identity_tags: list[str] = Field(default_factory=list)
    provider: str | None = None
    model: str | None = Field(None, description="Provider-qualified model ref, e.g. 'openai/gpt-4o'.")
    product: str = Field(
        "other", description="chat.completions | responses | embeddings | completions | other"
    )
    status: Literal["OK", "ERROR"] = "OK"
    http_status: int = 200
    credential_type: str = "api_key"
    stream: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = Field(
        0, description="Prompt-cache writes (five-minute and one-hour), included in input_tokens."
    )
    cache_write_1h_tokens: int = Field(0, description="The cache writes with a one-hour TTL.")
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    input_cost_nanos: int = 0
    output_cost_nanos: int = 0
    cached_cost_nanos: int = 0
    cache_write_cost_nanos: int = Field(0, description="Cache writes' cost, included in input_cost_nanos.")
    reasoning_cost_nanos: int = 0
    total_cost_nanos: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    usage_source: Literal["exact", "estimated"] = "exact"
    usage_note: str | None = Field(None, description="Why usage is estimated, when it is.")
    price_source: Literal["genai-prices", "override", "unknown"] = "genai-prices"
    budget_ids: list[str] = Field(
        default_factory=list,
        description="Budgets the request was admitted against and charged to (the ledger behind them).",
    )
    metadata: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def trusted(cls, values: dict[str, Any]) -> UsageEvent:
        """An event from values this package computed itself, without validation (0.5 us instead of 3).

        `values` must hold every field, in declaration order (`event_row` reads them in that order), each
        of its declared type. Anything that comes from outside goes through the constructor instead.
        """
        event = cls.__new__(cls)
        _set = object.__setattr__  # what `model_construct` does, minus its per-field defaults and aliases
        _set(event, "__dict__", values)
        _set(event, "__pydantic_fields_set__", set(_FIELDS))
        _set(event, "__pydantic_extra__", None)
        _set(event, "__pydantic_private__", None)
        return event


_FIELDS = frozenset(UsageEvent.model_fields)


class BudgetConsumption(NamedTuple):
    """What the events charged to one budget since its count started: nano-USD, tokens, and the arrival
    times (Unix seconds, ascending) of its requests inside the rate window. The event store computes it
    from `UsageEvent.budget_ids`; the budget counters are rebuilt from it at startup."""

    cost_nanos: int
    tokens: int
    request_times: tuple[float, ...]
