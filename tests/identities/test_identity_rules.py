"""One set of identity rules, two surfaces: each rule gives the same field and the same words on a proxied
call's `orq.identity` (the real `openai` client) and on `/v2/identities` create and update (httpx, so
that wrong types reach the server: the orq SDK would refuse them on the client side)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from orq_proxy.app import OrqProxy
from orq_proxy.identities.rules import IdentityRuleError, check_metadata_objects, check_tags
from orq_proxy.testing.servers import ServerThread

ADMIN = "sk-rules-admin"
KEYS = [{"key": ADMIN, "id": "rules-admin", "admin": True}]
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
TARGET = "rules-target"  # an identity that exists, for PATCH
MISSING = object()  # the field is left out


@dataclass(frozen=True, repr=False)
class Rule:
    """A bad value of one field (the management API's name); `item` is the path below the field (`[1]`)
    when the error names an element."""

    field: str
    value: Any
    rule: str
    item: str = ""

    def __repr__(self) -> str:  # the test id
        value = "(missing)" if self.value is MISSING else repr(self.value)
        return f"{self.field}={value[:24]}"


# The proxied surface's names for the fields the management API calls `external_id` and `avatar_url`.
ROUTER_NAME = {"external_id": "id", "avatar_url": "logo_url"}

RULES = [
    Rule("external_id", MISSING, "is required"),
    Rule("external_id", None, "is required"),
    Rule("external_id", 42, "must be a string"),
    Rule("external_id", ["u"], "must be a string"),
    Rule("external_id", "", "must be 1 to 255 characters and not blank"),
    Rule("external_id", "   ", "must be 1 to 255 characters and not blank"),
    Rule("external_id", "x" * 256, "must be at most 255 characters, got 256"),
    Rule("display_name", 5, "must be a string"),
    Rule("display_name", "x" * 256, "must be at most 255 characters, got 256"),
    Rule("email", 3, "must be a string"),
    Rule("email", "nope", "must be an email address like name@example.com"),
    Rule("email", "a@" + "b" * 300, "must be at most 254 characters, got 302"),
    Rule("avatar_url", 1, "must be a string"),
    Rule("avatar_url", "https://x/" + "a" * 2039, "must be at most 2048 characters, got 2049"),
    Rule("metadata", {f"k{i}": i for i in range(21)}, "at most 20 keys are allowed, got 21"),
    Rule("tags", "vip", "must be a list of strings"),
    Rule("tags", [f"t{i}" for i in range(11)], "at most 10 tags are allowed, got 11"),
    Rule("tags", ["ok", 5], "must be a non-empty string", "[1]"),
    Rule("tags", ["ok", ""], "must be a non-empty string", "[1]"),
    Rule("tags", ["ok", None], "must be a non-empty string", "[1]"),
    Rule("tags", ["ok", "x" * 101], "must be at most 100 characters, got 101", "[1]"),
]


@pytest.fixture(scope="module")
def server(module_proxy_factory: Callable[..., tuple[OrqProxy, ServerThread]]) -> ServerThread:
    """One proxy for the whole table: a refused request changes nothing."""
    return module_proxy_factory({"api_keys": KEYS})[1]


@pytest.fixture(scope="module")
def http(server: ServerThread) -> Iterator[httpx.Client]:
    """The management API's client, with an existing identity to PATCH."""
    headers = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
        created = http.post("/v2/identities", json={"external_id": TARGET})
        assert created.status_code == 201, created.text
        yield http


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0) as client:
        yield client


def with_field(base: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    body = dict(base)
    if value is MISSING:
        body.pop(name, None)
    else:
        body[name] = value
    return body


def proxied_error(client: openai.OpenAI, identity: dict[str, Any]) -> dict[str, Any]:
    """The 400 a chat completion carrying `orq.identity` gets, as its `error` object."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_body={"orq": {"identity": identity}}
        )
    error: dict[str, Any] = info.value.response.json()["error"]
    assert error["code"] == "invalid_identity" and error["type"] == "invalid_request_error"
    return error


def orq_message(response: httpx.Response) -> str:
    """The message of a 400 in orq's shape (gRPC code 3, INVALID_ARGUMENT)."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == 3
    message: str = body["message"]
    return message


@pytest.mark.parametrize("case", RULES, ids=repr)
def test_each_rule_names_the_same_field_on_both_surfaces(
    client: openai.OpenAI, http: httpx.Client, case: Rule
) -> None:
    """The proxied call names `orq.identity.<field>` (its own field name), the API `<field>`; the rule
    after the colon is the same text on both."""
    router_field = ROUTER_NAME.get(case.field, case.field)
    identity = with_field({"id": "rules-user"}, router_field, case.value)
    param = f"orq.identity.{router_field}{case.item}"
    error = proxied_error(client, identity)
    assert (error["param"], error["message"]) == (param, f"{param}: {case.rule}")

    expected = f"{case.field}{case.item}: {case.rule}"
    create = with_field({"external_id": "rules-user"}, case.field, case.value)
    assert orq_message(http.post("/v2/identities", json=create)) == expected
    if case.field != "external_id":  # not settable on update
        update = with_field({}, case.field, case.value)
        assert orq_message(http.patch(f"/v2/identities/{TARGET}", json=update)) == expected
    assert http.get("/v2/identities/rules-user").status_code == 404  # neither stored it


@pytest.mark.parametrize(
    ("metadata", "proxied", "managed"),
    [
        ([{"plan": "pro"}, {"seats": 3}], None, "metadata: must be an object"),
        (
            [{f"k{i}": i} for i in range(21)],
            "orq.identity.metadata: at most 20 keys are allowed, got 21",
            "metadata: must be an object",
        ),
        ([{"a": 1}, "b"], "orq.identity.metadata[1]: must be an object", "metadata: must be an object"),
        (
            "plan=pro",
            "orq.identity.metadata: must be an object or a list of objects",
            "metadata: must be an object",
        ),
    ],
)
def test_metadata_shapes_differ_by_surface(
    client: openai.OpenAI, http: httpx.Client, metadata: Any, proxied: str | None, managed: str
) -> None:
    """orq sends a body identity's metadata as a list of objects (merged, then the same 20-key limit);
    the management API takes only an object (spec §2.3 vs §5.1)."""
    identity = {"id": "rules-metadata", "metadata": metadata}
    if proxied is None:
        completion = client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_body={"orq": {"identity": identity}}
        )
        assert completion.choices
    else:
        assert proxied_error(client, identity)["message"] == proxied
    body = {"external_id": "rules-metadata", "metadata": metadata}
    assert orq_message(http.post("/v2/identities", json=body)) == managed


def test_rule_error_carries_field_and_rule() -> None:
    """`IdentityRuleError` keeps the path and the rule apart, and is no `ValueError`: pydantic would turn
    one raised in a validator into its own message."""
    with pytest.raises(IdentityRuleError) as info:
        check_tags(["a", "b" * 101], "tags")
    assert (info.value.field, info.value.rule, str(info.value)) == (
        "tags[1]",
        "must be at most 100 characters, got 101",
        "tags[1]: must be at most 100 characters, got 101",
    )
    assert not isinstance(info.value, ValueError)
    assert check_metadata_objects([{"plan": "pro"}, {"plan": "ent", "n": 1}], "metadata") == {
        "plan": "ent",
        "n": 1,
    }
