"""Which budgets apply to a request: a scope index plus compiled CEL, both O(matching budgets) per request.

- Scoped budgets live in one dict keyed by `(workspace, scope kind, target)`: at most eight lookups per
  request (workspace, project, identity, api key, provider, and the model's spellings), whatever the number
  of budgets.
- CEL budgets are compiled once (compiled programs are cached by expression). An expression whose top level
  is a conjunction with an equality test on a request fact (`identity == "u1" && ...`,
  `metadata.team == "ml" && ...`, `headers["x-tenant"] == "t1"`) is indexed by that equality, so it is only
  evaluated for requests where the equality holds; the rest ("open" expressions) are evaluated on every
  request of their workspace. Skipping is exact: if the guard is false, CEL's `&&` is false whatever the
  other operands do.

Evaluation errors (a missing metadata key, a type mismatch, a non-boolean result) mean **no match**, and are
logged once per budget and counted in `BudgetIndex.cel_errors`. Rationale: `metadata.team == "ml"` raises
for every request without a `team` key, and failing closed (treating the error as a match) would charge and
block all of those requests against the ml team's budget. Expressions are checked at write time (syntax and
unknown variables), so what remains at request time are data-dependent errors. Write
`has(metadata.team) && ...` to make the intent explicit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import cel
from cachetools import LRUCache

from orq_proxy.budgets.models import Budget, ScopeKind

__all__ = ["CEL_VARIABLES", "BudgetIndex", "RequestFacts", "check_cel", "compile_cel", "guards", "model_keys"]

logger = logging.getLogger(__name__)

CEL_VARIABLES = ("model", "provider", "model_id", "api_key", "identity", "project", "metadata", "headers")
_STRING_FACTS = frozenset(("model", "provider", "model_id", "api_key", "identity", "project"))
# Credentials never reach CEL: an expression would have to spell the secret out to use them.
_SECRET_HEADERS = frozenset(("authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"))
_MACRO_BINDING = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_UNSET = object()


@dataclass(slots=True)
class RequestFacts:
    """What CEL and the scope index see of one request. Build once per request.

    `headers` holds the raw ASGI header pairs (names already lower-case, as ASGI requires); the map is
    decoded only when a CEL expression needs it.
    """

    workspace: str
    project: str = ""
    api_key: str = ""
    identity: str = ""
    provider: str = ""
    model: str = ""
    model_id: str = ""
    model_keys: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    raw_headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = ()
    _headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {
                name: v.decode("latin-1")
                for k, v in self.raw_headers
                if (name := k.decode("latin-1").lower()) not in _SECRET_HEADERS
            }
        return self._headers

    def fact(self, name: str) -> str | None:
        """The string value of a guard variable (`identity`, `metadata.team`, `headers.x-tenant`)."""
        if name in _STRING_FACTS:
            value: str = getattr(self, name)
            return value
        kind, _, key = name.partition(".")
        if kind == "metadata":
            return self.metadata.get(key)
        return self.headers.get(key)  # "headers"

    def cel_raw(self, name: str) -> str | Mapping[str, str]:
        """A variable's value, uncopied (for comparison)."""
        if name == "metadata":
            return self.metadata
        if name == "headers":
            return self.headers
        value: str = getattr(self, name)
        return value

    def cel_value(self, name: str) -> Any:
        if name == "metadata":
            return dict(self.metadata)
        if name == "headers":
            return self.headers
        return getattr(self, name)


def compile_cel(expression: str) -> cel.Program | None:
    """Compile a CEL expression; None for the empty expression (which matches everything)."""
    if not expression.strip():
        return None
    return cel.compile(expression)


def check_cel(expression: str) -> str | None:
    """Why `expression` cannot be a budget's `match.cel` (syntax, unknown variables), or None if it can."""
    try:
        program = compile_cel(expression)
    except ValueError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        return f"invalid CEL: {first}"
    if program is None:
        return None
    bound = set(_MACRO_BINDING.findall(expression))
    unknown = sorted(set(program.variables()) - set(CEL_VARIABLES) - bound)
    if unknown:
        return f"unknown variable(s) {', '.join(unknown)}; available: {', '.join(CEL_VARIABLES)}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Guard extraction: a conservative scan of the top level of an expression. Anything it does not fully
# understand (escapes, raw or triple-quoted strings, comments, `||` or `?:` at the top) yields no guard,
# and the expression is simply evaluated for every request.

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"[^"\\\n]*"|'[^'\\\n]*')
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>&&|\|\||==|!=|<=|>=|//|[()\[\]{}.,!<>?:+\-*/%])
      | (?P<num>[0-9][0-9a-zA-Z_.]*)
    )""",
    re.VERBOSE,
)


def _tokens(expression: str) -> list[tuple[str, str]] | None:
    out: list[tuple[str, str]] = []
    pos = 0
    text = expression.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return None
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "op" and value == "//":
            return None  # a comment: give up rather than parse around it
        if kind == "str" and out and out[-1][0] == "ident" and out[-1][1] in ("r", "R", "b", "B"):
            return None  # raw or bytes literal prefix
        out.append((kind, value))
        pos = m.end()
    return out


def _strip_parens(tokens: list[tuple[str, str]]) -> list[tuple[str, str]]:
    while len(tokens) >= 2 and tokens[0] == ("op", "(") and tokens[-1] == ("op", ")"):
        depth = 0
        for i, (kind, value) in enumerate(tokens):
            if kind == "op" and value in "([{":
                depth += 1
            elif kind == "op" and value in ")]}":
                depth -= 1
                if depth == 0 and i != len(tokens) - 1:
                    return tokens  # "(a) && (b)": the first paren closes early
        tokens = tokens[1:-1]
    return tokens


def _conjuncts(tokens: list[tuple[str, str]]) -> list[list[tuple[str, str]]] | None:
    parts: list[list[tuple[str, str]]] = [[]]
    depth = 0
    for kind, value in tokens:
        if kind == "op" and value in ("(", "[", "{"):
            depth += 1
        elif kind == "op" and value in (")", "]", "}"):
            depth -= 1
        elif depth == 0 and kind == "op" and value in ("||", "?", ":"):
            return None  # `&&` binds tighter than these: splitting on it would be wrong
        elif depth == 0 and kind == "op" and value == "&&":
            parts.append([])
            continue
        parts[-1].append((kind, value))
    return [_strip_parens(p) for p in parts]


def _operand(tokens: list[tuple[str, str]]) -> str | None:
    """The fact an operand names: `identity`, `metadata.team`, `metadata["team"]`, `headers["x-a"]`."""
    if len(tokens) == 1 and tokens[0][0] == "ident" and tokens[0][1] in _STRING_FACTS:
        return tokens[0][1]
    if (
        len(tokens) == 3
        and tokens[0] == ("ident", "metadata")
        and tokens[1] == ("op", ".")
        and tokens[2][0] == "ident"
    ):
        return "metadata." + tokens[2][1]
    if (
        len(tokens) == 4
        and tokens[0][0] == "ident"
        and tokens[0][1] in ("metadata", "headers")
        and tokens[1] == ("op", "[")
        and tokens[2][0] == "str"
        and tokens[3] == ("op", "]")
    ):
        key = tokens[2][1][1:-1]
        return f"{tokens[0][1]}.{key.lower() if tokens[0][1] == 'headers' else key}"
    return None


def guards(expression: str) -> list[tuple[str, str]]:
    """The `(fact, value)` equalities every match of `expression` must satisfy (possibly none).

    Example:
        guards('identity == "u1" && metadata.team == "ml"')  # [("identity", "u1"), ("metadata.team", "ml")]
    """
    if '"""' in expression or "'''" in expression:
        return []
    tokens = _tokens(expression)
    if not tokens:
        return []
    parts = _conjuncts(_strip_parens(tokens))
    if parts is None:
        return []
    found: list[tuple[str, str]] = []
    for part in parts:
        equals = [i for i, t in enumerate(part) if t == ("op", "==")]
        if len(equals) != 1:
            continue
        i = equals[0]
        left, right = part[:i], part[i + 1 :]
        if len(right) == 1 and right[0][0] == "str":
            name, literal = _operand(left), right[0][1]
        elif len(left) == 1 and left[0][0] == "str":
            name, literal = _operand(right), left[0][1]
        else:
            continue
        if name is not None:
            found.append((name, literal[1:-1]))
    return found


# ---------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _CelBudget:
    budget: Budget
    program: cel.Program | None  # None: the empty expression, matches everything
    variables: tuple[str, ...]
    guard: tuple[str, str] | None


@dataclass(slots=True)
class _Workspace:
    guarded: dict[tuple[str, str], dict[str, _CelBudget]] = field(default_factory=dict)
    guard_names: dict[str, int] = field(default_factory=dict)  # fact name -> number of budgets guarded by it
    open: dict[str, _CelBudget] = field(default_factory=dict)
    open_variables: frozenset[str] = frozenset()  # what the open expressions read

    def refresh(self) -> None:
        self.open_variables = frozenset(v for entry in self.open.values() for v in entry.variables)


class BudgetIndex:
    """Finds the budgets that apply to a request. Synchronous and in memory: stores keep it up to date.
    One event loop (or thread) at a time: it reuses one CEL context between calls.

    Args:
        program_cache_size: how many compiled CEL programs to keep, by expression text.
    """

    def __init__(self, *, program_cache_size: int = 10_000) -> None:
        self._by_id: dict[str, Budget] = {}
        self._scoped: dict[tuple[str, ScopeKind, str], Budget] = {}
        self._workspaces: dict[str, _Workspace] = {}
        self._cel: dict[str, tuple[str, _CelBudget]] = {}  # budget_id -> (workspace, entry)
        self._programs: LRUCache[str, cel.Program | None] = LRUCache(maxsize=program_cache_size)
        self._warned: set[str] = set()
        self._cel_context = cel.Context()
        self._cel_values: dict[str, str | dict[str, str]] = {}
        self.cel_errors = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def program(self, expression: str) -> cel.Program | None:
        """The compiled program for `expression`, compiled once."""
        try:
            return self._programs[expression]
        except KeyError:
            program = self._programs[expression] = compile_cel(expression)
            return program

    def put(self, budget: Budget) -> None:
        """Add or replace a budget (by id)."""
        self.remove(budget.budget_id)
        self._by_id[budget.budget_id] = budget
        if budget.scope_kind is not None:
            self._scoped[(budget.workspace, budget.scope_kind, budget.scope_target)] = budget
            return
        program = self.program(budget.cel)
        found = guards(budget.cel)
        guard = found[0] if found else None
        variables = tuple(v for v in (program.variables() if program else ()) if v in CEL_VARIABLES)
        entry = _CelBudget(budget, program, variables, guard)
        ws = self._workspaces.setdefault(budget.workspace, _Workspace())
        if guard is None:
            ws.open[budget.budget_id] = entry
            ws.refresh()
        else:
            ws.guarded.setdefault(guard, {})[budget.budget_id] = entry
            ws.guard_names[guard[0]] = ws.guard_names.get(guard[0], 0) + 1
        self._cel[budget.budget_id] = (budget.workspace, entry)

    def remove(self, budget_id: str) -> None:
        """Forget a budget; no-op when unknown."""
        budget = self._by_id.pop(budget_id, None)
        if budget is None:
            return
        self._warned.discard(budget_id)
        if budget.scope_kind is not None:
            key = (budget.workspace, budget.scope_kind, budget.scope_target)
            current = self._scoped.get(key)
            if current is not None and current.budget_id == budget_id:
                del self._scoped[key]
            return
        workspace, entry = self._cel.pop(budget_id)
        ws = self._workspaces[workspace]
        if entry.guard is None:
            del ws.open[budget_id]
            ws.refresh()
        else:
            bucket = ws.guarded[entry.guard]
            del bucket[budget_id]
            if not bucket:
                del ws.guarded[entry.guard]
            ws.guard_names[entry.guard[0]] -= 1
            if not ws.guard_names[entry.guard[0]]:
                del ws.guard_names[entry.guard[0]]
        if not ws.open and not ws.guarded:
            del self._workspaces[workspace]

    def match(self, facts: RequestFacts, now: datetime) -> list[Budget]:
        """Every active, unexpired budget of the request's workspace that applies to it."""
        found: list[Budget] = []
        if self._scoped:
            get = self._scoped.get
            ws_id = facts.workspace
            keys = [
                (ws_id, ScopeKind.WORKSPACE, ""),
                (ws_id, ScopeKind.PROJECT, facts.project),
                (ws_id, ScopeKind.API_KEY, facts.api_key),
                (ws_id, ScopeKind.PROVIDER, facts.provider),
            ]
            if facts.identity:
                keys.append((ws_id, ScopeKind.IDENTITY, facts.identity))
            for model_key in facts.model_keys:
                keys.append((ws_id, ScopeKind.MODEL, model_key))
            for key in keys:
                budget = get(key)
                if budget is not None and budget.applies(now):
                    found.append(budget)
        ws = self._workspaces.get(facts.workspace)
        if ws is None:
            return found
        candidates = list(ws.open.values())
        needed = set(ws.open_variables)
        for name in ws.guard_names:
            value = facts.fact(name)
            if value is not None:
                bucket = ws.guarded.get((name, value))
                if bucket:
                    for entry in bucket.values():
                        candidates.append(entry)
                        needed.update(entry.variables)
        context: cel.Context | None = None
        for entry in candidates:
            if not entry.budget.applies(now):
                continue
            if entry.program is None:
                found.append(entry.budget)
                continue
            if context is None:
                context = self._context(facts, needed)
            if self._evaluate(entry, context):
                found.append(entry.budget)
        return found

    def _context(self, facts: RequestFacts, needed: set[str]) -> cel.Context:
        # Converting a variable into CEL costs microseconds (a map ~10x a string), so one context is reused
        # from request to request (`match` never awaits, so requests cannot interleave here) and a variable
        # is converted only if a candidate reads it and its value differs from the previous request's.
        context, last = self._cel_context, self._cel_values
        for name in needed:
            value = facts.cel_raw(name)
            if last.get(name, _UNSET) != value:
                context.add_variable(name, facts.cel_value(name))
                last[name] = value if isinstance(value, str) else dict(value)
        return context

    def _evaluate(self, entry: _CelBudget, context: cel.Context) -> bool:
        assert entry.program is not None
        try:
            result = entry.program.execute(context)
        except Exception as exc:  # the CEL runtime raises KeyError, TypeError, RuntimeError, ...
            self._cel_error(entry.budget, f"{type(exc).__name__}: {exc}")
            return False
        if not isinstance(result, bool):
            self._cel_error(entry.budget, f"result is {type(result).__name__}, not bool")
            return False
        return result

    def _cel_error(self, budget: Budget, reason: str) -> None:
        self.cel_errors += 1
        if budget.budget_id not in self._warned:
            self._warned.add(budget.budget_id)
            logger.warning(
                "budget %s: CEL evaluation failed, treated as no match (%s)", budget.budget_id, reason
            )


def model_keys(provider: str | None, model: str | None, model_ref: str | None) -> tuple[str, ...]:
    """The spellings a model scope may use for this request: `provider/model`, the client's ref, the name."""
    keys: list[str] = []
    for key in (f"{provider}/{model}" if provider and model else None, model_ref, model):
        if key and key not in keys:
            keys.append(key)
    return tuple(keys)
