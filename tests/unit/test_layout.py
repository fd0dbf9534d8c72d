"""The package's architecture, checked: no import cycles, dependencies point down only.

Every import counts, at module level, under ``TYPE_CHECKING`` or inside a function: an import
moved into a function to dodge a cycle is still the same dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from gateway.settings import REPO_ROOT

PACKAGE = REPO_ROOT / "gateway"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(name: str) -> set[str]:
    """The gateway modules ``name`` imports, including the packages whose ``__init__`` runs."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    found = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            # A parent package of the importer is already initialised when it runs.
            if candidate in MODULES and not (name + ".").startswith(candidate + "."):
                found.add(candidate)
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_is_read() -> None:
    # Guards the checks below against a parser that sees no imports at all.
    assert "gateway.store" in GRAPH["gateway.hub"] or "gateway.store.sqlite" in GRAPH["gateway.hub"]
    assert "gateway.errors" in GRAPH["gateway.routers.tasks"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


ABOVE_HUB = {"gateway.hub", "gateway.cli", "gateway.__main__"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nothing_below_the_hub_imports_it(name: str) -> None:
    if name in ABOVE_HUB or name.startswith("gateway.http"):
        return
    assert "gateway.hub" not in GRAPH[name], f"{name} imports gateway.hub"


CORE = ("routers", "policy", "bundle", "store", "decisionlog", "identity", "health", "agents")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[1:2][0:1] != []))
def test_the_core_knows_no_http_layer(name: str) -> None:
    if name.split(".")[1] not in CORE:
        return
    text = MODULES[name].read_text(encoding="utf-8")
    assert "aiohttp import web" not in text and "aiohttp.web" not in text, name
    assert not any(t.startswith("gateway.http") for t in GRAPH[name]), name


def test_the_sdk_imports_only_itself() -> None:
    for name in MODULES:
        if name.startswith("gateway.sdk"):
            outside = {t for t in GRAPH[name] if not t.startswith("gateway.sdk")}
            assert outside <= {"gateway"}, (name, outside)


def test_a_planted_cycle_is_found() -> None:
    # The detector itself: a cycle planted in a copy of the graph must be reported.
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["gateway.errors"].add("gateway.routers.tasks")
    cycle = find_cycle(planted)
    assert cycle is not None and cycle[0] == cycle[-1] and "gateway.errors" in cycle


@pytest.mark.parametrize("name", sorted(MODULES))
def test_loggers_are_named_after_their_modules(name: str) -> None:
    text = MODULES[name].read_text(encoding="utf-8")
    calls = [line.strip() for line in text.splitlines() if "get_logger(" in line]
    for call in calls:
        if call.startswith("def get_logger"):
            continue
        assert "get_logger(__name__)" in call, f"{name}: {call}"


def test_every_module_is_in_the_readme_layout() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- layout -->")[1].split("<!-- /layout -->")[0]
    listed = set(re.findall(r"`(gateway/[\w/]+\.py)`", section))
    modules = {
        p.relative_to(REPO_ROOT).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py"
    }
    assert sorted(modules - listed) == [], "modules missing from the README's layout"
    assert sorted(listed - modules) == [], "the README lists modules that do not exist"
