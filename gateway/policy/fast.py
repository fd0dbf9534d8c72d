"""The compiled fast path: regorus' ``Program``/``Rvm``, with the ``Engine`` as the authority.

An ``Rvm`` evaluates a compiled program in about a quarter of the ``Engine``'s time, but it
is not a faithful Rego evaluator (regorus 0.13, measured; DESIGN §4):

- ``v := <undefined>`` in a rule body does not fail the body (``v = ...`` does): a guard
  ``v == v`` is added after each such statement in the copy the ``Rvm`` compiles
  (``guard_assignments``), which a correct evaluator evaluates to true for any defined ``v``;
- an undefined value it does not fail on becomes the string ``"<undefined>"`` in the result,
  and an undefined decision is that string: any result carrying it is not used;
- it answers where the ``Engine`` raises, e.g. a complete rule (or an object rule's key) that
  takes two values: a query that may reach such a rule (``conflict_risks``) has no fast path.

So the fast path only ever answers an *allow*: anything else (undefined, not an object, a
deny, an error, over budget) is evaluated again by the ``Engine``, which gives the reason or
the error and fails closed as it always did. Allows are trusted only once the revision has
been cross-checked (``RegorusPolicy.cross_check``): every policy test's input and every
logged input a reload replays is evaluated by both, and one difference turns the fast path
off for the whole revision. Objects are bound to the thread that made them (DESIGN §4).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import regorus

from gateway.logs import get_logger

log = get_logger(__name__)

UNDEFINED_MARK = '"<undefined>"'
_LITERALS = frozenset(("Number", "String", "RawString", "Bool", "Null"))
_COMPREHENSIONS = frozenset(("ArrayCompr", "SetCompr", "ObjectCompr"))


def _walk(node: Any) -> Iterable[dict[str, Any]]:
    """Every dict under ``node`` (an AST in regorus' JSON form), depth first."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _vars(node: Any) -> list[str]:
    names = []
    for item in _walk(node):
        var = item.get("Var")
        if isinstance(var, dict) and var.get("value") not in (None, "_"):
            names.append(var["value"])
    return sorted(set(names))


def guard_assignments(source: str, module_ast: dict[str, Any]) -> str:
    """``source`` with ``; v == v`` after every body statement ``v := ...`` (see the module doc)."""
    inserts: list[tuple[int, str]] = []
    for item in _walk(module_ast):
        stmts = item.get("stmts")
        if not isinstance(stmts, list):
            continue
        for stmt in stmts:
            expr = stmt.get("literal", {}).get("Expr", {}).get("expr", {})
            assign = expr.get("AssignExpr") if isinstance(expr, dict) else None
            if not assign or assign.get("op") != "ColEq":
                continue
            names = _vars(assign.get("lhs"))
            if names:
                inserts.append((stmt["span"]["end"], "".join(f"; {n} == {n}" for n in names)))
    # Spans are byte offsets.
    raw = source.encode("utf-8")
    for end, text in sorted(inserts, reverse=True):
        raw = raw[:end] + text.encode("utf-8") + raw[end:]
    return raw.decode("utf-8")


def _ref_text(node: Any) -> str:
    """``a.b.c`` of a Var/RefDot chain (the package or a rule's name)."""
    if "Var" in node:
        return str(node["Var"]["value"])
    if "RefDot" in node:
        dot = node["RefDot"]
        return f"{_ref_text(dot['refr'])}.{dot['field'][1]}"
    if "RefBrack" in node:
        return _ref_text(node["RefBrack"]["refr"])
    return "?"


def _iterates(bodies: list[dict[str, Any]]) -> bool:
    """Whether a body may have several solutions: ``some`` or a ``_`` index at its top level
    (not inside a comprehension, which is one value)."""
    for body in bodies:
        for stmt in body["query"]["stmts"]:
            literal = stmt["literal"]
            if "SomeIn" in literal or "SomeVars" in literal:
                return True
            stack: list[Any] = [literal]
            while stack:
                item = stack.pop()
                if isinstance(item, list):
                    stack.extend(item)
                elif isinstance(item, dict):
                    if any(k in _COMPREHENSIONS for k in item):
                        continue
                    brack = item.get("RefBrack")
                    if isinstance(brack, dict) and brack.get("index", {}).get("Var", {}).get(
                        "value"
                    ) == ("_"):
                        return True
                    stack.extend(item.values())
    return False


@dataclass
class _Definitions:
    values: list[Any] = field(default_factory=list)
    risky: bool = False
    where: str = ""


def conflict_risks(modules: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per package, the rules that may take two values (where the ``Rvm`` answers and the
    ``Engine`` raises): a value rule whose body iterates, an object rule with a computed
    value, or several definitions not all the same literal. Conservative, not complete: an
    implicit iteration over an unbound variable (``xs[i]``) is not seen."""
    found: dict[tuple[str, str], _Definitions] = {}
    for module in modules:
        package = _ref_text(module["ast"]["package"]["refr"])
        for rule in module["ast"]["rules"]:
            ((variant, body),) = rule.items()
            if variant == "Default":
                continue
            ((kind, head),) = body["head"].items()
            assign = head.get("assign")
            if kind == "Set" or assign is None:
                continue  # a set, or a boolean rule/function: every solution gives true
            value = assign["value"]
            ((value_kind, value_body),) = value.items()
            literal = (value_kind, value_body.get("value")) if value_kind in _LITERALS else None
            if literal == ("Bool", True) and "RefBrack" not in head["refr"]:
                continue
            name = _ref_text(head["refr"])
            defs = found.setdefault((package, name), _Definitions())
            defs.where = defs.where or f"{module['source']['file']}:{body['span']['line']}"
            defs.values.append(literal)
            object_rule = "RefBrack" in head["refr"]
            if _iterates(body["bodies"]) or (object_rule and literal is None):
                defs.risky = True
    risks: dict[str, list[str]] = {}
    for (package, name), defs in sorted(found.items()):
        several = len(defs.values) > 1 and (None in defs.values or len(set(defs.values)) > 1)
        if defs.risky or several:
            risks.setdefault(package, []).append(f"{name} ({defs.where})")
    return risks


def _depends(modules: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Packages each package may read (``data.<pkg>`` named in its source), transitively."""
    sources: dict[str, str] = {}
    for module in modules:
        package = _ref_text(module["ast"]["package"]["refr"])
        sources[package] = sources.get(package, "") + module["source"]["contents"]
    direct = {
        p: {q for q in sources if q == p or f"data.{q}" in text} for p, text in sources.items()
    }
    closure = {p: set(d) for p, d in direct.items()}
    changed = True
    while changed:
        changed = False
        for reach in closure.values():
            more = set().union(*(closure.get(q, set()) for q in reach)) - reach
            if more:
                reach |= more
                changed = True
    return closure


@dataclass
class FastPath:
    """Compiled programs, one ``Rvm`` per query, and whether the revision earned them."""

    rvms: dict[str, Any]
    # Why a query has no program (did not compile, may reach a conflicting rule).
    excluded: dict[str, str] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)
    disabled: dict[str, Any] | None = None
    answered: int = 0
    fell_back: int = 0

    @classmethod
    def build(cls, ast_json: str, data: dict[str, Any], queries: Iterable[str]) -> FastPath:
        """Compile each query from ``ast_json`` (``Engine.get_ast_as_json()``: file names and
        sources) with ``data``; a query that does not compile or may conflict is excluded."""
        modules = json.loads(ast_json)
        sources = [
            (m["source"]["file"], guard_assignments(m["source"]["contents"], m["ast"]))
            for m in modules
        ]
        risks = conflict_risks(modules)
        depends = _depends(modules)
        data_json = json.dumps(data)
        rvms: dict[str, Any] = {}
        excluded: dict[str, str] = {}
        for query in queries:
            package = query.removeprefix("data.").rpartition(".")[0]
            risky = sorted(r for p in depends.get(package, {package}) for r in risks.get(p, ()))
            if risky:
                excluded[query] = "may reach a rule with two values: " + ", ".join(risky)
                continue
            try:
                program = regorus.Program.compile_from_modules(data_json, sources, [query])
                rvm = regorus.Rvm()
                rvm.load_program(program)
                # The data given to the compiler is not what the program reads at run time.
                rvm.set_data_json(data_json)
            except Exception as e:
                excluded[query] = f"does not compile for the Rvm: {str(e).splitlines()[0]}"
                continue
            rvms[query] = rvm
        for query, why in excluded.items():
            log.info("policy fast path excluded", extra={"query": query, "reason": why})
        return cls(rvms=rvms, excluded=excluded)

    def on(self, query: str) -> bool:
        """Whether ``query`` is answered by the ``Rvm`` (checked on at least one input)."""
        return self.disabled is None and self.checked.get(query, 0) > 0 and query in self.rvms

    def raw(self, query: str, input: dict[str, Any]) -> Any:
        """The ``Rvm``'s decision value, or None when it is not to be used (never raises)."""
        rvm = self.rvms.get(query)
        if rvm is None:
            return None
        try:
            rvm.set_input_json(json.dumps(input))
            text = rvm.execute_entry_point(query)
        except Exception:
            return None
        except BaseException as e:
            # pyo3 panics are BaseException; they must not escape as a crash of the hub.
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            return None
        if UNDEFINED_MARK in text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    def disable(
        self, query: str, input: dict[str, Any], engine: Any, rvm: Any, source: str
    ) -> None:
        """Turn the fast path off for this revision, keeping what differed."""
        self.disabled = {
            "query": query,
            "source": source,
            "input": input,
            "engine": engine,
            "rvm": rvm,
        }
        log.warning(
            "policy fast path disabled: the Rvm and the Engine differ",
            extra={"query": query, "source": source, "input": json.dumps(input, default=str)},
        )

    def to_json(self) -> dict[str, Any]:
        """What /v1/status shows: per query on/off and why, the difference that disabled it."""
        queries = {}
        for query in sorted({*self.rvms, *self.excluded}):
            entry: dict[str, Any] = {"on": self.on(query), "checked": self.checked.get(query, 0)}
            if query in self.excluded:
                entry["excluded"] = self.excluded[query]
            queries[query] = entry
        return {
            "queries": queries,
            "disabled": self.disabled,
            "answered": self.answered,
            "fell_back": self.fell_back,
        }
