"""schemathesis against a live proxy: every operation the served `/openapi.json` describes, fuzzed from
that document, answers without a 5xx and as the document says (status code, content type, body schema).

Bounded: generation is derandomized (a fixed seed, so a failure reproduces) and capped at `_EXAMPLES`
cases per operation and generation mode, which keeps the test well under a minute. Proxied operations go
to the fake upstream, positive cases only; the router prefixes share `/v1`'s code, so only their catch-all
`{path}` is fuzzed.
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    CheckFunction,
    content_type_conformance,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

_ADMIN_KEY = "sk-admin"
_EXAMPLES = 10
_CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Operations whose every rule the document can state, so a schema-valid request must not get a 400. The
# others also refuse valid-looking requests for reasons JSON Schema cannot express: a cursor naming no
# record, "exactly one of scope or match", `from` before `to` within the retention window.
_FULLY_DECLARED = frozenset(
    {
        "POST /v2/identities",
        "GET /v2/identities/{id}",
        "PATCH /v2/identities/{id}",
        "DELETE /v2/identities/{id}",
    }
)
_SHARED_WITH_V1 = ("/v2/router/", "/v3/router/")


def _first_failure(
    operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str], checks: list[CheckFunction]
) -> str | None:
    """The first case of `operation` that fails a check, rendered with how to reproduce it; None if none."""

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        # One live server serves every example on purpose: state builds up, as for a real client.
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, checks=checks)

    try:
        run()
    except (FailureGroup, AssertionError) as exc:
        return f"{operation.label} ({mode.value}): {exc}"
    except Unsatisfiable:
        # Nothing of this operation can be made invalid (no parameters, no body): no negative case exists.
        if mode is not GenerationMode.NEGATIVE:
            raise
    return None


def test_every_operation_conforms_to_the_served_document(proxy_factory: Any) -> None:
    """No 5xx, and no undocumented status, content type or response body, for any documented operation."""
    _app, server = proxy_factory({"api_keys": [{"key": _ADMIN_KEY, "admin": True}]})
    document = httpx.get(server.url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    headers = {"Authorization": f"Bearer {_ADMIN_KEY}"}
    labels, problems = [], []
    for result in schema.get_all_operations():
        operation = result.ok()  # raises for an operation the document cannot describe
        labels.append(operation.label)
        if operation.path.startswith(_SHARED_WITH_V1) and not operation.path.endswith("{path}"):
            continue
        # Proxied operations pass their body through unread but for `model`: negative cases of them only
        # repeat what the positive ones exercise (and cost a third of the run).
        proxied = operation.path.startswith(("/v1/", "/v2/router/", "/v3/router/"))
        modes = (GenerationMode.POSITIVE,) if proxied else (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for mode in modes:
            checks = list(_CHECKS)
            if mode is GenerationMode.POSITIVE and operation.label in _FULLY_DECLARED:
                checks.append(positive_data_acceptance)
            problem = _first_failure(operation, mode, server.url, headers, checks)
            if problem is not None:
                problems.append(problem)
    assert set(labels) >= _FULLY_DECLARED and "POST /v2/reporting" in labels
    assert not problems, "\n\n".join(problems)
