"""The compiled fast path answers exactly like the Engine, or leaves the answer to it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.bundle.config import load_config
from gateway.bundle.reload import check_recent_inputs
from gateway.policy.engine import (
    DISPATCH_QUERY,
    HUB_QUERIES,
    RegorusPolicy,
)
from gateway.policy.fast import conflict_risks, guard_assignments
from gateway.policy.testing import policy_test_inputs
from gateway.settings import REPO_ROOT

PACKAGE = "package gateway.dispatch\n\nimport rego.v1\n\n"


def shipped() -> Any:
    return load_config(
        agents_file=REPO_ROOT / "agents.yaml",
        schemas_dir=REPO_ROOT / "schemas",
        policies_dir=REPO_ROOT / "policies",
    )


def policy_from(tmp_path: Path, body: str) -> RegorusPolicy:
    root = tmp_path / "policies"
    root.mkdir(exist_ok=True)
    (root / "dispatch.rego").write_text(PACKAGE + body)
    return RegorusPolicy.load(root, required=(), fast_path=True)


def test_shipped_policies_answer_exactly_like_the_engine() -> None:
    config = shipped()
    policy = config.policy
    status = policy.fast_path_status()
    assert status is not None and status["disabled"] is None
    on = {q for q, v in status["queries"].items() if v["on"]}
    assert on >= {"data.gateway.api.decision", "data.gateway.messages.decision"}
    cases = policy_test_inputs(REPO_ROOT / "policies")
    seen: dict[str, set[bool]] = {}
    for query, policy_input in cases:
        expected = policy._engine_decide(query, policy_input)
        got = policy.evaluate(query, policy_input)
        assert got.to_json() == expected.to_json(), (query, policy_input)
        assert (got.allow, got.sandbox, got.extra) == (
            expected.allow,
            expected.sandbox,
            expected.extra,
        )
        seen.setdefault(query, set()).add(got.allow)
    # Every hub query was asked with an allowed and a denied input, and the Rvm answered.
    assert {q: seen.get(q) for q in HUB_QUERIES} == {q: {True, False} for q in HUB_QUERIES}
    assert policy.fast is not None and policy.fast.answered > 0


def test_shipped_dispatch_refuses_two_restricted_capabilities_on_the_fast_path() -> None:
    # restricted_sandbox once took two values for an agent with two restricted capabilities
    # (the Engine raised, the Rvm allowed one sandbox); the policy now refuses such an agent
    # with a reason, so the rule has one value and every shipped query runs compiled.
    config = shipped()
    policy = config.policy
    assert policy.fast is not None
    assert policy.fast.excluded == {}
    assert all(policy.fast.on(q) for q in HUB_QUERIES)
    caps = ["code.eval", "debug.probe"]
    policy_input = {
        "subject": {"id": "dave", "roles": ["user", "developer"]},
        "task": {"agent": "calc", "input": {}},
        "agent": {**config.registry.get("calc").to_json(), "capabilities": caps},
        "request": {"method": "POST", "path": "/v1/tasks"},
    }
    decision = policy.evaluate(DISPATCH_QUERY, policy_input)
    assert decision.allow is False and decision.error is None
    assert any("at most one restricted capability" in r for r in decision.reasons)
    one = {**policy_input, "agent": config.registry.get("calc").to_json()}
    assert policy.evaluate(DISPATCH_QUERY, one).allow is True


def test_undefined_assignment_is_guarded(tmp_path: Path) -> None:
    body = (
        'deny contains "no target" if { t := input.target\n\tnot t == "x" }\n'
        'decision := {"allow": count(deny) == 0, "reasons": deny}\n'
    )
    policy = policy_from(tmp_path, body)
    assert policy.cross_check([(DISPATCH_QUERY, {"target": "x"})], source="test")
    # Without the guard the Rvm puts "no target" in deny although t is undefined.
    decision = policy.evaluate(DISPATCH_QUERY, {})
    assert decision.allow is True
    assert policy.fast is not None and policy.fast.answered == 1
    src = PACKAGE + body
    engine = policy.engine
    ast = next(m["ast"] for m in json.loads(engine.get_ast_as_json()))
    assert "t := input.target; t == t" in guard_assignments(src, ast)


def test_undefined_falls_back_to_the_engine(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, 'decision := {"allow": true} if input.ok\n')
    assert policy.cross_check([(DISPATCH_QUERY, {"ok": True})], source="test")
    assert policy.evaluate(DISPATCH_QUERY, {"ok": True}).allow is True
    decision = policy.evaluate(DISPATCH_QUERY, {})
    assert decision.allow is False
    assert decision.reasons == ("policy error: decision is undefined",)
    assert policy.fast is not None and (policy.fast.answered, policy.fast.fell_back) == (1, 1)


class Raising:
    """An Rvm that fails on every call, like a panic or a runtime error."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def set_input_json(self, text: str) -> None:
        raise self.exc

    def execute_entry_point(self, query: str) -> str:
        raise self.exc


class Answering:
    """An Rvm that always answers ``value``."""

    def __init__(self, value: Any) -> None:
        self.text = json.dumps(value)

    def set_input_json(self, text: str) -> None:
        pass

    def execute_entry_point(self, query: str) -> str:
        return self.text


class FakePanic(BaseException):
    """Like pyo3's PanicException: not an Exception."""


@pytest.mark.parametrize("exc", [RuntimeError("boom"), FakePanic("thread")], ids=["error", "panic"])
def test_an_rvm_failure_fails_over_and_never_allows(tmp_path: Path, exc: BaseException) -> None:
    policy = policy_from(
        tmp_path, 'decision := {"allow": input.ok == true, "reasons": ["not ok"]}\n'
    )
    assert policy.cross_check([(DISPATCH_QUERY, {"ok": True})], source="test")
    assert policy.fast is not None
    policy.fast.rvms[DISPATCH_QUERY] = Raising(exc)
    decision = policy.evaluate(DISPATCH_QUERY, {"ok": False})
    assert (decision.allow, decision.reasons) == (False, ("not ok",))
    assert policy.evaluate(DISPATCH_QUERY, {"ok": True}).allow is True  # the Engine's allow
    assert policy.fast.answered == 0


def test_a_fast_deny_is_decided_again_by_the_engine(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, 'decision := {"allow": true, "reasons": ["fine"]}\n')
    assert policy.cross_check([(DISPATCH_QUERY, {})], source="test")
    assert policy.fast is not None
    policy.fast.rvms[DISPATCH_QUERY] = Answering({"allow": False, "reasons": ["rvm says no"]})
    assert policy.evaluate(DISPATCH_QUERY, {}).reasons == ("fine",)


def test_cross_check_disables_on_a_fake_rvm_that_differs(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, 'decision := {"allow": input.ok == true}\n')
    assert policy.fast is not None
    policy.fast.rvms[DISPATCH_QUERY] = Answering({"allow": True})
    assert not policy.cross_check(
        [(DISPATCH_QUERY, {"ok": True}), (DISPATCH_QUERY, {"ok": False})], source="test"
    )
    disabled = policy.fast_path_status()["disabled"]  # type: ignore[index]
    assert disabled["query"] == DISPATCH_QUERY and disabled["input"] == {"ok": False}
    assert disabled["engine"]["allow"] is False and disabled["rvm"]["allow"] is True
    # Off for the revision: the fake's allow is no longer used, and a later check keeps it off.
    assert policy.evaluate(DISPATCH_QUERY, {"ok": False}).allow is False
    assert not policy.cross_check([(DISPATCH_QUERY, {"ok": True})], source="test")


def test_cross_check_catches_a_real_rvm_difference_on_logged_inputs(tmp_path: Path) -> None:
    # Implicit iteration (an unbound index) escapes the static conflict check: with two
    # values the Engine raises and the Rvm picks one.
    policy = policy_from(
        tmp_path,
        'size := input.sizes[i] if input.sizes[i] > 0\ndecision := {"allow": size > 1}\n',
    )
    assert policy.cross_check([(DISPATCH_QUERY, {"sizes": [5]})], source="test")
    records = [{"kind": "dispatch", "input": {"sizes": [2, 3]}, "decision_id": "d1"}]
    assert check_recent_inputs(SimpleNamespace(policy=policy), records) == 1  # type: ignore[arg-type]
    assert policy.evaluate(DISPATCH_QUERY, {"sizes": [2, 3]}).allow is False  # the Engine's
    disabled = policy.fast_path_status()["disabled"]  # type: ignore[index]
    assert disabled["source"] == "logged decisions" and disabled["input"] == {"sizes": [2, 3]}


def test_fast_path_stays_off_until_checked(tmp_path: Path) -> None:
    policy = policy_from(tmp_path, 'decision := {"allow": true}\n')
    assert policy.fast is not None
    policy.fast.rvms[DISPATCH_QUERY] = Raising(AssertionError("the Rvm must not be asked"))
    assert policy.evaluate(DISPATCH_QUERY, {}).allow is True
    assert policy.fast.fell_back == 0


def test_conflict_risks_are_found() -> None:
    import regorus

    engine = regorus.Engine()
    engine.add_policy(
        "t.rego",
        PACKAGE + "a := v if { some v in input.l }\n"
        "b := 1 if input.x\nb := 2 if input.y\n"
        'c := 1 if input.x\nc := 1 if input.y\no[k] := input.m[k] if { some k in ["a"] }\n'
        'd := "x" if input.z\nelse := "y"\nok if { some v in input.l }\n',
    )
    risks = conflict_risks(json.loads(engine.get_ast_as_json()))
    assert [r.split(" ")[0] for r in risks["gateway.dispatch"]] == ["a", "b", "o"]
