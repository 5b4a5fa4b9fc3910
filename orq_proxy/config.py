"""`ProxyConfig`: the whole configuration, from a TOML file, environment and CLI flags.

Precedence: CLI flags > TOML file (`--config FILE` or `ORQ_PROXY_CONFIG`) > defaults. Unknown keys are
errors, so a typo never silently turns a feature off.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orq_proxy.proxy.upstream import origin_of
from orq_proxy.usage.pricing import genai_provider_ids

__all__ = [
    "API_PRICES_AS",
    "CONFIG_ENV",
    "DEFAULT_UPSTREAM_KEY_ENV",
    "ApiKeyConfig",
    "BudgetsConfig",
    "ConfigError",
    "NotifierConfig",
    "PriceOverride",
    "ProxyConfig",
    "ReportingConfig",
    "ServerConfig",
    "SinkConfig",
    "StorageConfig",
    "UpstreamAPI",
    "UpstreamConfig",
    "load_config",
]

CONFIG_ENV = "ORQ_PROXY_CONFIG"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the rule."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Request bodies above this get 413.")
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1,
        description="Request line and headers together; a longer head gets 431 before more is buffered.",
    )
    max_headers: int = Field(100, ge=1, description="Header fields per request; more get 431.")
    request_read_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds from a request's first byte until its headers and body have all arrived "
        "(one deadline, not reset by progress); 408 and close after.",
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle connection (no request in progress) stays open."
    )
    metrics: Literal["open", "admin"] = Field(
        "admin",
        description='Who may read /metrics: "admin" (an admin key as a bearer token; everyone in open mode, '
        'where every caller is admin) or "open" (anyone).',
    )
    trust_forwarded_headers: bool = Field(
        False,
        description="true: the client's X-Forwarded-For / Forwarded come from a trusted front proxy and are "
        "forwarded with the peer appended (X-Forwarded-Proto/-Host/-Port/-Prefix, X-Real-IP kept); false: "
        "all of them are dropped and X-Forwarded-For / Forwarded name the peer alone.",
    )
    gc_threshold: int = Field(
        10_000,
        ge=0,
        description="`orq-proxy serve` only: after startup, freeze what startup allocated and collect the "
        "youngest objects every this many allocations (Python's default is 700). 0: leave the GC alone.",
    )


UpstreamAPI = Literal["openai", "anthropic", "azure"]
# The genai-prices provider an upstream of this API is priced as when neither `prices_as` nor its name says.
API_PRICES_AS: dict[str, str] = {"anthropic": "anthropic", "azure": "azure"}


class UpstreamConfig(_Section):
    base_url: str
    api: UpstreamAPI = Field(
        "openai",
        description="The upstream's wire format: `openai` (OpenAI and every OpenAI-compatible API), "
        "`anthropic` (Anthropic's Messages API; key sent as `x-api-key`) or `azure` (Azure OpenAI: "
        "`/openai/deployments/{deployment}/...?api-version=`, key sent as `api-key`).",
    )
    api_version: str | None = Field(
        None, description='`api = "azure"` only (required there): the `api-version` query parameter.'
    )
    deployments: dict[str, str] = Field(
        default_factory=dict,
        description='`api = "azure"` only: model -> deployment name; a model not listed is sent to the '
        "deployment of its own name.",
    )
    api_key_env: str | None = None
    api_key: str | None = Field(None, description="Literal upstream credential; prefer api_key_env.")
    default: bool = False
    connect_timeout: float = Field(10.0, gt=0)
    headers_timeout: float = Field(
        600.0, gt=0, description="Seconds to wait for response headers; 504 after."
    )
    read_timeout: float = Field(600.0, gt=0, description="Seconds to wait between two body chunks.")
    prices_as: str | None = Field(
        None,
        description="The genai-prices provider whose prices apply (`openai`); default: the provider the "
        "upstream's name names, else the model is matched across providers.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        origin_of(value)  # the forwarding client's own rules (host, port, no query or credentials)
        return value.rstrip("/")

    @field_validator("prices_as")
    @classmethod
    def _check_prices_as(cls, value: str | None) -> str | None:
        if value is None:
            return None
        known = genai_provider_ids()  # the pricer's own list (loads the price table, once per process)
        if value not in known:
            raise ValueError(f"unknown genai-prices provider {value!r}; known: {', '.join(sorted(known))}")
        return value

    @model_validator(mode="after")
    def _check_api(self) -> UpstreamConfig:
        if self.api == "azure":
            if not self.api_version:
                raise ValueError('api = "azure" needs api_version (e.g. api_version = "2024-10-21")')
        else:
            if self.api_version is not None:
                raise ValueError(
                    f'api_version is only for api = "azure" (this upstream has api = "{self.api}")'
                )
            if self.deployments:
                raise ValueError(
                    f'deployments are only for api = "azure" (this upstream has api = "{self.api}")'
                )
        for model, deployment in self.deployments.items():
            if not model or not deployment or "/" in deployment:
                raise ValueError(
                    f"deployments: {model!r} = {deployment!r}: model and deployment must be non-empty, "
                    "and a deployment name has no '/'"
                )
        return self

    def credential(self) -> str | None:
        """The upstream API key: `api_key`, else the value of the `api_key_env` variable."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


class ApiKeyConfig(_Section):
    key: str | None = None
    key_sha256: str | None = None
    id: str | None = Field(None, description="Stable key id for budgets and reports; default: digest prefix.")
    workspace: str = "default"
    project: str = "default"
    owner: str | None = None
    admin: bool = False
    identities: Literal["any", "owner", "prefix"] | None = Field(
        None,
        description="Which identities calls with this key may be attributed to (body identity or "
        'X-ORQ-IDENTITY-ID): "any" (a backend\'s key), "owner" (only its owner), "prefix" (its owner and ids '
        'starting with identity_prefix). Default: "owner" when the key has an owner, else "any". The owner '
        "fallback (a call that names no identity) is always allowed.",
    )
    identity_prefix: str | None = Field(
        None, description='With identities = "prefix": the start of every identity id the key may name.'
    )

    @model_validator(mode="after")
    def _one_key(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("each [[api_keys]] entry needs exactly one of key or key_sha256")
        return self

    @model_validator(mode="after")
    def _check_identities(self) -> ApiKeyConfig:
        # The one place these combinations are checked (`auth.Principal` resolves the default). Pydantic's
        # error location gives the entry's index (`api_keys.1`); the message adds its id.
        entry = f"[[api_keys]] entry id={self.id!r}" if self.id else "[[api_keys]] entry (no id)"
        if self.identities == "owner" and not self.owner:
            raise ValueError(
                f'{entry}: identities = "owner" needs an owner (set owner = "<identity id>", or identities '
                '= "any" for a backend\'s key)'
            )
        if self.identities == "prefix" and not self.identity_prefix:
            raise ValueError(
                f'{entry}: identities = "prefix" needs a non-empty identity_prefix (e.g. identity_prefix = '
                '"acme-")'
            )
        if self.identity_prefix is not None and self.identities != "prefix":
            raise ValueError(
                f'{entry}: identity_prefix only applies with identities = "prefix" (set identities = '
                '"prefix", or remove identity_prefix)'
            )
        return self


class StorageConfig(_Section):
    state: str = "memory"
    events: str = "duckdb://:memory:"
    spool: str = Field(
        "auto",
        description='Directory of the crash spool of settled events: "auto" (`<events file>.spool` for a '
        'file event store, off for in-memory events), "off", or a path.',
    )
    counters: str = Field(
        "memory", description='Budget counters: "memory", or "redis://host:6379/0" shared by replicas.'
    )
    counters_prefix: str = Field(
        "orq:budget:",
        min_length=1,
        max_length=100,
        description="Prefix of every Redis key of the budget counters: replicas of one deployment share it; "
        "two deployments on one Redis need different ones.",
    )
    redis_socket_timeout: float = Field(
        2.0, gt=0, description="Seconds a Redis command may take before the request fails closed (503)."
    )
    redis_connect_timeout: float = Field(2.0, gt=0, description="Seconds to connect to Redis.")

    @field_validator("counters")
    @classmethod
    def _check_counters(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"counters must be 'memory' or a redis:// URL, got {value!r}")
        return value


class PriceOverride(_Section):
    """USD per million tokens."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0)
    cache_write_per_mtok: float | None = Field(None, ge=0, description="Default: the input price.")
    cache_write_1h_per_mtok: float | None = Field(None, ge=0, description="Default: the cache-write price.")


class SinkConfig(_Section):
    type: Literal["jsonl", "duckdb", "memory"]
    path: str | None = None


class NotifierConfig(_Section):
    url: str


class BudgetsConfig(_Section):
    default_max_output_tokens: int = Field(4096, ge=1)
    fail_open: bool = False
    unpriced: Literal["refuse", "allow"] = Field(
        "refuse",
        description="A request a cost (amount) budget applies to whose model has no price: 'refuse' (400 "
        "naming the [prices.\"provider/model\"] table that would price it) or 'allow' (reserved at zero "
        "cost, logged and counted on /metrics).",
    )
    reservation_ttl: int | None = Field(
        None,
        ge=1,
        description="Seconds after which an unsettled reservation is given back (Redis counters); default: "
        "the longest connect_timeout + headers_timeout + read_timeout of the upstreams.",
    )


class ReportingConfig(_Section):
    retention_days: int = Field(
        90,
        ge=1,
        description="Days of usage events kept: reports reach no further back; older events are deleted.",
    )
    memory_events_max: int = Field(
        1_000_000,
        ge=1000,
        description="With events in memory, the most kept (~370 B each); past it the oldest are dropped, "
        "counted and logged.",
    )


class ProxyConfig(_Section):
    """The proxy's configuration. See README "Configuration" for every key."""

    server: ServerConfig = ServerConfig()
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    storage: StorageConfig = StorageConfig()
    prices: dict[str, PriceOverride] = Field(default_factory=dict)
    sinks: list[SinkConfig] = Field(default_factory=list)
    notifiers: dict[str, NotifierConfig] = Field(default_factory=dict)
    budgets: BudgetsConfig = BudgetsConfig()
    reporting: ReportingConfig = ReportingConfig()

    @model_validator(mode="after")
    def _check_upstreams(self) -> ProxyConfig:
        for family, members in (
            (
                "OpenAI-format (api = openai or azure)",
                [n for n, u in self.upstreams.items() if u.api != "anthropic"],
            ),
            ('api = "anthropic"', [n for n, u in self.upstreams.items() if u.api == "anthropic"]),
        ):
            defaults = [name for name in members if self.upstreams[name].default]
            if len(defaults) > 1:
                raise ValueError(
                    f"only one upstream may be default = true among the {family} ones, got {defaults}"
                )
        for name in self.upstreams:
            if not name or "/" in name:
                raise ValueError(f"upstream name {name!r} must be non-empty and contain no '/'")
        return self

    @property
    def default_upstream(self) -> str | None:
        """The upstream bare model names of OpenAI-format calls go to: the one marked default (not an
        `api = "anthropic"` one), else the only upstream."""
        for name, up in self.upstreams.items():
            if up.default and up.api != "anthropic":
                return name
        if len(self.upstreams) == 1:
            return next(iter(self.upstreams))
        return None

    @property
    def default_anthropic_upstream(self) -> str | None:
        """The upstream bare model names of Anthropic Messages calls go to: the `api = "anthropic"` one
        marked default, else the only one."""
        anthropic = [name for name, up in self.upstreams.items() if up.api == "anthropic"]
        marked = [name for name in anthropic if self.upstreams[name].default]
        if marked:
            return marked[0]
        return anthropic[0] if len(anthropic) == 1 else None

    @property
    def open_mode(self) -> bool:
        return not self.api_keys

    def check_workers(self, workers: int) -> None:
        """Refuse `workers` > 1 when a backend is private to one process: each worker would hold its own
        identities, budgets, spend or events, and enforce and report only a part of the traffic."""
        if workers <= 1:
            return
        storage = self.storage
        private = []
        if not storage.state.startswith(("postgresql://", "postgres://")):
            private.append(f'state = "{storage.state}" (use "postgresql://...")')
        if not storage.events.startswith(("postgresql://", "postgres://")):
            private.append(f'events = "{storage.events}" (use "postgresql://...")')
        if storage.counters == "memory":
            private.append('counters = "memory" (use "redis://...")')
        if storage.spool not in ("auto", "off"):
            private.append(f'spool = "{storage.spool}" (one directory cannot serve several processes; "off")')
        if private:
            changes = ", ".join(private)
            raise ConfigError(
                f"--workers {workers} needs state all workers share; change [storage] {changes}"
            )

    def check_bind(self) -> None:
        """Refuse open mode (no keys) on a non-loopback address."""
        if self.open_mode and not _is_loopback(self.server.host):
            raise ConfigError(
                f"no [[api_keys]] configured: open mode only binds to loopback, not {self.server.host!r}"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


DEFAULT_UPSTREAM_KEY_ENV = "OPENAI_API_KEY"


def load_config(
    path: str | Path | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    upstream: str | None = None,
    upstream_key_env: str | None = None,
) -> ProxyConfig:
    """Read the TOML file (or `$ORQ_PROXY_CONFIG`), then apply CLI overrides.

    `upstream` adds (or replaces) an upstream named `openai` and makes it the default. Its credential is
    the variable `upstream_key_env` names; without one, what the file gives it, else `OPENAI_API_KEY` (as
    the openai SDK reads it).
    """
    path = path or os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    server = dict(data.get("server") or {})
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    data["server"] = server
    if upstream is not None:
        ups = {name: {**up, "default": False} for name, up in (data.get("upstreams") or {}).items()}
        entry = {**ups.get("openai", {}), "base_url": upstream, "default": True}
        if upstream_key_env is not None:
            entry.pop("api_key", None)
            entry["api_key_env"] = upstream_key_env
        elif not entry.get("api_key") and not entry.get("api_key_env"):
            entry["api_key_env"] = DEFAULT_UPSTREAM_KEY_ENV
        ups["openai"] = entry
        data["upstreams"] = ups
    elif upstream_key_env is not None:
        raise ConfigError("--upstream-key-env needs --upstream (in a config file, set api_key_env)")
    try:
        return ProxyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_format_errors(exc)}") from exc
