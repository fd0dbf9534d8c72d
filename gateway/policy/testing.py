"""An ``opa test``-like runner for the Rego modules under a directory, on regorus.

regorus has no test runner, so tests are found by walking ``Engine.get_ast_as_json()`` for
rules named ``test_*`` (``todo_test_*`` are skipped, as in OPA) and each one is evaluated
with ``eval_rule``: ``true`` passes, undefined or any other value fails, an evaluation error
(divide by zero, rule conflict...) is an error carrying its ``file:line:col``.

Every test runs in its own ``clone()`` of one engine that was prepared (compiled) once:
measured, a clone of a prepared engine costs a few µs while compiling again costs
milliseconds per test, and a clone keeps prints and coverage per test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Without this every regorus error message carries a Rust backtrace.
os.environ["RUST_BACKTRACE"] = "0"
os.environ["RUST_LIB_BACKTRACE"] = "0"

import regorus

from gateway.errors import ConfigError
from gateway.logs import get_logger
from gateway.policy.engine import HUB_QUERIES
from gateway.policy.engine import data_documents as _data_documents
from gateway.policy.engine import parse_engine_error as parse_regorus_error

log = get_logger(__name__)

Outcome = Literal["pass", "fail", "error"]

TEST_PREFIX = "test_"
TODO_PREFIX = "todo_test_"
TEST_FILE_SUFFIX = "_test.rego"
CAPTURE_MARK = "__gateway_captured_input__"


@dataclass(frozen=True)
class TestResult:
    """One test rule's outcome; ``file``/``line`` locate its first definition."""

    __test__ = False  # not a pytest test class

    package: str
    name: str
    file: str
    line: int
    outcome: Outcome
    duration_ns: int
    message: str = ""
    prints: list[str] = field(default_factory=list)

    @property
    def query(self) -> str:
        """The rule's full path, as ``opa test`` prints it (``data.pkg.test_x``)."""
        return f"{self.package}.{self.name}"


@dataclass(frozen=True)
class TestReport:
    """All results, and per-file line coverage of the non-test modules when it was asked for."""

    __test__ = False

    results: list[TestResult]
    coverage: dict[str, dict[str, Any]] | None = None
    # (query, input) for each distinct input the tests gave a ``capture``d query.
    inputs: list[tuple[str, Any]] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        """How many tests had ``outcome``."""
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def ok(self) -> bool:
        """True when every test passed (and there was at least one)."""
        return bool(self.results) and all(r.outcome == "pass" for r in self.results)


def _display(root: Path, path: Path) -> str:
    # The same "policies/x.rego" naming as the runtime engine, so locations agree.
    return f"{root.name}/{path.relative_to(root).as_posix()}"


def _load(
    policy_dir: Path,
    *,
    data: dict[str, Any] | None,
    include_tests: bool,
    v0_compatible: bool,
    coverage: bool,
    extra: dict[str, str] | None = None,
) -> tuple[Any, dict[str, str]]:
    """Build and prepare an engine; return it with each module's package by display name.

    ``extra``: more modules (name: source), not counted as the directory's."""
    root = Path(policy_dir)
    if not root.is_dir():
        raise ConfigError("policy directory not found", location=str(root))
    engine = regorus.Engine()
    if v0_compatible:
        engine.set_rego_v0(True)
    engine.set_gather_prints(True)
    if coverage:
        engine.set_enable_coverage(True)
    packages: dict[str, str] = {}
    for path in sorted(root.rglob("*.rego")):
        rel_parts = path.relative_to(root).parts
        if any(p.startswith(".") for p in rel_parts) or not path.is_file():
            continue
        if not include_tests and path.name.endswith(TEST_FILE_SUFFIX):
            continue
        name = _display(root, path)
        try:
            packages[name] = engine.add_policy(name, path.read_text(encoding="utf-8"))
        except RuntimeError as e:
            location, reason = parse_regorus_error(str(e))
            # The error's traceback and this frame form a cycle that only the garbage
            # collector frees, on any thread: drop the (thread-bound) engine now.
            del engine
            raise ConfigError(reason, location=location or name) from e
        except UnicodeDecodeError as e:
            del engine
            raise ConfigError(f"not UTF-8: {e}", location=name) from e
    for name, source in (extra or {}).items():
        try:
            engine.add_policy(name, source)
        except RuntimeError as e:
            location, reason = parse_regorus_error(str(e))
            del engine
            raise ConfigError(reason, location=location or name) from e
    merged = {**_data_documents(root), **(data or {})}
    if merged:
        engine.add_data(merged)
    try:
        # The first evaluation compiles every module: unsafe variables and unknown functions
        # surface here, and a clone of a compiled engine does not compile again.
        engine.eval_query("true")
    except RuntimeError as e:
        location, reason = parse_regorus_error(str(e))
        del engine  # as above
        raise ConfigError(reason, location=location or root.name) from e
    return engine, packages


def load_engine(
    policy_dir: Path,
    *,
    data: dict[str, Any] | None = None,
    include_tests: bool = False,
    v0_compatible: bool = False,
) -> Any:
    """A compiled ``regorus.Engine`` with every module (and data.json) under ``policy_dir``.

    Raises ConfigError with ``file:line:col`` for a syntax or compile error.
    """
    engine, _ = _load(
        Path(policy_dir),
        data=data,
        include_tests=include_tests,
        v0_compatible=v0_compatible,
        coverage=False,
    )
    return engine


def _rule_name(rule: dict[str, Any]) -> tuple[str | None, int]:
    """(name, line) of a rule whose head is a plain name, else (None, 0)."""
    ((variant, body),) = rule.items()
    if variant == "Default":
        refr = body.get("refr")
    else:
        head = body.get("head") or {}
        if len(head) != 1 or "Func" in head:  # a function cannot run without arguments
            return None, 0
        ((_, spec),) = head.items()
        refr = spec.get("refr")
    if isinstance(refr, dict) and "Var" in refr:  # skip ref heads such as test_x.y
        return refr["Var"]["value"], body["span"]["line"]
    return None, 0


def discover_tests(engine: Any, packages: dict[str, str]) -> list[tuple[str, str, str, int]]:
    """Every ``test_*`` rule as (package, name, file, line), first definition wins, file order."""
    found: dict[tuple[str, str], tuple[str, str, str, int]] = {}
    for module in json.loads(engine.get_ast_as_json()):
        file = module["source"]["file"]
        package = packages.get(file)
        if package is None:
            continue
        for rule in module["ast"]["rules"]:
            name, line = _rule_name(rule)
            if not name or not name.startswith(TEST_PREFIX):
                continue
            found.setdefault((package, name), (package, name, file, line))
    return sorted(found.values(), key=lambda t: (t[2], t[3]))


def _coverage_lines(engine: Any) -> dict[str, tuple[set[int], set[int]]]:
    report = json.loads(engine.get_coverage_report_as_json())
    return {
        f["path"]: (set(f.get("covered", ())), set(f.get("not_covered", ())))
        for f in report.get("files", ())
    }


def _coverable(engine: Any, packages: dict[str, str]) -> dict[str, set[int]]:
    """Lines regorus counts for coverage in each non-test module, even those no test touches.

    regorus lists only files something was evaluated in, so evaluate every package once on a
    throwaway clone and take covered + not covered.
    """
    probe = engine.clone()
    for package in sorted(set(packages.values())):
        # On a conflict in one rule, that file's lines come from the tests alone.
        with contextlib.suppress(RuntimeError):
            probe.eval_query(package)
    return {
        path: covered | not_covered
        for path, (covered, not_covered) in _coverage_lines(probe).items()
    }


def run_tests(
    policy_dir: Path,
    *,
    coverage: bool = False,
    data: dict[str, Any] | None = None,
    run: str | None = None,
    v0_compatible: bool = False,
    capture: tuple[str, ...] = (),
) -> TestReport:
    """Run every ``test_*`` rule under ``policy_dir`` (``run``: regex on ``data.pkg.test_x``).

    ``capture``: rule paths (``data.pkg.decision``) whose inputs the report keeps: each gets
    one more definition that prints its input and produces nothing (``false``), so no
    outcome changes. Raises ConfigError (with file:line:col) when a module does not parse or
    compile.
    """
    engine, packages = _load(
        Path(policy_dir),
        data=data,
        include_tests=True,
        v0_compatible=v0_compatible,
        coverage=coverage,
        extra=_capture_modules(capture),
    )
    tests = discover_tests(engine, packages)
    if run:
        pattern = re.compile(run)
        tests = [t for t in tests if pattern.search(f"{t[0]}.{t[1]}")]
    policy_files = {f for f in packages if not f.endswith(TEST_FILE_SUFFIX)}
    coverable = _coverable(engine, packages) if coverage else {}
    covered: dict[str, set[int]] = {f: set() for f in policy_files}

    results: list[TestResult] = []
    captured: dict[tuple[str, str], Any] = {}
    for package, name, file, line in tests:
        case = engine.clone()
        outcome: Outcome
        message = ""
        start = time.perf_counter_ns()
        try:
            value = case.eval_rule(f"{package}.{name}")
            elapsed = time.perf_counter_ns() - start
            if value is True:
                outcome = "pass"
            else:
                outcome = "fail"
                message = (
                    "undefined"
                    if value is None
                    else f"result is {json.dumps(value, default=_plain)}, not true"
                )
        except RuntimeError as e:
            elapsed = time.perf_counter_ns() - start
            location, reason = parse_regorus_error(str(e))
            outcome, message = "error", f"{location}: {reason}" if location else reason
        except BaseException as e:
            # A pyo3 panic is a BaseException; one bad test must not stop the run.
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            elapsed = time.perf_counter_ns() - start
            outcome, message = "error", f"engine panic: {type(e).__name__}: {e}"
        prints = _take_captures(case.take_prints(), capture, captured)
        if coverage:
            for path, (hit, _) in _coverage_lines(case).items():
                if path in covered:
                    covered[path] |= hit
        results.append(TestResult(package, name, file, line, outcome, elapsed, message, prints))

    report_coverage = None
    if coverage:
        report_coverage = {}
        for path in sorted(policy_files):
            hit = covered[path]
            missed = coverable.get(path, set()) - hit
            total = len(hit) + len(missed)
            report_coverage[path] = {
                "covered": sorted(hit),
                "not_covered": sorted(missed),
                "percent": round(100.0 * len(hit) / total, 2) if total else 100.0,
            }
    return TestReport(results, report_coverage, list(captured.values()))


def _capture_modules(queries: tuple[str, ...]) -> dict[str, str]:
    """One module per captured rule path, printing its input (see ``run_tests``)."""
    modules = {}
    for query in queries:
        package, _, rule = query.removeprefix("data.").rpartition(".")
        modules[f"{CAPTURE_MARK}/{query}.rego"] = (
            f"package {package}\n\nimport rego.v1\n\n{rule} := {json.dumps(CAPTURE_MARK)} if {{\n"
            f'\tprint("{CAPTURE_MARK}", "{query}", input)\n\tfalse\n}}\n'
        )
    return modules


def _take_captures(
    prints: list[str], queries: tuple[str, ...], captured: dict[tuple[str, str], Any]
) -> list[str]:
    """The test's own prints; the captured inputs go to ``captured`` (deduplicated)."""
    if not queries:
        return list(prints)
    own = []
    for line in prints:
        _, mark, rest = line.partition(f"{CAPTURE_MARK} ")
        if not mark:
            own.append(line)
            continue
        query, _, text = rest.partition(" ")
        if query not in queries or (query, text) in captured:
            continue
        with contextlib.suppress(ValueError):  # a set in an input prints as Rego, not JSON
            captured[(query, text)] = (query, json.loads(text))
    return own


def _plain(value: Any) -> Any:
    """JSON stand-in for what regorus returns beyond JSON (sets)."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return repr(value)


def _ranges(lines: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``."""
    spans: list[list[int]] = []
    for n in lines:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _duration(ns: int) -> str:
    if ns >= 1_000_000:
        return f"{ns / 1e6:.1f}ms"
    return f"{ns / 1e3:.0f}µs"


def report_to_json(report: TestReport) -> dict[str, Any]:
    """The report as JSON: each result (file, line, outcome...), counts and coverage."""
    return {
        "results": [
            {
                "package": r.package,
                "name": r.name,
                "file": r.file,
                "line": r.line,
                "outcome": r.outcome,
                "duration_ns": r.duration_ns,
                "message": r.message,
                "prints": r.prints,
            }
            for r in report.results
        ],
        "counts": {o: report.count(o) for o in ("pass", "fail", "error")},
        "ok": report.ok,
        "coverage": report.coverage,
    }


def format_report(report: TestReport, verbose: bool = False) -> str:
    """Text like ``opa test``: failures (every test when verbose), totals, then coverage."""
    lines: list[str] = []
    current_file = None
    for r in report.results:
        if not verbose and r.outcome == "pass":
            continue
        if r.file != current_file:
            if current_file is not None:
                lines.append("")
            lines.append(f"{r.file}:")
            current_file = r.file
        tag = r.outcome.upper()
        lines.append(f"{r.query}: {tag} ({_duration(r.duration_ns)})")
        if r.outcome != "pass":
            lines.append(f"  {r.file}:{r.line}: {r.message}")
        lines.extend(f"  {p}" for p in r.prints)
    total = len(report.results)
    if lines:
        lines.append("-" * 80)
    if total == 0:
        lines.append("no tests found")
    for outcome in ("pass", "fail", "error"):
        n = report.count(outcome)  # type: ignore[arg-type]
        if n or (outcome == "pass" and report.ok):
            lines.append(f"{outcome.upper()}: {n}/{total}")
    if report.coverage is not None:
        lines.extend(_coverage_text(report.coverage))
    return "\n".join(lines) + "\n"


def _coverage_text(coverage: dict[str, Any]) -> list[str]:
    """The coverage part of the text report: one line per file, then the total."""
    lines = ["", "Coverage:"]
    hit_all = miss_all = 0
    for path, c in coverage.items():
        hit, miss = len(c["covered"]), len(c["not_covered"])
        hit_all, miss_all = hit_all + hit, miss_all + miss
        line = f"  {path}: {c['percent']:.2f}% ({hit}/{hit + miss} lines)"
        if c["not_covered"]:
            line += f", not covered: {_ranges(c['not_covered'])}"
        lines.append(line)
    overall = 100.0 * hit_all / (hit_all + miss_all) if hit_all + miss_all else 100.0
    lines.append(f"  total: {overall:.2f}%")
    return lines


def policy_test_inputs(policy_dir: Path) -> list[tuple[str, Any]]:
    """The inputs the policy tests give the hub's queries; none (logged) if they do not run."""
    try:
        return run_tests(Path(policy_dir), capture=HUB_QUERIES).inputs
    except (ConfigError, OSError) as e:
        log.warning(
            "policy test inputs unavailable for the fast path check", extra={"error": str(e)}
        )
        return []
