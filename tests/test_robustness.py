"""Bad input never crashes anything: every wrong field is a 4xx naming the field, in its surface's shape.

One real proxy on a socket (in front of the fake upstream) takes property-based fuzzing (hypothesis,
bounded and derandomized) and hand-picked tables on both surfaces:

- proxied (`/v1`, `/v2/router`, `/v3/router`): OpenAI's `{"error": {"message", "type", "code", "param"}}`;
- management (`/v2/identities`, `/v2/budgets`, `/v2/reporting`): orq's `{"message", "code"}`.

After every test the server must have logged no traceback and no error (the `orq_proxy` and
`uvicorn.error` loggers are watched) and must still answer `/healthz`. A workspace budget is in place so
every proxied request also goes through the budget gate's estimate and reservation.

Inputs that once crashed the budget slice have their own regression tests at the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ulid import ULID

from orq_proxy.app import OrqProxy, build_app
from orq_proxy.config import ProxyConfig
from orq_proxy.proxy.jsonbody import MAX_DEPTH
from orq_proxy.testing.servers import ServerThread

UPSTREAM_KEY = "sk-upstream-secret"
ADMIN_KEY = "sk-robust-admin"
CHAT = "/v1/chat/completions"
PROXY_BODY_LIMIT = 4 * 1024 * 1024
MESSAGES = [{"role": "user", "content": "hello there"}]

# CI runs a fixed, fast sample; explore more locally with e.g. ORQ_FUZZ_EXAMPLES=2000 ORQ_FUZZ_RANDOM=1.
FUZZ = settings(
    max_examples=int(os.environ.get("ORQ_FUZZ_EXAMPLES", "60")),
    deadline=None,
    derandomize=os.environ.get("ORQ_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# One sample of every JSON type (and a few shapes of each), for "wrong type" tables.
SAMPLES: list[Any] = [0, 1.5, -7, True, False, "text", "", [], ["a"], [1], {}, {"a": 1}, None]


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


# ---------------------------------------------------------------------------------------------------------
# The server and what it logs


class _Problems(logging.Handler):
    """Keeps every record that carries a traceback or is logged at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)

    def report(self) -> str:
        return "\n".join(
            f"{r.name} {r.levelname}: {r.getMessage()}"
            + (f" [{type(r.exc_info[1]).__name__}: {r.exc_info[1]}]" if r.exc_info else "")
            for r in self.records
        )


_WATCHED = ("orq_proxy", "uvicorn.error")


@dataclass
class Stack:
    app: OrqProxy
    server: ServerThread
    http: httpx.Client
    problems: _Problems
    identity: str  # external_id of an identity that exists
    budget_id: str  # an identity-scoped budget nobody's requests match (safe to PATCH)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def reconnect(self) -> None:
        self.http.close()
        self.http = _client(self.server)


def _client(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


@pytest.fixture(scope="module")
def stack(fake_server: tuple[Any, ServerThread]) -> Iterator[Stack]:
    config = ProxyConfig.model_validate(
        {
            "upstreams": {
                "openai": {"base_url": fake_server[1].url + "/v1", "api_key": UPSTREAM_KEY, "default": True}
            },
            "api_keys": [{"key": ADMIN_KEY, "workspace": "ws", "project": "p", "admin": True}],
            "server": {"max_body_bytes": PROXY_BODY_LIMIT},
        }
    )
    app = build_app(config)
    server = ServerThread(app).start()
    # Attached after every server configured logging (uvicorn's dictConfig drops a logger's handlers).
    problems = _Problems()
    for name in _WATCHED:
        logging.getLogger(name).addHandler(problems)
    http = _client(server)
    stack = None
    try:
        budget = http.post(
            "/v2/budgets", json={"scope": {"workspace": {}}, "limits": {"amount": 1_000_000.0}}
        )
        assert budget.status_code == 200, budget.text
        target = http.post(
            "/v2/budgets",
            json={"scope": {"identity": {"identity_external_id": "patch-target"}}, "limits": {"amount": 5.0}},
        )
        assert target.status_code == 200, target.text
        created = http.post("/v2/identities", json={"external_id": "robust-user"})
        assert created.status_code == 201, created.text
        stack = Stack(app, server, http, problems, "robust-user", target.json()["budget"]["budgetId"])
        yield stack
    finally:
        (stack.http if stack else http).close()
        server.stop()  # flushes the sink bus: a sink failing on some stored value would log now
        for name in _WATCHED:
            logging.getLogger(name).removeHandler(problems)
    assert not problems.records, problems.report()


@pytest.fixture(autouse=True)
def healthy(stack: Stack) -> Iterator[Stack]:
    """Every test: no traceback or error logged, and the server still answers."""
    stack.problems.records.clear()
    yield stack
    assert stack.call("GET", "/healthz").status_code == 200
    ok = stack.call("POST", CHAT, json={"model": "gpt-4o", "messages": MESSAGES})
    assert ok.status_code == 200, ok.text
    assert not stack.problems.records, stack.problems.report()


# ---------------------------------------------------------------------------------------------------------
# Shapes


def openai_error(r: httpx.Response, *names: str, status: int | None = None) -> dict[str, Any]:
    """Assert a 4xx in OpenAI's shape whose message or param names each of `names`."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and "code" in error and "param" in error
    for name in names:
        assert name in error["message"] or name == error["param"], (name, error)
    return error  # type: ignore[no-any-return]


def orq_error(r: httpx.Response, *names: str, status: int | None = None) -> dict[str, Any]:
    """Assert a 4xx in orq's shape (`message`, gRPC `code`) whose message names each of `names`."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["code"], int) and not isinstance(body["code"], bool)
    for name in names:
        assert name in body["message"], (name, body)
    return body  # type: ignore[no-any-return]


def ok_or_openai_error(r: httpx.Response) -> None:
    if r.status_code >= 400:
        openai_error(r)
    else:
        assert r.status_code < 300, (r.status_code, r.text)


def ok_or_orq_error(r: httpx.Response) -> None:
    if r.status_code >= 400:
        orq_error(r)
    else:
        assert r.status_code < 300, (r.status_code, r.text)


# ---------------------------------------------------------------------------------------------------------
# Strategies

# Short text (unpaired surrogates have their own tests).
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=10,
)

# What json.dumps can write but the proxy must refuse: NaN/Infinity, lone surrogates (as \\ud800
# escapes), and nesting past MAX_DEPTH.
_WILD_TEXT = st.text(st.characters(categories=("Cs", "Lo", "So", "Zl")), max_size=4)
_WILD_SCALARS = (
    st.sampled_from([float("nan"), float("inf"), -float("inf"), "\ud800", "a\udfff", 10**400])
    | st.floats()
    | _WILD_TEXT
    | st.integers(min_value=-(10**400), max_value=10**400)
)
WILD = st.recursive(
    _WILD_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_WILD_TEXT, inner, max_size=3),
    max_leaves=6,
) | st.integers(min_value=MAX_DEPTH - 4, max_value=MAX_DEPTH + 4).map(lambda n: json.loads("[" * n + "]" * n))


def _object_of(fields: list[str], values: st.SearchStrategy[Any] = JSON) -> st.SearchStrategy[dict[str, Any]]:
    """Objects whose keys are mostly the real field names (so validation gets past the unknown-key check)."""
    return st.dictionaries(st.sampled_from(fields) | _TEXT, values, max_size=6)


def _timestamps() -> st.SearchStrategy[str]:
    # RFC 3339 strings of any date with any offset, the edges of datetime's range included.
    return st.builds(
        lambda when, offset: when.replace(tzinfo=UTC).isoformat().replace("+00:00", offset),
        st.datetimes(),
        st.sampled_from(["Z", "+00:00", "+05:30", "-08:00", ""]),
    )


def _recent(hours: float) -> str:
    return (datetime.now(UTC) - timedelta(hours=hours)).isoformat()


# ---------------------------------------------------------------------------------------------------------
# Proxied surface: fuzz

PROXY_PATHS = [
    "/v1/chat/completions",
    "/v2/router/chat/completions",
    "/v3/router/chat/completions",
    "/v3/router/responses",
    "/v1/responses",
    "/v1/completions",
    "/v1/embeddings",
]
PROXY_FIELDS = [
    "model",
    "messages",
    "input",
    "prompt",
    "instructions",
    "stream",
    "stream_options",
    "metadata",
    "orq",
    "identity",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "tools",
]
_MODELS = st.sampled_from(["gpt-4o", "openai/gpt-4o-mini", "gpt-4.1"]) | JSON
_IDENTITY = _object_of(["id", "display_name", "email", "logo_url", "metadata", "tags"]) | JSON


@FUZZ
@given(
    path=st.sampled_from(PROXY_PATHS),
    body=st.fixed_dictionaries(
        {"model": _MODELS},
        optional={
            "messages": st.just(MESSAGES) | JSON,
            "stream": st.booleans() | JSON,
            "stream_options": st.fixed_dictionaries({"include_usage": JSON}) | JSON,
            "orq": st.fixed_dictionaries({"identity": _IDENTITY}) | JSON,
            "identity": _IDENTITY,
            "metadata": st.dictionaries(_TEXT, _TEXT | JSON, max_size=3) | JSON,
            "max_tokens": JSON,
            "input": JSON,
            "tools": JSON,
        },
    ),
)
def test_fuzz_proxied_json_bodies(stack: Stack, path: str, body: dict[str, Any]) -> None:
    """Any JSON object body on any proxied API is answered 2xx or 4xx in OpenAI's shape."""
    ok_or_openai_error(stack.call("POST", path, json=body))


@FUZZ
@given(path=st.sampled_from(PROXY_PATHS), field=st.sampled_from(PROXY_FIELDS), value=WILD)
def test_fuzz_proxied_wild_json(stack: Stack, path: str, field: str, value: Any) -> None:
    """NaN, Infinity, huge integers, lone surrogates and deep nesting in any field: 2xx or 400, never 5xx."""
    body = {"model": "gpt-4o", "messages": MESSAGES, field: value}
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes out as a \\ud800 escape
    ok_or_openai_error(stack.call("POST", path, content=raw, headers={"content-type": "application/json"}))


@FUZZ
@given(
    raw=st.binary(max_size=64)
    | JSON.map(lambda v: json.dumps(v).encode())
    | st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(
            [b"{", b"[", b'{"model":', b'{"model":"gpt-4o","messages":[', b'{"orq":{"identity":']
        ),
        st.binary(max_size=16),
    ),
    content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream", None]),
)
def test_fuzz_proxied_raw_bodies(stack: Stack, raw: bytes, content_type: str | None) -> None:
    """Arbitrary bytes (broken JSON, non-objects, binary) under any content type: never a 5xx."""
    headers = {"content-type": content_type} if content_type else {}
    ok_or_openai_error(stack.call("POST", CHAT, content=raw, headers=headers))


# ---------------------------------------------------------------------------------------------------------
# Proxied surface: tables


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"42", "JSON object"),
        (b"null", "JSON object"),
        (b"{not json", "not valid JSON"),
        (b'{"model": "gpt-4o", "messages": [{"content": "\xff"}]}', "UTF-8"),
        (b"\xef\xbb\xbf\xff\xfe", "UTF-8"),
        (b'{"model": "gpt-4o", "max_tokens": NaN}', "NaN"),
        (b'{"model": "gpt-4o", "max_tokens": Infinity}', "Infinity"),
        (b'{"model": "gpt-4o", "temperature": -Infinity}', "Infinity"),
        (b'{"model": "gpt-4o", "max_tokens": 1e999}', "out of range"),
        (b'{"model": "gpt-4o", "max_tokens": 1' + b"0" * 5000 + b"}", "4300 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b'{"model": "gpt-4o", "tools": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "tools"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
        (b'{"model": "gpt-4o", "metadata": {"\\udfff": "x"}}', "surrogate"),
    ],
)
def test_proxied_bodies_that_are_not_acceptable_json(stack: Stack, raw: bytes, needle: str) -> None:
    """Non-objects, invalid UTF-8, NaN/Infinity, huge numbers, deep nesting, lone surrogates: 400."""
    r = stack.call("POST", CHAT, content=raw, headers={"content-type": "application/json"})
    error = openai_error(r, status=400)
    assert needle in error["message"] or needle == error["param"], error
    assert error["code"] == "invalid_json"


def test_proxied_acceptable_edge_bodies(stack: Stack) -> None:
    """What is valid JSON is still forwarded: nesting at the limit, huge ints, paired surrogates, 1 MB text."""
    nested: Any = []
    for _ in range(MAX_DEPTH - 4):  # body, messages, message: 3 levels; content lists: 4 to MAX_DEPTH
        nested = [nested]
    bodies = [
        {"model": "gpt-4o", "messages": [{"role": "user", "content": nested}]},
        {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10**300},
        {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 1e300, "temperature": -0.0},
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 1_000_000}]},
    ]
    for body in bodies:
        r = stack.call("POST", CHAT, json=body)
        assert r.status_code in (200, 429), r.text[:300]  # a giant max_tokens may exceed the budget: 429
        if r.status_code == 429:
            openai_error(r, status=429)
    paired = b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\ud83d\\ude00"}]}'
    r = stack.call("POST", CHAT, content=paired, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "model", [1, 1.5, True, [], ["gpt-4o"], {}, {"id": "gpt-4o"}, "", "nope/gpt-4o", "/", "m" * 513]
)
def test_proxied_model_of_wrong_type_or_provider(stack: Stack, model: Any) -> None:
    """`model` must be a non-empty string (at most 512 characters: it becomes a metrics label and part of
    every usage event) naming a configured provider, else 400 with param `model`."""
    error = openai_error(stack.call("POST", CHAT, json={"model": model, "messages": MESSAGES}), status=400)
    assert error["param"] == "model"


@pytest.mark.parametrize("value", [s for s in SAMPLES if not isinstance(s, bool) and s is not None])
def test_proxied_stream_of_wrong_type(stack: Stack, value: Any) -> None:
    """`stream` is a boolean or absent: metering's usage injection depends on it."""
    r = stack.call("POST", CHAT, json={"model": "gpt-4o", "messages": MESSAGES, "stream": value})
    assert openai_error(r, status=400)["param"] == "stream"


@pytest.mark.parametrize("options", [*SAMPLES, {"include_usage": "yes"}, {"include_usage": None}])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_proxied_stream_options_of_any_type(stack: Stack, options: Any, path: str) -> None:
    """Metering injects include_usage into streams: a non-object `stream_options` must not crash it."""
    body = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "prompt": "hi",
        "stream": True,
        "stream_options": options,
    }
    r = stack.call("POST", path, json=body)
    ok_or_openai_error(r)
    if r.status_code == 200 and not (isinstance(options, dict) and options.get("include_usage") is True):
        assert '"usage":{' not in r.text  # the client did not ask: the injected usage chunk stays hidden


@pytest.mark.parametrize(
    "metadata", [*SAMPLES, {"team": 5}, {"team": {"x": 1}}, {str(i): "v" for i in range(500)}]
)
def test_proxied_metadata_of_any_type(stack: Stack, metadata: Any) -> None:
    """`metadata` is read only for string pairs (budget CEL, events); anything else is forwarded as is."""
    r = stack.call("POST", CHAT, json={"model": "gpt-4o", "messages": MESSAGES, "metadata": metadata})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("orq", [s for s in SAMPLES if not isinstance(s, dict) and s is not None])
def test_proxied_orq_of_wrong_type(stack: Stack, orq: Any) -> None:
    """`orq` must be an object (or null)."""
    r = stack.call("POST", CHAT, json={"model": "gpt-4o", "messages": MESSAGES, "orq": orq})
    assert openai_error(r, status=400)["param"] == "orq"


# (field, wrong values) of a body identity; each must be a 400 whose param is `<where>.<field>`.
IDENTITY_FIELD_CASES: list[tuple[str, list[Any]]] = [
    ("id", [0, 1.5, True, [], ["u"], {}, "", "   ", "x" * 256]),
    ("display_name", [0, True, [], {}, "x" * 256]),
    ("email", [0, False, [], {}, "not-an-email", "a@" + "b" * 300]),
    ("logo_url", [0, True, [], {"u": 1}, "x" * 3000]),
    ("metadata", [0, True, "text", [1], ["a"], {f"k{i}": i for i in range(21)}]),
    ("tags", [0, True, "text", {}, [1], [""], [None], ["t"] * 11, ["x" * 101]]),
]


@pytest.mark.parametrize(
    ("where", "path"),
    [
        ("orq.identity", "/v2/router/chat/completions"),
        ("orq.contact", "/v2/router/chat/completions"),
        ("identity", "/v3/router/responses"),
        ("identity", "/v1/chat/completions"),
    ],
)
def test_proxied_identity_fields_of_wrong_type(stack: Stack, where: str, path: str) -> None:
    """Every identity field, every wrong type or limit: 400 naming `orq.identity.<field>` (or the path used)."""
    for field, values in IDENTITY_FIELD_CASES:
        for value in values:
            identity = {"id": "robust-body-identity", field: value}
            body: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "input": "hi"}
            if where == "identity":
                body["identity"] = identity
            else:
                body["orq"] = {where.split(".")[1]: identity}
            error = openai_error(stack.call("POST", path, json=body), status=400)
            assert error["param"].startswith(f"{where}.{field}"), (field, value, error)
            assert error["code"] == "invalid_identity"


@pytest.mark.parametrize("identity", [s for s in SAMPLES if not isinstance(s, dict) and s is not None])
def test_proxied_identity_that_is_not_an_object(stack: Stack, identity: Any) -> None:
    """`orq.identity` and a top-level `identity` must be objects with an `id`."""
    r = stack.call(
        "POST", CHAT, json={"model": "gpt-4o", "messages": MESSAGES, "orq": {"identity": identity}}
    )
    assert openai_error(r, status=400)["param"] == "orq.identity"
    r = stack.call("POST", CHAT, json={"model": "gpt-4o", "messages": MESSAGES, "identity": identity})
    assert openai_error(r, status=400)["param"] == "identity"


def test_proxied_nulls_mean_absent(stack: Stack) -> None:
    """null for `orq`, `orq.identity`, `identity`, `stream`, `stream_options`, `metadata` and identity fields."""
    bodies: list[dict[str, Any]] = [
        {"orq": None},
        {"orq": {"identity": None}},
        {"identity": None},
        {"stream": None, "stream_options": None, "metadata": None},
        {"orq": {"identity": {"id": "robust-nulls", **dict.fromkeys(("display_name", "email", "tags"))}}},
        {"identity": {"id": "robust-nulls", "metadata": None, "logo_url": None}},
    ]
    for extra in bodies:
        r = stack.call("POST", CHAT, json={"model": "gpt-4o", "messages": MESSAGES, **extra})
        assert r.status_code == 200, (extra, r.text)


def test_proxied_non_json_bodies_and_content_types(stack: Stack) -> None:
    """Multipart, form, empty and mislabelled bodies are forwarded opaquely: the upstream's 4xx, or a 2xx."""
    cases: list[dict[str, Any]] = [
        {"files": {"file": ("a.txt", b"abc")}},
        {"data": {"model": "gpt-4o"}},
        {"content": b""},
        {"content": b"", "headers": {"content-type": "application/json"}},
        {
            "content": json.dumps({"model": "gpt-4o", "messages": MESSAGES}),
            "headers": {"content-type": "text/plain"},
        },
        {"content": b"\x00\x01\x02", "headers": {"content-type": "application/octet-stream"}},
    ]
    for kwargs in cases:
        ok_or_openai_error(stack.call("POST", CHAT, **kwargs))
    r = stack.call(
        "POST", "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}, data={"model": "whisper-1"}
    )
    ok_or_openai_error(r)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v2/router/chat/completions", "/v3/router/responses"]
)
def test_proxied_other_methods_on_post_routes(stack: Stack, method: str, path: str) -> None:
    """Wrong methods reach the upstream, which answers 4xx (OpenAI's own `Invalid URL`); never a 5xx."""
    r = stack.call(method, path)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if method != "HEAD":
        openai_error(r)


@pytest.mark.parametrize(
    "raw_path",
    [
        "/v1/chat/completions%20x",
        "/v1/%C3%A9",
        "/v1/a%0d%0aX-Injected:%201",
        "/v1/a%00b",
        "/v1/a%ff",
    ],
)
def test_proxied_odd_paths_are_forwarded_escaped(stack: Stack, raw_path: str) -> None:
    """Percent-escapes stay escaped upstream: no raw CR/LF/NUL/space can reach the upstream request line."""
    url = httpx.URL(stack.server.url + raw_path)
    r = stack.http.post(url, json={"model": "gpt-4o", "messages": MESSAGES})
    openai_error(r, status=404)  # the fake upstream's `Invalid URL`, in OpenAI's shape
    assert "Invalid URL" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "raw_path", ["/v1/%2e%2e/x", "/v2/router/%2E%2e/x", "/v3/router/x/%2e", "/v1/%252e%252e/x"]
)
def test_proxied_dot_segment_paths_are_400(stack: Stack, raw_path: str) -> None:
    """A `.`/`..` segment, encoded or not, is refused (it would reach the upstream as written): a 400 in
    OpenAI's shape naming the path."""
    r = stack.http.post(
        httpx.URL(stack.server.url + raw_path), json={"model": "gpt-4o", "messages": MESSAGES}
    )
    assert openai_error(r, status=400)["code"] == "invalid_path"
    assert raw_path in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------
# Management API: fuzz

IDENTITY_FIELDS = ["external_id", "display_name", "email", "avatar_url", "tags", "metadata"]
BUDGET_FIELDS = ["scope", "match", "limits", "rate_limit", "is_active", "expires_at", "alerts", "time_zone"]
BUDGET_UPDATE_FIELDS = [
    "limits",
    "rate_limit",
    "is_active",
    "expires_at",
    "clear_expires_at",
    "match",
    "alerts",
    "clear_alerts",
]
REPORT_FIELDS = [
    "metric",
    "from",
    "to",
    "grain",
    "group_by",
    "filters",
    "limit",
    "time_zone",
    "include_totals",
    "mode",
    "sort",
]


def _wild_targets() -> dict[str, tuple[str, str, dict[str, Any], list[str]]]:
    """name -> (method, path, a valid body, the fields a wild value is put into)."""
    return {
        "identity create": ("POST", "/v2/identities", {"external_id": ""}, ["metadata", *IDENTITY_FIELDS]),
        "identity update": ("PATCH", "/v2/identities/robust-user", {}, ["metadata", *IDENTITY_FIELDS[1:]]),
        "budget create": (
            "POST",
            "/v2/budgets",
            {"scope": {"identity": {"identity_external_id": ""}}, "limits": {"amount": 1.0}},
            ["limits", "rate_limit", "expires_at", "time_zone", "alerts", "scope"],
        ),
        "report": ("POST", "/v2/reporting", {"metric": "genai.cost"}, REPORT_FIELDS),
    }


@FUZZ
@given(target=st.sampled_from(sorted(_wild_targets())), pick=st.integers(0, 20), value=WILD)
def test_fuzz_management_wild_json(stack: Stack, target: str, pick: int, value: Any) -> None:
    """NaN, Infinity, huge integers, lone surrogates and deep nesting in management bodies: never 5xx,
    and never stored (a stored NaN or surrogate used to make every later read of the record a 500)."""
    method, path, body, fields = _wild_targets()[target]
    field = fields[pick % len(fields)]
    body = json.loads(json.dumps(body))
    if "external_id" in body:
        body["external_id"] = _fresh("wild")
    if "scope" in body:
        body["scope"]["identity"]["identity_external_id"] = _fresh("wild")
    if target == "report":
        body.update({"from": _recent(1), "to": _recent(0)})
    if field == "metadata":
        body["metadata"] = {"k": value}  # free-form: stored as sent
    elif field == "limits":
        body["limits"] = {"amount": value} if pick % 2 else {"token_limit": value}
    else:
        body[field] = value
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes out as a \\ud800 escape
    r = stack.call(method, path, content=raw, headers={"content-type": "application/json"})
    ok_or_orq_error(r)
    if r.status_code == 200 and path == "/v2/budgets":
        stack.call("DELETE", f"/v2/budgets/{r.json()['budget']['budgetId']}")
    assert stack.call("GET", "/v2/identities?limit=50").status_code == 200
    assert stack.call("GET", f"/v2/identities/{stack.identity}").status_code == 200


@FUZZ
@given(body=_object_of(IDENTITY_FIELDS), patch=_object_of(IDENTITY_FIELDS[1:]))
def test_fuzz_identities_create_and_update(stack: Stack, body: dict[str, Any], patch: dict[str, Any]) -> None:
    """Random identity payloads: 201/200, 409, or 400 in orq's shape; what is stored can be read back."""
    r = stack.call("POST", "/v2/identities", json=body)
    ok_or_orq_error(r)
    if r.status_code == 201:
        ref = quote(r.json()["identity"]["_id"])
        assert stack.call("GET", f"/v2/identities/{ref}").status_code == 200
    r = stack.call("PATCH", f"/v2/identities/{stack.identity}", json=patch)
    ok_or_orq_error(r)
    listed = stack.call("GET", "/v2/identities?limit=50&include_metrics=true&include_budget=true")
    assert listed.status_code == 200, listed.text


_SCOPES = st.sampled_from(
    [
        {"workspace": {}},
        {"project": {"project_id": "p-fuzz"}},
        {"identity": {"identity_external_id": "fuzz-user"}},
        {"api_key": {"api_key_id": "k-fuzz"}},
        {"provider": {"provider": "fuzz-provider"}},
        {"model": {"model_id": "openai/fuzz"}},
    ]
)
_LIMITS = st.fixed_dictionaries(
    {}, optional={"period": JSON | st.just("BUDGET_PERIOD_DAILY"), "amount": JSON, "token_limit": JSON}
)
_BUDGET_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "scope": _SCOPES | JSON,
    "match": st.fixed_dictionaries({"cel": _TEXT | JSON}) | JSON,
    "limits": _LIMITS | JSON,
    "rate_limit": st.fixed_dictionaries({"requests_per_minute": JSON}) | JSON,
    "is_active": st.booleans() | JSON,
    "expires_at": _timestamps() | JSON,
    "alerts": st.lists(_object_of(["threshold_percent", "notifier_ids", "id", "dimension"]), max_size=2)
    | JSON,
    "clear_expires_at": st.booleans() | JSON,
    "clear_alerts": st.booleans() | JSON,
    # A real zone, or something that is not one (a tzdata folder, a name too long for a file name).
    "time_zone": st.sampled_from(["UTC", "Europe/Amsterdam", "Mars/Olympus", "", "America", "a" * 300])
    | st.none(),
}


def _budget_body(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={f: _BUDGET_VALUES[f] for f in fields})


@FUZZ
@given(body=_budget_body(BUDGET_FIELDS), patch=_budget_body([*BUDGET_UPDATE_FIELDS, "time_zone"]))
def test_fuzz_budgets_create_and_update(stack: Stack, body: dict[str, Any], patch: dict[str, Any]) -> None:
    """Random budget payloads: 200, 409, or 400 in orq's shape (a budget that got created is removed)."""
    r = stack.call("POST", "/v2/budgets", json=body)
    ok_or_orq_error(r)
    if r.status_code == 200:  # never leave a budget behind that could throttle the other tests
        budget_id = r.json()["budget"]["budgetId"]
        assert stack.call("GET", f"/v2/budgets/{budget_id}").status_code == 200
        assert stack.call("DELETE", f"/v2/budgets/{budget_id}").status_code == 200
    ok_or_orq_error(stack.call("PATCH", f"/v2/budgets/{stack.budget_id}", json=patch))
    ok_or_orq_error(stack.call("POST", f"/v2/budgets/{stack.budget_id}/reset-consumption", json=patch))
    assert stack.call("GET", "/v2/budgets").status_code == 200


_REPORT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "metric": st.sampled_from(["genai.cost", "genai.usage", "genai.ttft.p50", "genai.evaluator.runs"]) | JSON,
    "from": st.just("recent") | _timestamps() | JSON,
    "to": st.just("now") | _timestamps() | JSON,
    "grain": st.sampled_from(["auto", "minute", "hour", "day"]) | JSON,
    "group_by": st.lists(
        st.sampled_from(["identity", "model", "tag", "agent", "status_code"]) | JSON, max_size=3
    )
    | JSON,
    "filters": st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "field": st.sampled_from(["identity", "http_status_code", "billing_billable"]) | JSON,
                "op": st.sampled_from(["eq", "in", "not_in"]) | JSON,
                "values": st.lists(_TEXT, max_size=3) | JSON,
            },
        ),
        max_size=2,
    )
    | JSON,
    "limit": st.integers(-5, 6000) | JSON,
    "time_zone": st.sampled_from(["Europe/Amsterdam", "Pacific/Kiritimati", ""]) | JSON,
    "include_totals": st.booleans() | JSON,
    "mode": st.sampled_from(["timeseries", "scalar"]) | JSON,
    "sort": st.sampled_from(["asc", "desc"]) | JSON,
}


@FUZZ
@given(
    body=st.fixed_dictionaries({}, optional=_REPORT_VALUES), extra=st.dictionaries(_TEXT, JSON, max_size=1)
)
def test_fuzz_reporting(stack: Stack, body: dict[str, Any], extra: dict[str, Any]) -> None:
    """Random report requests: 200 or 4xx in orq's shape, always with an `X-Request-Id`."""
    if body.get("from") == "recent":
        body["from"] = _recent(2)
    if body.get("to") == "now":
        body["to"] = _recent(0)
    r = stack.call("POST", "/v2/reporting", json={**extra, **body})
    ok_or_orq_error(r)
    assert r.headers["x-request-id"]


_IDENTITY_PARAMS = [
    "limit",
    "starting_after",
    "ending_before",
    "search",
    "filter_by.tags",
    "include_metrics",
    "include_budget",
    "sort_by",
]
_BUDGET_PARAMS = [
    "limit",
    "starting_after",
    "ending_before",
    "scope_kind",
    "scope_target_id",
    "is_active",
    "period",
    "query",
    "sort_by",
]


@FUZZ
@given(
    identity_params=st.lists(st.tuples(st.sampled_from(_IDENTITY_PARAMS) | _TEXT, _TEXT), max_size=4),
    budget_params=st.lists(st.tuples(st.sampled_from(_BUDGET_PARAMS) | _TEXT, _TEXT), max_size=4),
)
def test_fuzz_list_query_params(
    stack: Stack, identity_params: list[tuple[str, str]], budget_params: list[tuple[str, str]]
) -> None:
    """Any query string (repeats, unknown names, any text) on the two list endpoints: 200 or 400."""
    ok_or_orq_error(stack.call("GET", "/v2/identities", params=identity_params))
    ok_or_orq_error(stack.call("GET", "/v2/budgets", params=budget_params))


@FUZZ
@given(ref=st.text(st.characters(codec="utf-8"), min_size=1, max_size=20))
def test_fuzz_path_ids(stack: Stack, ref: str) -> None:
    """Any id in a management path, escaped or raw: 2xx, or a 4xx in orq's shape (or Starlette's
    redirect of a path ending in `/` to the one without: the SDKs follow it)."""
    escaped = quote(ref, safe="")
    answers = [
        stack.call("GET", f"/v2/budgets/{escaped}"),
        stack.call("POST", f"/v2/budgets/{escaped}/reset-consumption", json={}),
    ]
    for path in (f"/v2/identities/{escaped}", f"/v2/identities/{quote(ref, safe='/@')}"):
        answers += [stack.call("GET", path), stack.call("PATCH", path, json={})]
    for r in answers:
        if r.status_code not in (307, 308):
            ok_or_orq_error(r)


# ---------------------------------------------------------------------------------------------------------
# Management API: tables of wrong types, per endpoint and field

# Which JSON kinds each field takes (anything else must be a 400 naming the field).
IDENTITY_KINDS = {
    "external_id": {"string"},
    "display_name": {"string", "null"},
    "email": {"string", "null"},
    "avatar_url": {"string", "null"},
    "tags": {"array", "null"},
    "metadata": {"object", "null"},
}


def _fresh(name: str) -> str:
    return f"{name}-{ULID()}"


@pytest.mark.parametrize("field", list(IDENTITY_KINDS))
def test_identities_create_fields_of_every_type(stack: Stack, field: str) -> None:
    """POST /v2/identities: each field with a value of every JSON type."""
    for value in SAMPLES:
        body = {"external_id": _fresh("typed"), field: value}
        r = stack.call("POST", "/v2/identities", json=body)
        if _json_kind(value) not in IDENTITY_KINDS[field]:
            orq_error(r, field, status=400)
        elif r.status_code != 201:  # the right type with a bad value ("" id, [1] tags, a taken id: 409)
            orq_error(r, field)


@pytest.mark.parametrize("field", [f for f in IDENTITY_KINDS if f != "external_id"])
def test_identities_update_fields_of_every_type(stack: Stack, field: str) -> None:
    """PATCH /v2/identities/{id}: each field with a value of every JSON type; `external_id` is not settable."""
    for value in SAMPLES:
        r = stack.call("PATCH", f"/v2/identities/{stack.identity}", json={field: value})
        if _json_kind(value) not in IDENTITY_KINDS[field] or r.status_code != 200:
            orq_error(r, field, status=400)
    orq_error(
        stack.call("PATCH", f"/v2/identities/{stack.identity}", json={"external_id": "x"}), "external_id"
    )


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"limit": "abc"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "51"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"limit": "\u00b2"}, "limit"),
        ({"limit": "9" * 5000}, "limit"),
        ([("limit", "1"), ("limit", "2")], "limit"),
        ({"starting_after": "x" * 300}, "starting_after"),
        ({"starting_after": "a", "ending_before": "b"}, "starting_after"),
        ({"starting_after": "no-such-id", "sort_by": "IDENTITY_SORT_FIELD_DISPLAY_NAME"}, "starting_after"),
        ({"search": "a"}, "search"),
        ({"search": "x" * 300}, "search"),
        ({"filter_by.tags": "x" * 101}, "filter_by.tags"),
        ([("filter_by.tags", str(i)) for i in range(11)], "filter_by.tags"),
        ({"include_metrics": "yes"}, "include_metrics"),
        ({"include_budget": "2"}, "include_budget"),
        ({"sort_by": "IDENTITY_SORT_FIELD_NOPE"}, "sort_by"),
        ([("sort_by", "IDENTITY_SORT_FIELD_UPDATED")] * 2, "sort_by"),
    ],
)
def test_identities_list_params(stack: Stack, params: Any, name: str) -> None:
    """GET /v2/identities: a bad, repeated or unknown-valued parameter is a 400 naming it."""
    orq_error(stack.call("GET", "/v2/identities", params=params), name, status=400)


def test_identities_odd_but_valid_values(stack: Stack) -> None:
    """Unicode path ids (raw and escaped `/`), NUL, huge numbers and deep metadata all round-trip."""
    ext = "org/a b@c"
    assert stack.call("POST", "/v2/identities", json={"external_id": ext}).status_code == 201
    for path in ("/v2/identities/org/a%20b@c", "/v2/identities/org%2Fa%20b@c"):
        r = stack.call("GET", path)
        assert r.status_code == 200 and r.json()["identity"]["external_id"] == ext, r.text
    orq_error(stack.call("GET", "/v2/identities/org%2Fa%20b@c-missing"), "org/a b@c-missing", status=404)
    deep: Any = "leaf"
    for _ in range(MAX_DEPTH - 3):
        deep = {"k": deep}
    odd: dict[str, Any] = {
        "external_id": "用户 😀\u0000\u2028",
        "display_name": "\u0000",
        "metadata": {"big": 10**300, "tiny": 5e-324, "neg": -(10**200), "deep": deep},
        "tags": ["é", "😀"],
    }
    r = stack.call("POST", "/v2/identities", json=odd)
    assert r.status_code == 201, r.text
    back = stack.call("GET", "/v2/identities/" + quote(odd["external_id"], safe=""))
    assert back.status_code == 200 and back.json()["identity"]["metadata"]["big"] == 10**300
    assert stack.call("GET", "/v2/identities?limit=50").status_code == 200


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"[]", "JSON object"),
        (b'"x"', "JSON object"),
        (b"1", "JSON object"),
        (b"null", "JSON object"),
        (b"", "JSON object"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"external_id": "\xc3"}', "UTF-8"),
        (b'{"external_id": "n", "metadata": {"x": NaN}}', "NaN"),
        (b'{"external_id": "n", "metadata": {"x": -Infinity}}', "Infinity"),
        (b'{"external_id": "n", "metadata": {"x": 1e400}}', "out of range"),
        (b'{"external_id": "n", "metadata": {"x": ' + b"9" * 4400 + b"}}", "4300 digits"),
        (b'{"external_id": "n", "metadata": ' + b"[" * 300 + b"]" * 300 + b"}", "metadata"),
        (b'{"external_id": "\\udc00"}', "external_id"),
        (b'{"external_id": "n", "metadata": {"\\ud800": 1}}', "metadata"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/identities"),
        ("PATCH", "/v2/identities/robust-user"),
        ("POST", "/v2/budgets"),
        ("POST", "/v2/reporting"),
    ],
)
def test_management_bodies_that_are_not_acceptable_json(
    stack: Stack, raw: bytes, needle: str, method: str, path: str
) -> None:
    """Every management body endpoint: non-objects, bad UTF-8, NaN/Infinity, huge numbers, bombs: 400."""
    if raw == b"" and method == "PATCH":
        needle = ""  # an empty PATCH is an empty update
    r = stack.call(method, path, content=raw, headers={"content-type": "application/json"})
    if not needle:
        assert r.status_code == 200, r.text
        return
    orq_error(r, needle, status=400)


def test_body_size_limits(stack: Stack) -> None:
    """Bodies over the cap are a 413 in each surface's shape, with or without a Content-Length:
    1 MiB on the management API, `server.max_body_bytes` on the proxied surface."""
    big = json.dumps({"external_id": "big", "display_name": "x" * (1024 * 1024)}).encode()
    orq_error(stack.call("POST", "/v2/identities", content=big), "limit", status=413)
    orq_error(
        stack.call("POST", "/v2/identities", content=iter([big[:1000], big[1000:]])), "limit", status=413
    )
    huge = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * PROXY_BODY_LIMIT}]})
    raw = huge.encode()
    openai_error(stack.call("POST", CHAT, content=raw), status=413)
    openai_error(stack.call("POST", CHAT, content=iter([raw[:1000], raw[1000:]])), status=413)


BUDGET_KINDS = {
    "scope": {"object", "null"},
    "match": {"object", "null"},
    "limits": {"object", "null"},
    "rate_limit": {"object", "null"},
    "is_active": {"bool"},
    "expires_at": {"string", "null", "number"},  # pydantic also reads Unix timestamps
    "alerts": {"array", "null"},
    "time_zone": {"string", "null"},
}


@pytest.mark.parametrize("field", list(BUDGET_KINDS))
def test_budgets_create_fields_of_every_type(stack: Stack, field: str) -> None:
    """POST /v2/budgets: each field with a value of every JSON type (a budget that got created is removed)."""
    for value in SAMPLES:
        body = {"scope": {"identity": {"identity_external_id": _fresh("b")}}, "limits": {"amount": 1.0}}
        body[field] = value
        r = stack.call("POST", "/v2/budgets", json=body)
        if r.status_code == 200:
            assert _json_kind(value) in BUDGET_KINDS[field], (field, value)
            stack.call("DELETE", f"/v2/budgets/{r.json()['budget']['budgetId']}")
        else:
            orq_error(r, field, status=400)


BUDGET_UPDATE_KINDS = {
    "limits": {"object", "null"},
    "rate_limit": {"object", "null"},
    "is_active": {"bool", "null"},
    "expires_at": {"string", "null", "number"},
    "clear_expires_at": {"bool", "null"},
    "match": {"object", "null"},
    "alerts": {"array", "null"},
    "clear_alerts": {"bool", "null"},
    "time_zone": {"string", "null"},
}


@pytest.mark.parametrize("field", list(BUDGET_UPDATE_KINDS))
def test_budgets_update_fields_of_every_type(stack: Stack, field: str) -> None:
    """PATCH /v2/budgets/{id}: each field with a value of every JSON type."""
    for value in SAMPLES:
        if field in ("limits", "rate_limit") and value is None:
            continue  # valid: clears that limit (tested elsewhere); would leave the budget limitless
        r = stack.call("PATCH", f"/v2/budgets/{stack.budget_id}", json={field: value})
        if r.status_code == 200:
            assert _json_kind(value) in BUDGET_UPDATE_KINDS[field], (field, value)
        else:
            orq_error(r, field, status=400)
    restore = {"limits": {"amount": 5.0}, "is_active": True, "clear_expires_at": True, "clear_alerts": True}
    assert stack.call("PATCH", f"/v2/budgets/{stack.budget_id}", json=restore).status_code == 200


@pytest.mark.parametrize(
    ("nested", "name"),
    [
        ({"scope": {"identity": {"identity_external_id": 5}}}, "scope.identity.identity_external_id"),
        ({"scope": {"identity": {}}}, "scope.identity.identity_external_id"),
        ({"scope": {"workspace": {}, "project": {"project_id": "p"}}}, "scope"),
        ({"scope": {"galaxy": {}}}, "scope.galaxy"),
        ({"limits": {"amount": "1"}}, "limits.amount"),
        ({"limits": {"amount": -1}}, "limits.amount"),
        ({"limits": {"amount": 1e308}}, "limits.amount"),
        ({"limits": {"token_limit": 1.5}}, "limits.token_limit"),
        ({"limits": {"token_limit": 10**30}}, "limits.token_limit"),
        ({"limits": {"amount": 1, "period": "BUDGET_PERIOD_FORTNIGHT"}}, "limits.period"),
        ({"rate_limit": {"requests_per_minute": 0}}, "rate_limit.requests_per_minute"),
        ({"rate_limit": {"requests_per_minute": True}}, "rate_limit.requests_per_minute"),
        ({"match": {"cel": 5}}, "match.cel"),
        ({"alerts": [{"threshold_percent": 101, "notifier_ids": ["n"]}]}, "alerts.0.threshold_percent"),
        ({"alerts": [{"threshold_percent": 50, "notifier_ids": "n"}]}, "alerts.0.notifier_ids"),
        ({"alerts": [5]}, "alerts.0"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_budgets_nested_fields(stack: Stack, nested: dict[str, Any], name: str) -> None:
    """Wrong types and out-of-range values inside budget objects name their full path."""
    body = {"scope": {"identity": {"identity_external_id": _fresh("n")}}, "limits": {"amount": 1.0}, **nested}
    orq_error(stack.call("POST", "/v2/budgets", json=body), name, status=400)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"limit": "abc"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "-3"}, "limit"),
        ([("limit", "1"), ("limit", "2")], "limit"),
        ({"starting_after": "a", "ending_before": "b"}, "starting_after"),
        ({"starting_after": "missing"}, "starting_after"),
        ({"scope_kind": "BUDGET_SCOPE_KIND_GALAXY"}, "scope_kind"),
        ({"period": "BUDGET_PERIOD_FORTNIGHT"}, "period"),
        ({"is_active": "maybe"}, "is_active"),
        ({"query": "q" * 300}, "query"),
        ({"sort_by": "BUDGET_SORT_FIELD_NOPE"}, "sort_by"),
        ([("scope_target_id", "a"), ("scope_target_id", "b")], "scope_target_id"),
        ({"nonsense": "1"}, "nonsense"),
    ],
)
def test_budgets_list_params(stack: Stack, params: Any, name: str) -> None:
    """GET /v2/budgets: bad, repeated, unknown-valued or unknown parameters are a 400 naming them."""
    orq_error(stack.call("GET", "/v2/budgets", params=params), name, status=400)


def _report(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"metric": "genai.requests", "from": _recent(2), "to": _recent(0)}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _OMIT}


_OMIT = object()
REPORT_KINDS = {
    "metric": {"string"},
    "from": {"string"},
    "to": {"string"},
    "grain": {"string", "null"},
    "group_by": {"array", "null"},
    "filters": {"array", "null"},
    "limit": {"number", "null"},
    "time_zone": {"string", "null"},
    "include_totals": {"bool", "null"},
    "mode": {"string", "null"},
    "sort": {"string", "null"},
}


@pytest.mark.parametrize("field", list(REPORT_KINDS))
def test_reporting_fields_of_every_type(stack: Stack, field: str) -> None:
    """POST /v2/reporting: each field with a value of every JSON type."""
    for value in SAMPLES:
        r = stack.call("POST", "/v2/reporting", json=_report(**{field: value}))
        if r.status_code == 200:
            assert _json_kind(value) in REPORT_KINDS[field], (field, value)
        else:
            orq_error(r, field, status=400)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"metric": "genai.bogus"}, "metric"),
        ({"metric": ["genai.cost"]}, "metric"),
        ({"metric": _OMIT}, "metric"),
        ({"from": _OMIT}, "from"),
        ({"from": "yesterday"}, "from"),
        ({"from": "0001-01-01T00:00:00+01:00"}, "from"),
        ({"to": "9999-12-31T23:59:59-01:00"}, "to"),
        ({"from": "2026-02-30T00:00:00Z"}, "from"),
        ({"grain": "week"}, "grain"),
        ({"group_by": ["bogus"]}, "group_by[0]"),
        ({"group_by": ["model", "model"]}, "group_by[1]"),
        ({"filters": [{"field": "identity", "op": "like", "values": ["x"]}]}, "filters[0].op"),
        ({"filters": [{"field": 5, "op": "eq", "values": ["x"]}]}, "filters[0].field"),
        ({"filters": [{"field": "identity", "op": "eq", "values": "x"}]}, "filters[0].values"),
        ({"filters": [{"field": "identity", "op": "eq", "values": ["x", "y"]}]}, "filters[0].values"),
        ({"filters": [{"field": "identity", "op": "in", "values": ["x" * 2000]}]}, "filters[0].values"),
        ({"filters": [5]}, "filters[0]"),
        ({"filters": [{"field": "identity", "op": "eq", "values": ["x"], "extra": 1}]}, "filters[0]"),
        ({"limit": 1.5}, "limit"),
        ({"limit": 10**30}, "limit"),
        ({"limit": 1e300}, "limit"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"mode": "spiral"}, "mode"),
        ({"sort": "up"}, "sort"),
        ({"groupBy": ["model"]}, "groupBy"),
    ],
)
def test_reporting_values(stack: Stack, fields: dict[str, Any], name: str) -> None:
    """Unknown enum values, out-of-range dates and numbers, malformed filters: 400 naming the field."""
    r = stack.call("POST", "/v2/reporting", json=_report(**fields))
    orq_error(r, name, status=400)
    assert r.headers["x-request-id"]


# ---------------------------------------------------------------------------------------------------------
# Management API: methods, unknown paths, operations endpoints


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v2/identities", "POST"),
        ("DELETE", "/v2/identities", "GET"),
        ("POST", "/v2/identities/robust-user", "PATCH"),
        ("PUT", "/v2/budgets", "POST"),
        ("POST", "/v2/budgets/x", "DELETE"),
        ("GET", "/v2/budgets/x/reset-consumption", "POST"),
        ("GET", "/v2/reporting", "POST"),
        ("DELETE", "/v2/reporting", "POST"),
    ],
)
def test_management_wrong_method_is_405_in_orq_shape(
    stack: Stack, method: str, path: str, allowed: str
) -> None:
    """A wrong method is a 405 JSON body in orq's shape, naming the method, with an `Allow` header."""
    r = stack.call(method, path)
    body = orq_error(r, method, status=405)
    assert allowed in r.headers["allow"] and allowed in body["message"]


@pytest.mark.parametrize(
    "path", ["/", "/v2", "/v2/nope", "/v2/budgets/a%2Fb", "/v2/reportingx", "/v3/routerx", "/%ff"]
)
def test_management_unknown_path_is_404_in_orq_shape(stack: Stack, path: str) -> None:
    """Any path outside the routes is a 404 JSON body in orq's shape (code 5)."""
    assert orq_error(stack.call("GET", path), status=404)["code"] == 5


def test_operations_endpoints_still_answer(stack: Stack) -> None:
    """`/healthz`, `/readyz`, `/metrics` and `/openapi.json` answer after all of the above."""
    assert stack.call("GET", "/healthz").json() == {"status": "ok"}
    assert stack.call("GET", "/readyz").json() == {"status": "ready"}
    metrics = stack.call("GET", "/metrics")
    assert metrics.status_code == 200 and "orq_proxy_requests_total" in metrics.text
    assert stack.call("GET", "/openapi.json").status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Budget inputs that once crashed the budget slice (500 with a traceback); now 400s naming the field.


def _budget_create(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "scope": {"identity": {"identity_external_id": _fresh("x")}},
        "limits": {"amount": 1.0},
    }
    body.update(fields)
    return body


@pytest.mark.parametrize("limit", ["\u00b2", "9" * 5000])
def test_budget_list_limit_odd_digits(stack: Stack, limit: str) -> None:
    """GET /v2/budgets?limit=² (isdigit but not int) or 5000 digits is a 400 naming limit."""
    orq_error(stack.call("GET", "/v2/budgets", params={"limit": limit}), "limit", status=400)


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_budget_expires_at_at_datetime_edges(stack: Stack, when: str, method: str) -> None:
    """expires_at that leaves datetime's range once in UTC is a 400 naming expires_at."""
    if method == "POST":
        r = stack.call("POST", "/v2/budgets", json=_budget_create(expires_at=when))
    else:
        r = stack.call("PATCH", f"/v2/budgets/{stack.budget_id}", json={"expires_at": when})
    orq_error(r, "expires_at", status=400)


@pytest.mark.parametrize("zone", ["America", "a" * 300])
def test_budget_time_zone_folder_or_too_long(stack: Stack, zone: str) -> None:
    """time_zone naming a tzdata folder or too long for a file name is a 400 naming time_zone."""
    orq_error(stack.call("POST", "/v2/budgets", json=_budget_create(time_zone=zone)), "time_zone", status=400)
