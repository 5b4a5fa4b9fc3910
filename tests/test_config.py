"""Config: TOML file, environment, CLI overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from orq_proxy.auth import hash_key, keyring_from_config
from orq_proxy.config import ConfigError, ProxyConfig, load_config

TOML = f"""
[server]
host = "127.0.0.1"
port = 9999

[upstreams.openai]
base_url = "https://api.openai.com/v1/"
api_key_env = "ORQ_TEST_UPSTREAM_KEY"
default = true

[upstreams.local]
base_url = "http://127.0.0.1:9000/v1"

[[api_keys]]
key = "sk-plain"
owner = "user_123"
admin = true

[[api_keys]]
key_sha256 = "{hash_key("sk-hashed")}"
workspace = "ws2"
project = "p2"
id = "hashed"

[storage]
state = "memory"
events = "duckdb://:memory:"
"""


def test_toml_file_with_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every contract key loads; CLI flags override the file; credentials come from the env var."""
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    monkeypatch.setenv("ORQ_TEST_UPSTREAM_KEY", "sk-up")
    config = load_config(path, port=7000)
    assert config.server.port == 7000 and config.server.host == "127.0.0.1"
    assert config.upstreams["openai"].base_url == "https://api.openai.com/v1"
    assert config.upstreams["openai"].credential() == "sk-up"
    assert config.default_upstream == "openai"
    ring = keyring_from_config(config)
    admin = ring.authenticate("sk-plain")
    assert admin is not None and admin.admin and admin.owner == "user_123" and admin.workspace == "default"
    other = ring.authenticate("sk-hashed")
    assert other is not None and (other.workspace, other.project, other.key_id) == ("ws2", "p2", "hashed")
    assert ring.authenticate("sk-nope") is None and ring.authenticate(None) is None


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ORQ_PROXY_CONFIG` is read when no --config is given."""
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    monkeypatch.setenv("ORQ_PROXY_CONFIG", str(path))
    assert load_config().server.port == 9999


def test_upstream_flag_alone_is_enough() -> None:
    """`--upstream URL` alone gives one default upstream and open mode."""
    config = load_config(upstream="http://127.0.0.1:1234/v1")
    assert config.default_upstream == "openai" and config.open_mode
    config.check_bind()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nprot = 1\n", "server.prot"),
        ("[upstreams.a]\nbase_url = 'ftp://x'\n", "base_url must start with http"),
        ("[upstreams.a]\nbase_url = 'http://x/v1?k=1'\n", "base_url must not have a query"),
        ("[upstreams.a]\nbase_url = 'http://x:70000/v1'\n", "invalid port"),
        ("[[api_keys]]\nworkspace = 'w'\n", "exactly one of key or key_sha256"),
        ("[server]\nport = 'x'\n", "server.port"),
        (
            "[upstreams.a]\nbase_url='http://a'\ndefault=true\n[upstreams.b]\nbase_url='http://b'\ndefault=true\n",
            "only one upstream",
        ),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    """Invalid config raises ConfigError whose message names the key and the rule."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert needle in str(info.value)


def test_missing_file_and_bad_digest(tmp_path: Path) -> None:
    """A missing file and a malformed key digest are clear errors."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")
    config = ProxyConfig.model_validate({"api_keys": [{"key_sha256": "abc"}]})
    with pytest.raises(ValueError, match="64 hex"):
        keyring_from_config(config)


def test_open_mode_refuses_public_bind() -> None:
    """Without keys, binding beyond loopback is refused."""
    with pytest.raises(ConfigError, match="loopback"):
        load_config(upstream="http://x/v1", host="0.0.0.0").check_bind()
    load_config(upstream="http://x/v1", host="::1").check_bind()


def test_prices_as_accepted(tmp_path: Path) -> None:
    """`prices_as` names a genai-prices provider; left out, it is None (priced by the upstream's name)."""
    path = tmp_path / "c.toml"
    path.write_text(
        "[upstreams.litellm]\nbase_url = 'http://127.0.0.1:4000/v1'\nprices_as = 'openai'\n"
        "[upstreams.vllm]\nbase_url = 'http://127.0.0.1:8000/v1'\n"
    )
    config = load_config(path)
    assert config.upstreams["litellm"].prices_as == "openai"
    assert config.upstreams["vllm"].prices_as is None


@pytest.mark.parametrize("value", ["opnai", "OpenAI", ""])
def test_unknown_prices_as_names_the_key(tmp_path: Path, value: str) -> None:
    """A `prices_as` that is no genai-prices provider id is a config error naming the key and the ids."""
    path = tmp_path / "bad.toml"
    path.write_text(f"[upstreams.litellm]\nbase_url = 'http://127.0.0.1:4000/v1'\nprices_as = '{value}'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "upstreams.litellm.prices_as" in message and f"unknown genai-prices provider {value!r}" in message
    assert "anthropic" in message and "openai" in message
