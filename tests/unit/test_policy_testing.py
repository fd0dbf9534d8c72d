"""The opa-test-like runner over the fixture policy directories in tests/unit/rego/."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.policy.testing import (
    TestReport,
    format_report,
    load_engine,
    parse_regorus_error,
    run_tests,
)

REGO = Path(__file__).parent / "rego"


def outcomes(report: TestReport) -> dict[str, str]:
    return {r.name: r.outcome for r in report.results}


def test_passing_suite() -> None:
    report = run_tests(REGO / "passing")
    assert outcomes(report) == {
        "test_admin_allowed": "pass",
        "test_user_allowed_for_listed_capability": "pass",  # needs limits/data.json
        "test_guest_denied_with_reason": "pass",
    }
    assert report.ok
    assert report.coverage is None
    first = report.results[0]
    assert (first.package, first.file, first.line) == (
        "data.gateway.dispatch_test",
        "passing/dispatch_test.rego",
        7,
    )
    assert all(r.duration_ns > 0 for r in report.results)


def test_prints_are_kept_per_test() -> None:
    report = run_tests(REGO / "passing")
    prints = {r.name: r.prints for r in report.results}
    assert prints["test_guest_denied_with_reason"] == [
        'passing/dispatch_test.rego:18: reasons: {"not an admin or an allowed capability"}'
    ]
    assert prints["test_admin_allowed"] == []


@pytest.mark.parametrize(
    ("name", "outcome", "line", "message"),
    [
        ("test_limit_is_ten", "pass", 8, ""),
        ("test_limit_is_eleven", "fail", 12, "undefined"),
        ("test_not_boolean", "fail", 20, "result is 42, not true"),
        ("test_default_false", "fail", 30, "result is false, not true"),
        ("test_divide_by_zero", "error", 16, "mixed/policy.rego:7:16: divide by zero"),
        (
            "test_conflicting_level",
            "error",
            7,
            "mixed/conflict.rego:7:1: rule conflicts with rule at mixed/conflict.rego:5:1",
        ),
    ],
)
def test_mixed_suite(name: str, outcome: str, line: int, message: str) -> None:
    report = run_tests(REGO / "mixed")
    (result,) = [r for r in report.results if r.name == name]
    assert (result.outcome, result.line, result.message) == (outcome, line, message)


def test_functions_todo_tests_and_plain_rules_are_not_tests() -> None:
    names = set(outcomes(run_tests(REGO / "mixed")))
    assert "test_with_arg" not in names
    assert "todo_test_skipped" not in names
    assert len(names) == 6


def test_run_filter_selects_tests_by_path() -> None:
    report = run_tests(REGO / "mixed", run=r"mixed_test\.test_limit")
    assert sorted(outcomes(report)) == ["test_limit_is_eleven", "test_limit_is_ten"]


def test_coverage_counts_non_test_files_only() -> None:
    report = run_tests(REGO / "passing", coverage=True)
    assert report.coverage == {
        "passing/dispatch.rego": {
            "covered": [5, 8, 12, 13, 16, 18],
            "not_covered": [],
            "percent": 100.0,
        },
        # No test touches it: regorus would leave it out; the runner counts it as 0%.
        "passing/untested.rego": {"covered": [], "not_covered": [6, 7], "percent": 0.0},
    }


def test_coverage_is_the_union_over_tests() -> None:
    only_admin = run_tests(REGO / "passing", coverage=True, run="admin")
    assert only_admin.coverage is not None
    dispatch = only_admin.coverage["passing/dispatch.rego"]
    assert dispatch["not_covered"] == [13]  # only the user test reaches line 13
    assert dispatch["percent"] == pytest.approx(83.33)


@pytest.mark.parametrize(
    ("directory", "location", "message"),
    [
        ("syntax", "syntax/broken.rego:7:1", "expecting expression"),
        ("unsafe", "unsafe/unsafe.rego:6:5", "use of undefined variable `x` is unsafe"),
    ],
)
def test_a_bad_module_is_a_config_error(directory: str, location: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        run_tests(REGO / directory)
    assert (caught.value.location, caught.value.message) == (location, message)
    assert "\n" not in caught.value.message


def test_bad_data_json_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text("package p\n\nimport rego.v1\n\ntest_a if true\n")
    (tmp_path / "data.json").write_text('{"a": \n')
    with pytest.raises(ConfigError) as caught:
        run_tests(tmp_path)
    assert caught.value.location is not None
    assert caught.value.location.startswith(f"{tmp_path.name}/data.json:")


def test_v0_modules_need_the_v0_flag(tmp_path: Path) -> None:
    (tmp_path / "old_test.rego").write_text("package old\n\ntest_old { true }\n")
    with pytest.raises(ConfigError, match="`if` keyword is required"):
        run_tests(tmp_path)
    assert outcomes(run_tests(tmp_path, v0_compatible=True)) == {"test_old": "pass"}


def test_load_engine_for_evaluation() -> None:
    engine = load_engine(REGO / "passing", data={"extra": 1})
    engine.set_input({"subject": {"role": "guest"}})
    decision = engine.eval_rule("data.gateway.dispatch.decision")
    assert decision["allow"] is False
    for query, value in [("data.extra", 1), ("data.limits.allowed[0]", "text.summarize")]:
        (answer,) = engine.eval_query(query)["result"]
        assert answer["expressions"][0]["value"] == value
    with pytest.raises(RuntimeError, match="not a valid rule path"):
        engine.eval_rule("data.gateway.dispatch_test.test_admin_allowed")  # tests left out


@pytest.mark.parametrize(
    ("raw", "location", "message"),
    [
        (
            "\n--> p/a.rego:3:23\n  |\n3 | allow if { input.x == }\n  |   ^\n"
            "error: expecting expression",
            "p/a.rego:3:23",
            "expecting expression",
        ),
        ("not a valid rule path", None, "not a valid rule path"),
        ("", None, "unknown error"),
    ],
)
def test_parse_regorus_error(raw: str, location: str | None, message: str) -> None:
    assert parse_regorus_error(raw) == (location, message)


def test_format_report_quiet_lists_only_problems() -> None:
    text = format_report(run_tests(REGO / "mixed"))
    assert "data.mixed_test.test_limit_is_ten" not in text
    assert "data.mixed_test.test_limit_is_eleven: FAIL" in text
    assert "mixed/policy_test.rego:16: mixed/policy.rego:7:16: divide by zero" in text
    assert text.rstrip().splitlines()[-3:] == ["PASS: 1/6", "FAIL: 3/6", "ERROR: 2/6"]


def test_format_report_verbose_with_coverage() -> None:
    text = format_report(run_tests(REGO / "passing", coverage=True, run="admin"), verbose=True)
    assert "data.gateway.dispatch_test.test_admin_allowed: PASS" in text
    assert "PASS: 1/1" in text
    assert "passing/dispatch.rego: 83.33% (5/6 lines), not covered: 13" in text
    assert "passing/untested.rego: 0.00% (0/2 lines), not covered: 6-7" in text
    assert "FAIL" not in text


def test_an_empty_directory_is_not_ok(tmp_path: Path) -> None:
    report = run_tests(tmp_path)
    assert not report.ok
    assert "no tests found" in format_report(report)
