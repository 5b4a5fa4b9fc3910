"""Budget matching: the scope index, CEL checks at write time, guard extraction and CEL evaluation."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import cel
import pytest

from orq_proxy.budgets.matching import BudgetIndex, RequestFacts, check_cel, guards, model_keys
from orq_proxy.budgets.models import Budget, ScopeKind

MakeBudget = Callable[..., Budget]
NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def facts(**kwargs: object) -> RequestFacts:
    base: dict[str, object] = {
        "workspace": "default",
        "project": "p1",
        "api_key": "k1",
        "identity": "u1",
        "provider": "openai",
        "model": "gpt-4o",
        "model_id": "openai/gpt-4o",
        "model_keys": model_keys("openai", "gpt-4o", "openai/gpt-4o"),
    }
    base.update(kwargs)
    return RequestFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('identity == "u1"', [("identity", "u1")]),
        ('"u1" == identity', [("identity", "u1")]),
        ("provider == 'openai'", [("provider", "openai")]),
        ('identity == "u1" && metadata.team == "ml"', [("identity", "u1"), ("metadata.team", "ml")]),
        ('(metadata["team"] == "ml") && model.startsWith("gpt")', [("metadata.team", "ml")]),
        ('(identity == "u1" && project == "p")', [("identity", "u1"), ("project", "p")]),
        ('headers["X-Tenant"] == "t1"', [("headers.x-tenant", "t1")]),
        ('has(metadata.team) && metadata.team == "a b"', [("metadata.team", "a b")]),
        ('model_id == "openai/gpt-4o" && api_key != "k"', [("model_id", "openai/gpt-4o")]),
        # nothing safe to index:
        ('identity == "u1" || identity == "u2"', []),
        ('identity == "u1" ? true : false', []),
        ('!(identity == "u1")', []),
        ('identity == "u\\"1"', []),  # escapes
        ('identity == r"u1"', []),  # raw string
        ('identity == """u1"""', []),  # triple quotes
        ('identity == "u1" // comment', []),
        ('size(identity) == 2 && identity == "u1" == true', []),
        ('metadata.exists(k, k == "team")', []),
        ('identity != "u1"', []),
        ("model in ['a', 'b']", []),
        ('unknown == "x"', []),
        ("", []),
        ("true", []),
        ('(a == "1") || (b == "2")', []),
        ('identity == "u1" && model == "m" || project == "p"', []),
        ('identity == "u1" && model == "m" ? true : project == "p"', []),
        ('identity == "u1" && (model == "a" || model == "b")', [("identity", "u1")]),
    ],
)
def test_guards(expression: str, expected: list[tuple[str, str]]) -> None:
    """Only top-level conjuncts of the form `fact == "literal"` become index guards."""
    assert guards(expression) == expected


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ('metadata.team == "ml"', None),
        ("", None),
        ("true", None),
        ('metadata.exists(k, k == "team") && headers.all(h, h != "x")', None),
        ('identity == "u1" &&', "invalid CEL: Failed to parse expression"),
        ("a ===", "invalid CEL"),
        ('user == "u1"', "unknown variable(s) user"),
        ('identity == "u" && tenant == "t" && zone == 1', "unknown variable(s) tenant, zone"),
    ],
)
def test_check_cel(expression: str, problem: str | None) -> None:
    """Syntax errors and unknown variables are caught at write time; macro-bound names are allowed."""
    got = check_cel(expression)
    if problem is None:
        assert got is None
    else:
        assert got is not None and got.startswith(problem), got


def test_scope_index_every_kind(make_budget: MakeBudget) -> None:
    """Each scope kind matches its target and nothing else; other workspaces never match."""
    index = BudgetIndex()
    budgets = {
        "ws": make_budget(kind=ScopeKind.WORKSPACE),
        "project": make_budget(kind=ScopeKind.PROJECT, target="p1"),
        "identity": make_budget(kind=ScopeKind.IDENTITY, target="u1"),
        "key": make_budget(kind=ScopeKind.API_KEY, target="k1"),
        "provider": make_budget(kind=ScopeKind.PROVIDER, target="openai"),
        "model": make_budget(kind=ScopeKind.MODEL, target="openai/gpt-4o"),
        "other_identity": make_budget(kind=ScopeKind.IDENTITY, target="u2"),
        "other_ws": make_budget(kind=ScopeKind.WORKSPACE, workspace="w2"),
        "bare_model": make_budget(kind=ScopeKind.MODEL, target="gpt-4o-mini"),
    }
    for budget in budgets.values():
        index.put(budget)
    names = {b.budget_id: n for n, b in budgets.items()}
    got = {names[b.budget_id] for b in index.match(facts(), NOW)}
    assert got == {"ws", "project", "identity", "key", "provider", "model"}
    got = {
        names[b.budget_id]
        for b in index.match(
            facts(
                identity="",
                model="gpt-4o-mini",
                model_keys=model_keys("openai", "gpt-4o-mini", "gpt-4o-mini"),
            ),
            NOW,
        )
    }
    assert got == {"ws", "project", "key", "provider", "bare_model"}
    assert {names[b.budget_id] for b in index.match(facts(workspace="w2"), NOW)} == {"other_ws"}
    assert index.match(facts(workspace="w3"), NOW) == []


def test_model_keys() -> None:
    """A model scope matches `provider/model`, the client's spelling and the bare name."""
    assert model_keys("openai", "gpt-4o", "gpt-4o") == ("openai/gpt-4o", "gpt-4o")
    assert model_keys("openai", "gpt-4o", "ws@openai/gpt-4o") == (
        "openai/gpt-4o",
        "ws@openai/gpt-4o",
        "gpt-4o",
    )
    assert model_keys(None, None, None) == ()


def test_inactive_and_expired_budgets_do_not_apply(make_budget: MakeBudget) -> None:
    """Only active, unexpired budgets are returned, for scoped and CEL budgets alike."""
    index = BudgetIndex()
    index.put(make_budget(kind=ScopeKind.IDENTITY, target="u1", is_active=False))
    index.put(make_budget(kind=None, cel="true", expires_at=NOW))
    live = make_budget(kind=None, cel="true", expires_at=NOW + timedelta(seconds=1))
    index.put(live)
    assert index.match(facts(), NOW) == [live]
    assert index.match(facts(), NOW + timedelta(seconds=1)) == []


def test_cel_budgets(make_budget: MakeBudget) -> None:
    """Guarded and open CEL budgets match on every variable; the empty expression matches all."""
    index = BudgetIndex()
    exprs = {
        "all": "",
        "team": 'metadata.team == "ml"',
        "team_openai": 'metadata.team == "ml" && provider == "openai"',
        "tenant": 'headers["x-tenant"] == "t1"',
        "gpt": 'model.startsWith("gpt-4") && project == "p1"',
        "key": 'api_key == "k1" && model_id == "openai/gpt-4o"',
        "nobody": 'identity == "nobody"',
    }
    budgets = {name: make_budget(kind=None, cel=e) for name, e in exprs.items()}
    for budget in budgets.values():
        index.put(budget)
    names = {b.budget_id: n for n, b in budgets.items()}
    request = facts(
        metadata={"team": "ml"}, raw_headers=[(b"x-tenant", b"t1"), (b"authorization", b"Bearer s")]
    )
    assert {names[b.budget_id] for b in index.match(request, NOW)} == {
        "all",
        "team",
        "team_openai",
        "tenant",
        "gpt",
        "key",
    }
    request = facts(metadata={"team": "ops"}, model="o3", project="p2", api_key="k2")
    assert {names[b.budget_id] for b in index.match(request, NOW)} == {"all"}
    assert index.cel_errors == 0  # every metadata lookup above was guarded or had the key


def test_credentials_never_reach_cel(make_budget: MakeBudget) -> None:
    """The authorization header is not visible to expressions."""
    index = BudgetIndex()
    budget = make_budget(kind=None, cel='"authorization" in headers')
    index.put(budget)
    assert index.match(facts(raw_headers=[(b"authorization", b"Bearer x")]), NOW) == []
    index.put(replace(budget, cel='"x-a" in headers'))
    assert index.match(facts(raw_headers=[(b"x-a", b"1")]), NOW) == [replace(budget, cel='"x-a" in headers')]


def test_cel_errors_mean_no_match(make_budget: MakeBudget, caplog: pytest.LogCaptureFixture) -> None:
    """A runtime error or non-bool result is no match, counted, and logged once per budget."""
    index = BudgetIndex()
    missing_key = make_budget(kind=None, cel='model == "gpt-4o" && metadata.team == "ml" || false')
    not_bool = make_budget(kind=None, cel="model")
    index.put(missing_key)
    index.put(not_bool)
    with caplog.at_level(logging.WARNING, logger="orq_proxy.budgets.matching"):
        assert index.match(facts(), NOW) == []
        assert index.match(facts(), NOW) == []
    assert index.cel_errors == 4
    assert len([r for r in caplog.records if "treated as no match" in r.getMessage()]) == 2
    assert index.match(facts(metadata={"team": "ml"}), NOW) == [missing_key]


def test_guarded_budget_is_not_evaluated_when_guard_fails(make_budget: MakeBudget) -> None:
    """`identity == "u1" && metadata.team == ...` is never run for other identities (no error counted)."""
    index = BudgetIndex()
    index.put(make_budget(kind=None, cel='identity == "u1" && metadata.team == "ml"'))
    for i in range(50):
        assert index.match(facts(identity=f"other{i}"), NOW) == []
    assert index.cel_errors == 0
    assert index.match(facts(identity="u1"), NOW) == []
    assert index.cel_errors == 1


def test_put_replace_and_remove(make_budget: MakeBudget) -> None:
    """Replacing a budget moves it between index buckets; removing forgets it everywhere."""
    index = BudgetIndex()
    budget = make_budget(kind=None, cel='identity == "u1"')
    index.put(budget)
    moved = replace(budget, cel='identity == "u2"')
    index.put(moved)
    assert len(index) == 1
    assert index.match(facts(identity="u1"), NOW) == []
    assert index.match(facts(identity="u2"), NOW) == [moved]
    scoped = make_budget(kind=ScopeKind.IDENTITY, target="u2")
    index.put(scoped)
    index.remove(moved.budget_id)
    index.remove(moved.budget_id)  # unknown: no-op
    assert index.match(facts(identity="u2"), NOW) == [scoped]
    index.remove(scoped.budget_id)
    assert index.match(facts(identity="u2"), NOW) == [] and len(index) == 0


def test_programs_compiled_once(make_budget: MakeBudget) -> None:
    """Budgets with the same expression share one compiled program."""
    index = BudgetIndex()
    a = make_budget(kind=None, cel='metadata.team == "ml"')
    b = make_budget(kind=None, cel='metadata.team == "ml"')
    index.put(a)
    index.put(b)
    assert index.program(a.cel) is index.program(b.cel)


def test_guard_index_agrees_with_brute_force(make_budget: MakeBudget) -> None:
    """On random budgets and requests, the indexed match equals evaluating every expression."""
    rng = random.Random(7)
    values = ["a", "b", "c"]
    templates = [
        'identity == "{v}"',
        'identity == "{v}" && metadata.team == "{w}"',
        'metadata.team == "{v}" && (provider == "{w}" || model == "{w}")',
        'metadata["team"] == "{v}" || identity == "{w}"',
        'identity == "{v}" && metadata.team == "{w}" || project == "{w}"',
        'identity == "{v}" && provider == "{w}" ? model == "{v}" : api_key == "{w}"',
        'project == "{v}" && has(metadata.team)',
        'headers["x-t"] == "{v}" && api_key == "{w}"',
        '"{v}" == model_id',
        "true",
        'identity != "{v}"',
    ]
    index = BudgetIndex()
    budgets = []
    for _ in range(150):
        expr = rng.choice(templates).format(v=rng.choice(values), w=rng.choice(values))
        budget = make_budget(kind=None, cel=expr)
        budgets.append(budget)
        index.put(budget)
    programs = {b.cel: cel.compile(b.cel) for b in budgets}
    for _ in range(300):
        meta = {"team": rng.choice(values)} if rng.random() < 0.7 else {}
        headers = [(b"x-t", rng.choice(values).encode())] if rng.random() < 0.5 else []
        request = facts(
            identity=rng.choice(values),
            project=rng.choice(values),
            provider=rng.choice(values),
            model=rng.choice(values),
            model_id=rng.choice(values),
            api_key=rng.choice(values),
            metadata=meta,
            raw_headers=headers,
        )
        expected = set()
        context = {
            "identity": request.identity,
            "project": request.project,
            "provider": request.provider,
            "model": request.model,
            "model_id": request.model_id,
            "api_key": request.api_key,
            "metadata": dict(meta),
            "headers": request.headers,
        }
        compiled_context = cel.Context(context)
        for budget in budgets:
            try:
                if programs[budget.cel].execute(compiled_context) is True:
                    expected.add(budget.budget_id)
            except Exception:
                pass
        assert {b.budget_id for b in index.match(request, NOW)} == expected
