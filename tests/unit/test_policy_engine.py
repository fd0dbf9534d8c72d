"""The policy engine fails closed: every doubt is a deny with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.engine import DISPATCH_QUERY, RegorusPolicy, interpret

PACKAGE = "package gateway.dispatch\n\nimport rego.v1\n\n"


def policy_from(tmp_path: Path, body: str, **kwargs: object) -> RegorusPolicy:
    root = tmp_path / "policies"
    root.mkdir(exist_ok=True)
    (root / "dispatch.rego").write_text(PACKAGE + body)
    return RegorusPolicy.load(root, required=(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('decision := {"allow": true} if input.never\n', "decision is undefined"),
        ("x := 1\n", "no rule defines data.gateway.dispatch.decision"),
        ("decision := 7\n", "decision is a int, not an object"),
        ('decision := {"allow": "yes"}\n', "decision.allow is not a boolean"),
        ('decision := {"reasons": ["no allow key"]}\n', "decision.allow is not a boolean"),
        ('decision := {"allow": true, "sandbox": [1]}\n', "decision.sandbox is not an object"),
        ('decision := {"allow": false}\n', "denied by policy (no reason given)"),
        ('decision := {"allow": 1 / input.zero}\n', "policy error"),
        (
            'decision := {"allow": true} if input.a\ndecision := {"allow": false} if input.a\n',
            "policy error at policies/dispatch.rego",
        ),
    ],
    ids=[
        "undefined",
        "no decision rule",
        "not an object",
        "allow not bool",
        "allow missing",
        "sandbox not object",
        "deny without reasons",
        "divide by zero",
        "conflict at eval time",
    ],
)
def test_every_doubt_is_a_deny_with_its_reason(tmp_path: Path, body: str, reason: str) -> None:
    policy = policy_from(tmp_path, body)
    decision = policy.evaluate(DISPATCH_QUERY, {"zero": 0, "a": True})
    assert decision.allow is False
    assert any(reason in r for r in decision.reasons), decision.reasons


def test_allow_with_sets_becomes_json(tmp_path: Path) -> None:
    policy = policy_from(
        tmp_path,
        'reasons contains "ok"\nreasons contains "fine"\n'
        'decision := {"allow": true, "reasons": reasons, "sandbox": {"tags": {"b", "a"}}}\n',
    )
    decision = policy.evaluate(DISPATCH_QUERY, {})
    assert decision.allow is True
    assert decision.reasons == ("fine", "ok")
    assert decision.sandbox == {"tags": ["a", "b"]}
    assert decision.eval_ns > 0


def test_over_budget_is_a_deny(tmp_path: Path) -> None:
    # A deliberately slow rule (a large comprehension) against a 0.001 ms budget.
    policy = policy_from(
        tmp_path,
        'n := count([x | some x in numbers.range(1, 20000)])\ndecision := {"allow": n > 0}\n',
        budget_ms=0.001,
    )
    decision = policy.evaluate(DISPATCH_QUERY, {})
    assert decision.allow is False
    assert "over its 0.001 ms budget" in decision.reasons[0]


def test_interpret_keeps_a_valid_decision() -> None:
    d = interpret({"allow": True, "reasons": ["allowed"], "sandbox": {"network": "internal"}})
    assert (d.allow, d.reasons, d.sandbox, d.error) == (
        True,
        ("allowed",),
        {"network": "internal"},
        None,
    )
