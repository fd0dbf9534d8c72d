"""The README documents every error code, command, serve flag and endpoint (Datasette's habit)."""

from __future__ import annotations

import argparse
import re

import pytest

from gateway.cli import build_parser
from gateway.errors import ERROR_CODES
from gateway.http.app import routes
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_code_is_documented(code: str) -> None:
    assert f"`{code}`" in README


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("command", sorted(_subcommands(build_parser())))
def test_every_command_is_documented(command: str) -> None:
    assert re.search(rf"^\| `{command}\b", README, re.M), command


def test_every_serve_flag_is_documented() -> None:
    serve = _subcommands(build_parser())["serve"]
    flags = [o for a in serve._actions for o in a.option_strings if o.startswith("--")]
    documented = README.split("| `serve [", 1)[1].split("]`", 1)[0]
    missing = [f for f in flags if f != "--help" and f not in documented]
    assert not missing


def test_every_endpoint_is_documented() -> None:
    for route in routes:
        path = re.sub(
            r"\{(\w+)\}",
            lambda m: "{" + ("id" if m.group(1).endswith("_id") else m.group(1)) + "}",
            route.path,
        )
        assert f"{route.method} {path}" in README, f"{route.method} {route.path}"
