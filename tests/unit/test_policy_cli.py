"""``agent-gateway policy test`` as a user (and CI) runs it: output, verbosity, coverage,
filters, JSON, and exit codes, like ``opa test``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from tests.conftest import REPO

REGO = Path(__file__).parent / "rego"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", "test", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_passing_suite_prints_totals_only(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(REGO / "passing"))
    assert code == 0
    assert out.strip() == "PASS: 3/3"


def test_verbose_lists_every_test_by_file_with_prints(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(REGO / "passing"), "-v")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "passing/dispatch_test.rego:"
    passed = [line.split(":")[0] for line in lines if ": PASS (" in line]
    assert passed == [
        "data.gateway.dispatch_test.test_admin_allowed",
        "data.gateway.dispatch_test.test_user_allowed_for_listed_capability",
        "data.gateway.dispatch_test.test_guest_denied_with_reason",
    ]
    assert (
        '  passing/dispatch_test.rego:18: reasons: {"not an admin or an allowed capability"}'
        in lines
    )
    assert lines[-1] == "PASS: 3/3"


def test_failures_and_errors_give_file_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, str(REGO / "mixed"))
    assert code == 1
    assert "data.mixed_test.test_limit_is_ten" not in out  # passes are quiet
    assert "data.mixed_test.test_limit_is_eleven: FAIL" in out
    assert "  mixed/policy_test.rego:12: undefined" in out
    assert "data.conflict_test.test_conflicting_level: ERROR" in out
    assert (
        "  mixed/conflict_test.rego:7: mixed/conflict.rego:7:1: "
        "rule conflicts with rule at mixed/conflict.rego:5:1"
    ) in out
    assert out.splitlines()[-3:] == ["PASS: 1/6", "FAIL: 3/6", "ERROR: 2/6"]


def test_coverage_per_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(REGO / "passing"), "--coverage")
    assert code == 0
    coverage = out.split("Coverage:\n", 1)[1].splitlines()
    assert coverage == [
        "  passing/dispatch.rego: 100.00% (6/6 lines)",
        "  passing/untested.rego: 0.00% (0/2 lines), not covered: 6-7",
        "  total: 75.00%",
    ]


def test_run_filter_and_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(REGO / "mixed"), "--run", "test_limit", "--format", "json")
    report = json.loads(out)
    assert code == 1  # test_limit_is_eleven fails
    assert [(r["name"], r["outcome"], r["line"]) for r in report["results"]] == [
        ("test_limit_is_ten", "pass", 8),
        ("test_limit_is_eleven", "fail", 12),
    ]
    assert report["counts"] == {"pass": 1, "fail": 1, "error": 0}
    code, out, _ = run(capsys, str(REGO / "mixed"), "-r", "is_ten$")
    assert (code, out.strip()) == (0, "PASS: 1/1")


@pytest.mark.parametrize(
    ("directory", "message"),
    [
        ("syntax", "error: syntax/broken.rego:7:1: expecting expression"),
        ("does-not-exist", "policy directory not found"),
    ],
)
def test_modules_that_do_not_compile_are_an_error(
    capsys: pytest.CaptureFixture[str], directory: str, message: str
) -> None:
    code, out, err = run(capsys, str(REGO / directory))
    assert code == 1
    assert message in err
    assert out == ""


def test_no_tests_is_a_failure(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text("package p\n\nx := 1\n")
    code, out, _ = run(capsys, str(tmp_path))
    assert (code, out.strip()) == (1, "no tests found")


def test_the_shipped_policies_pass_with_coverage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(REPO / "policies"), "--coverage")
    assert code == 0, out
    assert "FAIL" not in out and "ERROR" not in out
    assert "policies/dispatch.rego:" in out and "policies/messages.rego:" in out
    # CI runs the same command (scripts/test.sh, called by .ci/run).
    assert "policy test policies/" in (REPO / "scripts" / "test.sh").read_text()
