"""The README's Identities snippets run as written against a real proxy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openai
from orq_ai_sdk import Orq

from orq_proxy.testing.fake_upstream import FakeUpstream

README = Path(__file__).resolve().parents[2] / "README.md"


def identities_snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index("\n## Identities\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_identity_snippets(proxy_factory: Any, fake: FakeUpstream) -> None:
    """The attribution snippet upserts user_123; the list snippet finds her with her metrics."""
    calls, listing = identities_snippets()
    keys = [{"key": "sk-admin", "admin": True}, {"key": "sk-your-proxy-key"}]
    _, server = proxy_factory({"api_keys": keys})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-your-proxy-key", max_retries=0)
    exec(calls, {"client": client})
    scope: dict[str, Any] = {"Orq": Orq}
    exec(listing.replace("http://127.0.0.1:8080", server.url), scope)
    assert [i.external_id for i in scope["page"].data] == ["user_123"]
    assert len(fake.requests) == 2
