"""agents.yaml, schemas/ and policies/: every bad file is refused with file:line and reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.bundle.config import load_config
from gateway.bundle.registry import load_registry
from gateway.bundle.schemas import SchemaSet
from gateway.cli import main
from gateway.errors import ConfigError
from tests.conftest import REPO

SCHEMAS = SchemaSet.load(REPO / "schemas")
GOOD_AGENT = """\
version: 1
agents:
  - name: echo
    image: agent-gateway/echo:dev
    capabilities: [debug.echo]
    input_schema: agents/echo.input.json
    output_schema: agents/echo.output.json
    port: 8000
"""


def test_the_shipped_files_load() -> None:
    config = load_config(
        agents_file=REPO / "agents.yaml",
        schemas_dir=REPO / "schemas",
        policies_dir=REPO / "policies",
    )
    assert {"echo", "wordstats", "calc"} <= set(config.registry.agents)
    assert config.registry.get("calc").resources.memory_bytes == 256 * 2**20


@pytest.mark.parametrize(
    ("text", "location", "reason"),
    [
        (GOOD_AGENT.replace("port: 8000", "port: [8000"), "agents.yaml:9:1", "invalid YAML"),
        (GOOD_AGENT.replace("port: 8000", "port: eighty"), "agents.yaml:8", "/agents/0/port"),
        (GOOD_AGENT.replace("name: echo", "name: Echo!"), "agents.yaml:3", "/agents/0/name"),
        (
            GOOD_AGENT.replace("    port: 8000\n", ""),
            "agents.yaml:3",
            '"port" is a required property',
        ),
        (
            GOOD_AGENT + "    colour: blue\n",
            "agents.yaml:9",
            "Additional properties are not allowed",
        ),
        (GOOD_AGENT + GOOD_AGENT.split("agents:\n")[1], "agents.yaml:9", "duplicate agent name"),
        (
            GOOD_AGENT.replace("agents/echo.input.json", "agents/missing.json"),
            "agents.yaml:6",
            "is not a schema under schemas/",
        ),
        ("", "agents.yaml:1", "the file is empty"),
        (
            GOOD_AGENT.replace("    env: {}\n", "") + "    env: {GATEWAY_URL: x}\n",
            "agents.yaml:9",
            "env",
        ),
    ],
    ids=[
        "yaml syntax",
        "wrong type",
        "bad name",
        "missing field",
        "unknown field",
        "duplicate",
        "unknown schema",
        "empty",
        "reserved env",
    ],
)
def test_invalid_registry_is_refused_with_location(
    tmp_path: Path, text: str, location: str, reason: str
) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_registry(path, SCHEMAS)
    assert info.value.location == location, info.value
    assert reason in info.value.message


def _schemas_with(tmp_path: Path, name: str, text: str) -> Path:
    root = tmp_path / "schemas"
    root.mkdir()
    (root / "ok.json").write_text('{"type": "object"}')
    (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("text", "location", "reason"),
    [
        ('{"type": "object",\n "properties": {,}}', "schemas/bad.json:2:17", "invalid JSON"),
        ('{"type": 12}', "schemas/bad.json:1", "not a valid JSON Schema at /type"),
        ('{"$ref": "nowhere.json"}', "schemas/bad.json:1", "unresolvable $ref"),
        (
            '{"$schema": "http://json-schema.org/draft-07/schema#"}',
            "schemas/bad.json",
            "is not draft 2020-12",
        ),
        ("[1, 2]", "schemas/bad.json", "must be a JSON object"),
    ],
    ids=["json syntax", "not a schema", "dangling ref", "other draft", "not an object"],
)
def test_invalid_schema_is_refused_with_location(
    tmp_path: Path, text: str, location: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        SchemaSet.load(_schemas_with(tmp_path, "bad.json", text))
    assert info.value.location == location, info.value
    assert reason in info.value.message


def test_ref_across_files_reports_every_pointer() -> None:
    errors = SCHEMAS.errors("agents/wordstats.input.json", {"text": "", "top": 0}, "/input")
    assert sorted(e["pointer"] for e in errors) == ["/input/text", "/input/top"]


@pytest.mark.parametrize(
    ("edit", "location", "reason"),
    [
        (
            lambda s: s.replace("default allow := false", "default allow := "),
            "policies/dispatch.rego:",
            "",
        ),
        (
            lambda s: s + '\ndecision := {"allow": true, "reasons": []}\n',
            "policies/dispatch.rego:",
            "conflict",
        ),
        (lambda s: s.replace("decision := {", "decisionX := {", 1), "policies", "not defined"),
    ],
    ids=["syntax error", "rule conflict", "no decision rule"],
)
def test_invalid_policy_is_refused_with_location(
    config_copy: Callable[[], Path], edit: Callable[[str], str], location: str, reason: str
) -> None:
    root = config_copy()
    policy = root / "policies" / "dispatch.rego"
    policy.write_text(edit(policy.read_text()))
    with pytest.raises(ConfigError) as info:
        load_config(
            agents_file=root / "agents.yaml",
            schemas_dir=root / "schemas",
            policies_dir=root / "policies",
        )
    assert (info.value.location or "").startswith(location), info.value
    assert reason in info.value.message


def test_check_command(config_copy: Callable[[], Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = config_copy()
    args = ["--agents", str(root / "agents.yaml"), "--schemas", str(root / "schemas")]
    args += ["--policies", str(root / "policies")]
    assert main(["check", *args]) == 0
    out = capsys.readouterr().out
    assert "agents:" in out and "policies:" in out and " ok (" in out
    (root / "agents.yaml").write_text(GOOD_AGENT.replace("port: 8000", "port: -1"))
    assert main(["check", *args]) == 1
    err = capsys.readouterr().err
    assert "agents.yaml:8" in err and "/agents/0/port" in err
